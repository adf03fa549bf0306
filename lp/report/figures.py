"""The paper's figures from records and saved calibration statistics (no model needed). PNG and PDF.

    python -m experiments.figures --results results    # reads results/records, writes results/figures/

One model, calibration data set and evaluation per call (the most common among the records).
* magnitude.{png,pdf}   Fig. 1: mean token norm per layer boundary of the dense model, the removed block
                        of each depth shaded, and at its interface the per-channel mean |x| (Hadamard
                        basis) entering the block vs what the next layer expects, before and after LinearPatch
* outliers.{png,pdf}    per-token max |x| over channels at the interface (first calibration sample): the
                        massive outliers on a few tokens, in the plain basis and after the Hadamard rotation
* cosine.{png,pdf}      mean token-wise cosine similarity between every pair of layer boundaries
* ppl_vs_n.{png,pdf}    pruned perplexity against the number of removed layers, one line per method
* depth_<model>.{png,pdf}  RP (95% paired bands) and dRP against LP[L] by depth, per model with zero-shot
                        records at two depths or more (its main evaluation; others depth_<model>_<eval>);
                        the paper's LLaMA-3-8B points in their own panel
* patch_gain.{png,pdf}  across models: dRP of LinearPatch over no patch on the cosine block and on Block
                        Influence's layers, by n / L, with 95% paired bands
* patches.{png,pdf}     patch variants as bars, per depth (the most common selection metric)
* methods.{png,pdf}     selection metrics as bars, without and with LinearPatch (the most common depth)

Each function takes the records / statistics and returns a matplotlib figure; notebooks/ draws the same
figures inline.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from ..calibration import BoundaryStats
from ..records import load_records
from .tables import GAIN_SELECTIONS, frame, gains, paired


def save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.{ext}" for ext in ("png", "pdf")]
    for p in paths:  # no creation date in the PDF: the same records give the same bytes
        fig.savefig(p, dpi=120, bbox_inches="tight", metadata={"CreationDate": None} if p.suffix == ".pdf" else None)
    plt.close(fig)
    return paths


def _linearpatch_runs(records: list[dict]) -> list[dict]:
    """Training-free LinearPatch runs with one contiguous block, by depth."""
    return sorted((r for r in records if r["patch"] == "linearpatch" and r["distill"] == "none"
                   and len(r["interfaces"]) == 1), key=lambda r: r["n"])


def interface_of(records: list[dict]) -> tuple[int, int] | None:
    """The interface the figures zoom in on: that of the middle depth of the LinearPatch runs."""
    runs = _linearpatch_runs(records)
    return tuple(runs[len(runs) // 2]["interfaces"][0]) if runs else None


def magnitude(stats: BoundaryStats, records: list[dict]):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.semilogy(stats.norm_mean.numpy(), marker=".")
    a.set(xlabel="layer boundary i (input of layer i)", ylabel="mean token L2 norm", title="dense model")
    runs = _linearpatch_runs(records)
    metric = max({r["metric"] for r in runs}, key=[r["metric"] for r in runs].count) if runs else None
    spans = {}  # one span per distinct block of the most common selection
    for r in runs:
        if r["metric"] == metric:
            spans.setdefault(tuple(r["interfaces"][0]), r["n"])
    for (s, e), n in spans.items():
        a.axvspan(s, e, alpha=0.12, label=f"{metric}, n={n}: layers {s}-{e - 1} removed")
    if (joint := interface_of(records)) is not None:
        a.legend(fontsize=7)
        s, e = joint
        xs, xe = stats.abs_mean_rot[s], stats.abs_mean_rot[e]
        order = xe.argsort()
        b.plot(xe[order].numpy(), label=f"expected by layer {e}: mean|x_{e} H|", lw=1)
        b.plot(xs[order].numpy(), label=f"delivered, no patch: mean|x_{s} H|", lw=1)
        # LinearPatch's r is the ratio of these two curves: the patched input matches the upper one exactly
        # (x_s P H = x_s H diag(r)), so it is not drawn as a third, tautological curve
        b.set(xlabel="Hadamard channel (sorted)", ylabel="mean |activation|",
              title=f"interface {s} -> {e} (LinearPatch scales the lower curve onto the upper)")
        b.legend(fontsize=7)
    return fig


def outliers(stats: BoundaryStats, records: list[dict]):
    s, e = interface_of(records) or (stats.num_layers // 2, stats.num_layers // 2 + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
    for ax, i in zip(axes, (s, e)):
        ax.semilogy(stats.token_absmax[i].numpy(), lw=1, label="plain basis: max_c |x|")
        ax.semilogy(stats.token_absmax_rot[i].numpy(), lw=1, label="Hadamard basis: max_c |x H|")
        ax.set(xlabel="token position (first calibration sample)", title=f"boundary {i} (input of layer {i})")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("largest |activation| of the token")
    return fig


def cosine(stats: BoundaryStats):
    fig, ax = plt.subplots(figsize=(4.8, 4))
    im = ax.imshow(stats.cos.numpy(), cmap="viridis", origin="lower")
    ax.set(xlabel="boundary j", ylabel="boundary i", title="mean cos(x_i, x_j)")
    fig.colorbar(im, ax=ax)
    return fig


def _top(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the most common (model, data, evaluation) of ``df``: a figure never averages over several."""
    if df.empty:
        return df
    top = df.groupby(["model", "data", "eval"]).size().idxmax()
    return df[(df["model"] == top[0]) & (df["data"] == top[1]) & (df["eval"] == top[2])]


def ppl_vs_n(df: pd.DataFrame):
    df = _top(df)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, g in df.groupby("method"):
        g = g.groupby("n")["ppl_pruned"].mean()
        if len(g) > 1:  # a method run at one depth only is a point, not a curve: see methods()
            ax.plot(g.index, g.values, marker="o", label=method)
    ax.axhline(df["ppl_dense"].iloc[0], color="k", lw=0.8, ls=":", label="dense")
    ax.set(xlabel="layers removed", ylabel="perplexity", title=f"{df['model'].iloc[0]} on {df['data'].iloc[0]}")
    ax.legend(fontsize=7)
    return fig


LP_L = {"metric": "cosine", "patch": "linearpatch", "distill": "none"}  # the depth figure's dRP reference: LP[L]
PAPER_MODEL = "llama3.1-8b"  # the paper's LLaMA-3-8B rows (results/paper/linearpatch.csv)


def _band(ax, x, y, lo, hi, **kw):
    """A line with a marker per point and, where the interval is known, its band."""
    line, = ax.plot(x, y, marker="o", **kw)
    known = lo.notna() & hi.notna()
    if known.any():
        ax.fill_between(x[known], lo[known], hi[known], color=line.get_color(), alpha=0.15, lw=0)
    return line


MAIN_SELECTIONS = ("cosine", "block_influence", "last")  # the depth figure's first panels: these, none / LinearPatch


def _selection(method: str) -> str:
    """The selection part of a method label ('block_influence + linearpatch' -> 'block_influence')."""
    return method.split(" + ")[0]


def _line_style(patch: str, distill: str) -> str:
    """One line style per patch: none dotted, LinearPatch solid, any other patch dashed; distilled dash-dot."""
    if distill != "none":
        return "-."
    return {"none": ":", "linearpatch": "-"}.get(patch, "--")


def depth(df: pd.DataFrame, model: str, paper: pd.DataFrame | None = None, eval: str | None = None):
    """Retention against depth for one ``model`` (its most common calibration data and, unless ``eval`` names
    one, zero-shot evaluation):
    top row RP against the fraction of layers removed, bottom row dRP against LP[L] (cosine + LinearPatch at the
    same n), each with its 95% paired bootstrap band where the records have outcomes; left column cosine, Block
    Influence and prune=last without and with LinearPatch, right column every other method; given ``paper``
    (tables.paper_rows()), the paper's LLaMA-3-8B points in a panel of their own. One colour per selection
    method, one line style per patch (:func:`_line_style`). None if ``model`` has no zero-shot record."""
    d = df[(df["model"] == model) & df["rp"].notna() & ((df["eval"] == eval) if eval is not None else True)]
    if d.empty:
        return None
    d = _top(d).copy()
    d["x"] = d["n"] / d["num_layers"]
    vs_lp, d = paired(d, vs=LP_L), paired(d)
    main = lambda t: t["method"].map(_selection).isin(MAIN_SELECTIONS) & t["patch"].isin(["none", "linearpatch"]) \
        & (t["distill"] == "none")  # noqa: E731
    colours = dict(zip(sorted(set(d["method"].map(_selection))), plt.get_cmap("tab10").colors))
    shown = paper[(paper["model"] == PAPER_MODEL) & paper["rp"].notna() & (paper["n"] > 0)] if paper is not None else None
    cols = 2 + (shown is not None and not shown.empty)
    fig, axes = plt.subplots(2, cols, figsize=(5.4 * cols, 7.6), sharex=True, squeeze=False)
    for col, pick in enumerate((main, lambda t: ~main(t))):
        for row, (table, y) in enumerate(((d, "rp"), (vs_lp, "drp"))):
            ax, t = axes[row, col], table[pick(table) & table[y].notna()]
            for method, g in t.sort_values("x").groupby("method"):
                _band(ax, g["x"], g[y], g[f"{y}_lo"], g[f"{y}_hi"], label=method, ls=_line_style(
                    g["patch"].iloc[0], g["distill"].iloc[0]), color=colours[_selection(method)])
            ax.axhline(100 if y == "rp" else 0, color="k", lw=0.8, ls=":")
            if ax.lines[1:]:
                ax.legend(fontsize=6, loc="lower left")
        axes[0, col].set(ylabel="RP %", title=f"{model}, {d['eval'].iloc[0]}: "
                                               f"{'cosine, Block Influence, last' if col == 0 else 'other methods'}")
        axes[1, col].set(xlabel="fraction of layers removed (n / L)", ylabel="dRP vs cosine + linearpatch (LP[L])",
                         title="against LP[L] at the same n (bands: 95% paired CI)")
    if cols == 3:
        for method, g in shown.sort_values("n").groupby("method"):
            axes[0, 2].plot(g["n"] / g["num_layers"], g["rp"], marker="s", label=method)
        axes[0, 2].axhline(100, color="k", lw=0.8, ls=":")
        axes[0, 2].set(ylabel="RP %", xlabel="fraction of layers removed (n / L)", title="the paper: LLaMA-3-8B (reported)")
        axes[0, 2].tick_params(labelbottom=True)
        axes[0, 2].legend(fontsize=6)
        axes[1, 2].axis("off")
    fig.tight_layout()
    return fig


def depth_figures(df: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(name, model, eval) of each depth figure: one per model and zero-shot evaluation whose records span two
    depths or more. The model's main evaluation, whole splits before a document limit, then the most records,
    is named depth_<model>; any other depth_<model>_<eval> (e.g. a CPU grid at 200 documents a task)."""
    z = df[df["rp"].notna()]
    found = []
    for model, g in z.groupby("model"):
        evals = [(e, h) for e, h in g.groupby("eval") if h["n"].nunique() > 1]
        evals.sort(key=lambda eh: (eh[1]["limit"].notna().all(), -len(eh[1]), eh[0]))  # whole splits, most records
        for i, (e, _) in enumerate(evals):
            suffix = "" if i == 0 else "_" + re.sub(r"[^A-Za-z0-9.-]+", "_", e).strip("_")
            found.append((f"depth_{model}{suffix}", model, e))
    return found


def patch_gain(df: pd.DataFrame):
    """dRP of LinearPatch over no patch on the same layers (tables.gains) against the fraction of layers
    removed, one panel per selection (the cosine block, Block Influence's layers), one line per model (its main
    evaluation, as :func:`depth_figures` names it), with 95% paired bootstrap bands: where the patch helps, on
    which family, at which depth. None without a pair (LinearPatch and none at one n) in any model."""
    main = {model: e for name, model, e in depth_figures(df) if name == f"depth_{model}"}
    d = gains(df[(df["model"].map(main) == df["eval"])])
    if d.empty:
        return None
    d = d.assign(x=d["n"] / d["num_layers"])
    colours = dict(zip(sorted(main), plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, len(GAIN_SELECTIONS), figsize=(5.4 * len(GAIN_SELECTIONS), 3.9), sharey=True,
                             squeeze=False)
    for ax, sel in zip(axes[0], GAIN_SELECTIONS):
        for model, g in d[d["metric"] == sel].sort_values("x").groupby("model"):
            L = int(g["num_layers"].iloc[0])
            _band(ax, g["x"], g["drp"], g["drp_lo"], g["drp_hi"], color=colours[model],
                  label=f"{model} (L={L}, {main[model]})")
        ax.axhline(0, color="k", lw=0.8, ls=":")
        ax.set(xlabel="fraction of layers removed (n / L)", title=f"{sel}'s layers: LinearPatch minus no patch")
        if ax.lines[1:]:
            ax.legend(fontsize=6, loc="upper left")
    axes[0, 0].set_ylabel("dRP (RP points; bands: 95% paired CI)")
    fig.tight_layout()
    return fig


def selection_scores(records: list[dict], stats_dir: str | Path | None = None):
    """prune=patched: every candidate start's score (solid, left axis) beside the cosine of boundaries s and
    s+n that LLM-Streamline's selection maximises (dashed, right axis); None without such records."""
    runs = [r for r in records if r.get("selection_scores")]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    right = ax.twinx()
    for r in runs:
        starts = sorted(int(k) for k in r["selection_scores"])
        line, = ax.plot(starts, [r["selection_scores"][str(k)] for k in starts], marker="o", ms=3,
                        label=f"n={r['n']}, {r['patch']} (chose {r['removed'][0]})")
        path = stats_path(r, stats_dir)
        if path is not None:
            cos = BoundaryStats.load(path).cos
            right.plot(starts, [cos[k, k + r["n"]].item() for k in starts], ls="--", color=line.get_color(), lw=0.8)
    score = (runs[0].get("config") or {}).get("prune", {}).get("score", "kl")
    ax.set(xlabel="block start s", ylabel=f"patched score ({score}, lower is better)", yscale="log",
           title=f"{runs[0]['model']}: patch-aware scores (solid) and cosine (dashed)")
    right.set_ylabel("cosine of boundaries s, s+n")
    ax.legend(fontsize=7)
    return fig


def patches(df: pd.DataFrame):
    df = _top(df)
    metric = df["metric"].mode()[0]
    t = df[(df["distill"] == "none") & (df["metric"] == metric)].pivot_table(
        index="n", columns="patch", values="ppl_pruned", aggfunc="mean")
    t = t[sorted(t.columns, key=lambda c: (c != "none", c))]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    t.plot.bar(ax=ax, rot=0)
    ax.axhline(df["ppl_dense"].iloc[0], color="k", lw=0.8, ls=":", label="dense")
    ax.set(xlabel="layers removed", ylabel="perplexity", title=f"patch variants ({metric} selection)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def methods(df: pd.DataFrame):
    most = df.groupby("eval")["metric"].nunique().idxmax()  # the evaluation that compares the most metrics
    df = _top(df[df["eval"] == most])
    n = df["n"].mode()[0]
    t = df[(df["n"] == n) & (df["distill"] == "none") & df["patch"].isin(["none", "linearpatch"])].pivot_table(
        index="metric", columns="patch", values="ppl_pruned", aggfunc="mean")
    t = t[[c for c in ("none", "linearpatch") if c in t]]  # the paper's layout: each method, + LinearPatch
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    t.sort_values(t.columns[0]).plot.bar(ax=ax, rot=20, logy=True)
    ax.axhline(df["ppl_dense"].iloc[0], color="k", lw=0.8, ls=":", label="dense")
    ax.set(xlabel="selection metric", ylabel="perplexity (log)", title=f"selection metrics, n={n}")
    ax.legend(fontsize=7)
    return fig


def load(records_dir: str | Path | list[dict], stats_dir: str | Path | None = None, model: str | None = None
         ) -> tuple[list[dict], pd.DataFrame, BoundaryStats | None, list[dict]]:
    """Records (of a folder, or given), their table (one model and data set: ``model``'s, else the most common
    model among the records whose calibration statistics are at hand, else the most common; then its most common
    data set likewise), the calibration statistics of the first LinearPatch run (or of the first record; None if
    not saved; found as :func:`stats_path` finds them, ``stats_dir`` by default the stats/ beside a records
    folder) and the records that share them."""
    records = records_dir if isinstance(records_dir, list) else load_records(records_dir)
    if not records:
        raise SystemExit(f"--records {'(the records given)' if isinstance(records_dir, list) else records_dir}: "
                         f"no complete records found")
    if model is not None:
        if not (mine := [r for r in records if r["model"] == model]):
            raise SystemExit(f"--model {model}: no complete records of that model; models with records: "
                             f"{sorted({r['model'] for r in records})}")
        records = mine
    if stats_dir is None and not isinstance(records_dir, list):
        stats_dir = Path(records_dir).parent / "stats"
    stats_of = lambda r: stats_path(r, stats_dir)  # noqa: E731
    # one model and calibration data; each figure takes its own evaluation (_top). Records brought back from a
    # GPU without their statistics must not take the interface figures away from a model that has them.
    pool = [r for r in records if stats_of(r) is not None] or records
    top = Counter((r["model"], r["data"]) for r in pool).most_common(1)[0][0]
    df = frame(records)
    df = df[(df["model"] == top[0]) & (df["data"] == top[1])]
    records = [r for r in records if (r["model"], r["data"]) == top]
    path = stats_of((_linearpatch_runs(records) or records)[0])
    stats = BoundaryStats.load(path) if path is not None else None
    return records, df, stats, [r for r in records if path is not None and stats_of(r) == path]


def stats_path(record: dict, stats_dir: str | Path | None = None) -> Path | None:
    """The calibration statistics file a record names: the path as its run wrote it, or else the file of that
    name in ``stats_dir`` (the results folder's stats/, for records made elsewhere, e.g. on a GPU machine under
    another results_dir); None if neither is there."""
    if not record.get("calib_stats"):
        return None
    path = Path(record["calib_stats"])
    for candidate in (path, Path(stats_dir) / path.name if stats_dir is not None else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None
