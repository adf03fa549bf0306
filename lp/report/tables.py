"""The paper's tables from run records (pandas; no torch): every complete record under results/records, any
number of sweeps. Several seeds of one setting give mean ± std; the best value of each column within each
block (one model, data set, evaluation and depth) is in bold. Markdown, LaTeX and CSV (numbers only) for each
table; ``python -m experiments.aggregate`` writes them.

Tables:
* ppl           ablation: pruned perplexity per (metric, patch, distill), one column per depth n
* methods       baselines: pruned perplexity per selection metric, one column per patch (+ distill)
* ppl_datasets  the paper's Table 1/2 layout: one column per evaluation data set (WIKI-2, C4, PTB, ...) + avg
* accuracy      the paper's Table 3/4 layout: accuracy per zero-shot task, Avg and RP, per method and depth,
                with RP's paired interval and dRP against a reference run (written when some record has
                zero-shot results)
* paper         the paper's reported numbers (results/paper/linearpatch.csv) beside lp's runs of those models
* patch_gain    dRP of LinearPatch over no patch on the cosine block and Block Influence's layers, per model,
                evaluation and n, with paired intervals (written when such pairs have outcomes)
"""
from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..intervals import drp_interval, rp_interval
from ..keys import SETTING_GROUPS, group_settings

log = logging.getLogger(__name__)

KEY = ["model", "data", "metric", "n", "patch", "distill", "eval", "seed"]


def method_name(metric: str, patch: str, distill: str) -> str:
    return metric + ("" if patch == "none" else f" + {patch}") + ("" if distill == "none" else f" + {distill}")



def _field(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def frame(records: list[dict], by: list[str] = ()) -> pd.DataFrame:
    """One row per run; a run repeated with the same settings keeps its newest record. ``by``: config fields
    (dotted, e.g. ``patch.lr``) that tell runs apart beyond the choices of KEY; their values join the patch
    label. Runs that differ in other settings share a row (the newest is kept), with a warning naming them."""
    rows = []
    for r in records:
        row = {k: r[k] for k in KEY}
        config = r.get("config") or {}
        bos = _field(config, "data.bos")
        if bos not in (None, "auto"):  # BOS forced on or off: other windows, another data row
            row["data"] += f" [bos={str(bos).lower()}]"
        for name, default in (("similarity", "token"), ("token", "last")):  # a metric's variant, its own row
            value = _field(config, f"prune.{name}")
            if value not in (None, default):
                row["metric"] += f" [{value}]"
        if _field(config, "prune.in_loop"):  # EvoPress with the patch in its loop: another search, other layers
            row["metric"] += " [in-loop]"
        basis = _field(config, "patch.hadamard") or ("paley" if _field(config, "patch.variant") else None)
        if r["patch"] == "linearpatch" and basis == "paley":  # lp's own basis (records before patch.hadamard too)
            row["patch"] += " [H=paley]"
        if r["distill"] != "none" and _field(config, "distill.samples"):  # how much it trained, not only how:
            row["distill"] += f" [{_field(config, 'distill.samples')} x {_field(config, 'distill.seqlen')}]"  # paper vs CPU preset
        given = [f"{f}={_field(config, f)}" for f in by if _field(config, f) is not None]
        if given:  # only runs that have the field are labelled
            row["patch"] += f" [{', '.join(given)}]"
        rp = r.get("retention") or {}
        zs = r.get("zeroshot") or {}
        if zs.get("dense"):  # the engine that scored the tasks (records before lp's engine: HFLM)
            engine = (zs.get("engine") or {"name": "hflm"})["name"]
            if engine != "lp":
                row["eval"] += f" [{engine}]"
        by_data = r["ppl"].get("datasets") or {r["data"]: {"dense": r["ppl"]["dense"], "pruned": r["ppl"]["pruned"]}}
        row.update(ppl_by_data={k: v["pruned"] for k, v in by_data.items()},
                   ppl_dense_by_data={k: v["dense"] for k, v in by_data.items()})
        row.update(method=method_name(row["metric"], row["patch"], row["distill"]), ppl_dense=r["ppl"]["dense"],
                   ppl_pruned=r["ppl"]["pruned"], removed=str(r["removed"]), params_pruned=r["params_pruned"],
                   num_layers=r.get("num_layers"),
                   trained_params=(r.get("distill_result") or {}).get("trained_params", 0),
                   train_seconds=(r.get("timings") or {}).get("distill", 0.0),
                   created=r["created"], rp=rp.get("rp"), avg_pruned=rp.get("avg_pruned"),
                   avg_dense=rp.get("avg_dense"), settings=r.get("run_id", "").rsplit("__", 1)[-1],
                   config=config)
        acc = lambda v: v["acc"] if isinstance(v, dict) else v  # noqa: E731  (older records: plain numbers)
        row.update({f"acc_{t}": acc(v) for t, v in zs.get("pruned", {}).items()})
        row.update({f"dense_{t}": acc(v) for t, v in zs.get("dense", {}).items()})
        from ..zeroshot import rp_above_chance

        above = rp_above_chance(zs.get("dense") or {}, zs.get("pruned") or {}) if rp else None
        row.update(rp_se=rp.get("rp_stderr"), at_chance=tuple(rp.get("at_chance") or ()), rp_ac=above,
                   limit=_field(config, "eval.limit"),
                   rp_metric=rp.get("metric", "acc"),
                   outcomes=r.get("_outcomes"))
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = df.sort_values("created")
    differ = set()
    for _, g in df[df.duplicated(KEY, keep=False)].groupby(KEY):
        if g["settings"].nunique() > 1:
            flat = [_flat({k: group_settings(c, k) for k in SETTING_GROUPS if isinstance(c.get(k), dict)})
                    for c in g["config"]]
            differ |= {f for f in set().union(*flat) if len({repr(x.get(f)) for x in flat}) > 1}
    if differ:
        log.warning(f"runs that differ only in {sorted(differ)} share a table row (the newest is "
              f"shown); add --by FIELD to tell them apart")
    return df.drop_duplicates(KEY, keep="last").reset_index(drop=True)


REFERENCE = {"patch": "none", "distill": "none"}  # dRP's default reference: the same selection, unpatched
SAME = ["model", "data", "eval", "n", "metric", "seed"]  # what a reference shares with the run


def paired(df: pd.DataFrame, vs: dict | None = None, resamples: int = 1000, seed: int = 0,
           level: float = 0.95, rp_intervals: bool = True) -> pd.DataFrame:
    """``df`` plus paired bootstrap columns (lp.intervals) for the runs whose records have per-document
    outcomes: rp_lo, rp_hi (RP's interval), and drp, drp_lo, drp_hi against the reference run: the row with
    the same SAME fields (minus those ``vs`` sets) and the values of ``vs`` (default: REFERENCE). Runs without
    outcomes, or without a reference that has them, get NaN: no interval is ever made up. ``rp_intervals=False``:
    dRP's columns only (rp_lo, rp_hi stay NaN), half the resampling where only dRP is read."""
    vs = dict(REFERENCE if vs is None else vs)
    unknown = sorted(set(vs) - set(KEY))
    if unknown:
        raise ValueError(f"--vs {unknown}: a reference is named by {KEY}")
    df = df.copy()
    for c in ("rp_lo", "rp_hi", "drp", "drp_lo", "drp_hi"):
        df[c] = float("nan")
    if "outcomes" not in df or df.empty:
        return df
    same = [k for k in SAME if k not in vs]
    has = df["outcomes"].notna()
    for i in df.index[has]:
        row, args = df.loc[i], dict(resamples=resamples, seed=seed, level=level)
        o, metric = row["outcomes"], row["rp_metric"]
        rp = rp_interval(o["dense"], o["pruned"], metric, **args) if rp_intervals else {"ci": None}
        if rp["ci"]:
            df.loc[i, ["rp_lo", "rp_hi"]] = rp["ci"]
        match = (df[same] == row[same]).all(axis=1)
        for k, v in vs.items():
            match &= df[k].astype(str) == str(v)
        ref = df[has & match]
        if len(ref) and ref.index[0] != i:
            d = drp_interval(o["dense"], o["pruned"], ref.iloc[0]["outcomes"]["pruned"], metric, **args)
            df.loc[i, ["drp", "drp_lo", "drp_hi"]] = [d["drp"], *(d["ci"] or [float("nan")] * 2)]
    return df


@dataclass
class Table:
    """Means and standard deviations over seeds (same shape; std NaN for one seed), the index columns that
    make a block for the bold best, and whether lower is better."""

    mean: pd.DataFrame
    std: pd.DataFrame
    block: list[str]
    lower_is_better: bool
    note: str = ""  # printed under the table

    def best(self) -> pd.DataFrame:
        """True where a cell holds the best mean of its column within its block; the dense reference rows
        and blocks of a single row have no best."""
        pick = "min" if self.lower_is_better else "max"
        blocks = self.mean.groupby(level=self.block)
        best = self.mean.eq(blocks.transform(pick)) & blocks.transform("count").gt(1)
        for c in getattr(self, "no_best", []):
            best[c] = False
        if "method" in self.mean.index.names:
            best[self.mean.index.get_level_values("method") == "dense"] = False
        return best


def _table(df: pd.DataFrame, index: list[str], column: str, value: str, block: list[str], lower: bool,
           order: list | None = None) -> Table:
    """Pivot ``value`` to rows ``index`` x columns ``column``, mean and std over seeds."""
    over_seeds = df.groupby(index + [column])[value]
    mean, std = over_seeds.mean().unstack(column), over_seeds.std().unstack(column)
    if order is not None:
        mean, std = mean.reindex(columns=order), std.reindex(columns=order)
    return Table(mean, std, block, lower)


def ppl_by_depth(df: pd.DataFrame) -> Table:
    t = _table(df, ["model", "data", "eval", "metric", "patch", "distill"], "n", "ppl_pruned",
               ["model", "data", "eval"], lower=True)
    t.mean.columns = t.std.columns = [f"n={c}" for c in t.mean.columns]
    return t


def methods(df: pd.DataFrame) -> Table:
    df = df.assign(variant=[p if d == "none" else f"{p} + {d}" for p, d in zip(df["patch"], df["distill"])])
    return _table(df, ["model", "data", "eval", "n", "metric"], "variant", "ppl_pruned",
                  ["model", "data", "eval", "n"], lower=True)


def _with_dense(df: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """``df`` plus one 'dense' row per (model, data, eval, seed), n = 0, whose column ``k`` holds the dense
    model's value, read from column ``columns[k]``."""
    rows = df.groupby(["model", "data", "eval", "seed"], as_index=False).first().assign(n=0, method="dense")
    return pd.concat([rows.assign(**{k: rows[v] for k, v in columns.items()}), df], ignore_index=True)


def ppl_by_dataset(df: pd.DataFrame) -> Table:
    """Rows (model, calibration data, eval, n, method), one column per evaluation data set (each record's
    ppl.datasets, or its own data set), and their average."""
    df = _with_dense(df, {"ppl_by_data": "ppl_dense_by_data"})
    df = df.assign(eval_data=df["ppl_by_data"].map(list)).explode("eval_data").reset_index(drop=True)
    df["value"] = [d[k] for d, k in zip(df["ppl_by_data"], df["eval_data"])]
    index = ["model", "data", "eval", "n", "method"]
    t = _table(df, index, "eval_data", "value", ["model", "data", "eval", "n"], lower=True)
    avg = df.groupby(index + ["seed"])["value"].mean()  # over data sets, per seed
    complete = t.mean.notna().all(axis=1)  # an average over fewer data sets would not compare
    t.mean["avg"] = avg.groupby(level=index).mean().where(complete)
    t.std["avg"] = avg.groupby(level=index).std().where(complete)
    return t


def accuracy(df: pd.DataFrame) -> Table | None:
    tasks = sorted(c[4:] for c in df.columns if c.startswith("acc_"))
    df = df[df["rp"].notna()]
    if df.empty or not tasks:
        return None
    acc = [f"acc_{t}" for t in tasks]
    df = _with_dense(df, {**{f"acc_{t}": f"dense_{t}" for t in tasks}, "avg_pruned": "avg_dense"})
    df.loc[df["method"] == "dense", "rp"] = 100.0
    df.loc[(df["method"] == "dense") & df["rp_ac"].notna(), "rp_ac"] = 100.0
    df.loc[df["method"] == "dense", ["rp_se", "rp_lo", "rp_hi", "drp", "drp_lo", "drp_hi"]] = float("nan")
    extra = {"avg_pruned": "Avg", "rp": "RP", "rp_lo": "RP lo", "rp_hi": "RP hi", "drp": "dRP", "drp_lo": "dRP lo",
             "drp_hi": "dRP hi", "rp_se": "RP s.e.", "rp_ac": "RP above chance"}
    long = df.melt(id_vars=["model", "data", "eval", "n", "method", "seed"],
                   value_vars=acc + list(extra), var_name="column", value_name="value")
    long = long.dropna(subset=["value"])
    long["column"] = long["column"].map(lambda c: extra.get(c, c[4:]))
    long.loc[long["column"].isin(tasks + ["Avg"]), "value"] *= 100  # accuracies in %, as in the paper
    interval = ["RP lo", "RP hi", "dRP", "dRP lo", "dRP hi"]
    present = [c for c in interval + ["RP s.e.", "RP above chance"] if c in set(long["column"])]
    t = _table(long, ["model", "data", "eval", "n", "method"], "column", "value",
               ["model", "data", "eval", "n"], lower=False, order=tasks + ["Avg", "RP"] + present)
    t.no_best = [c for c in interval + ["RP s.e."] if c in present]
    at_chance = sorted({(m, task) for m, c in zip(df["model"], df["at_chance"]) if isinstance(c, tuple) for task in c})
    limits = sorted({f"{m}: {int(lim) if pd.notna(lim) else 'whole splits'}" for m, lim in zip(df["model"], df["limit"])})
    t.note = ("RP lo / hi: 95% paired bootstrap interval of RP (documents resampled within each task, the same "
              "draw for dense and pruned); dRP: RP minus that of the reference run (same model, data, eval, n "
              "and selection metric, no patch, unless --vs says otherwise), with its paired interval dRP lo / hi; "
              "empty where a record has no per-document outcomes (older records): no interval is made up. "
              "RP above chance: RP over the tasks whose dense accuracy is more than 2 s.e. above chance. "
              "RP s.e.: standard error of RP from the per-task standard errors (dense and pruned taken as "
              "independent, so it overstates the error of a paired comparison). "
              + f"Documents per task (eval.limit): {', '.join(limits)}. "
              + ("Dense model within 2 s.e. of chance, so its RP carries no signal: "
                 + ", ".join(f"{task} ({m})" for m, task in at_chance) if at_chance
                 else "Every task's dense accuracy is above chance by more than 2 s.e."))
    return t


COST = {"params_m": "params (M)", "trained_m": "trained (M)", "train_min": "train min", "rp": "RP", "rp_lo": "RP lo",
        "rp_hi": "RP hi"}


def cost(df: pd.DataFrame) -> Table | None:
    """What each method keeps beside what it costs: parameters left, parameters that distillation trained (0:
    training-free) and its minutes, and RP with its paired interval; zero-shot records only."""
    df = df[df["rp"].notna()]
    if df.empty:
        return None
    df = df.assign(params_m=df["params_pruned"] / 1e6, trained_m=df["trained_params"] / 1e6,
                   train_min=df["train_seconds"] / 60)
    long = df.melt(id_vars=["model", "data", "eval", "n", "method", "seed"], value_vars=[c for c in COST if c in df],
                   var_name="column")  # the interval columns come with paired()
    long = long.dropna(subset=["value"]).assign(column=lambda d: d["column"].map(COST))
    t = _table(long, ["model", "data", "eval", "n", "method"], "column", "value", ["model", "data", "eval", "n"],
               lower=False, order=[c for c in COST.values() if c in set(long["column"])])
    t.no_best = [c for c in t.mean.columns if c != "RP"]
    t.note = ("params: parameters of the pruned model; trained: parameters that distillation trained (the patch, or "
              "distill.train's layers and head), 0 for training-free methods; train min: its wall time; RP with "
              "its 95% paired bootstrap interval.")
    return t


CHOOSES = ("prunecomp", "streamline_layer")  # patches that choose the removed layers themselves (their own column)


def removed_layers(df: pd.DataFrame) -> Table | None:
    """The layers each selection removes, per model, calibration data and n (the paper's Table 8): a column per
    selection metric (with its variant), and per metric and patch where the patch chooses the layers itself;
    width pruning, which removes none, is left out. None without such records."""
    df = df[df["removed"] != "[]"]
    if df.empty:
        return None
    df = df.assign(selection=[f"{m} ({p})" if p in CHOOSES else m for m, p in zip(df["metric"], df["patch"])],
                   layers=df["removed"].str.strip("[]"))
    first = df.sort_values("created").groupby(["model", "data", "n", "selection"])["layers"].last().unstack("selection")
    t = Table(first, first.map(lambda _: float("nan")), ["model", "data", "n"], lower_is_better=False)
    t.no_best = list(first.columns)
    t.note = "Layers removed (dense indices), the newest record of each selection; the patch and the evaluation change none."
    return t


GAIN_SELECTIONS = ("cosine", "block_influence")


def gains(df: pd.DataFrame) -> pd.DataFrame:
    """The training-free LinearPatch runs on the cosine block and Block Influence's layers whose run without a
    patch on the same layers (same model, data, eval, n, selection) has outcomes too, with drp, drp_lo, drp_hi:
    LinearPatch minus no patch, whatever dRP's reference of the other tables."""
    d = df[df["rp"].notna() & df["metric"].isin(GAIN_SELECTIONS) & df["patch"].isin(["none", "linearpatch"])
           & (df["distill"] == "none")]
    d = paired(d, vs={"patch": "none", "distill": "none"}, rp_intervals=False)
    return d[(d["patch"] == "linearpatch") & d["drp"].notna()]


def patch_gain(df: pd.DataFrame) -> Table | None:
    """:func:`gains` per model, evaluation and n, each cell 'dRP [lo, hi]' (95% paired bootstrap): where the
    patch helps, on which family, at which depth. None without such a pair."""
    d = gains(df)
    if d.empty:
        return None
    cells = [f"{r.drp:+.2f}" + (f" [{r.drp_lo:+.2f}, {r.drp_hi:+.2f}]" if pd.notna(r.drp_lo) else "")
             for r in d.itertuples()]
    d = d.assign(L=d["num_layers"].astype(int), cell=cells, column=[f"n={n}" for n in d["n"]])
    first = d.sort_values("created").groupby(["model", "eval", "L", "metric", "column"])["cell"].last()
    first = first.unstack("column")
    first = first[sorted(first.columns, key=lambda c: int(c[2:]))]
    t = Table(first, first.map(lambda _: float("nan")), ["model", "eval"], lower_is_better=False)
    t.no_best = list(first.columns)
    t.note = ("dRP: RP of LinearPatch minus RP without a patch, the same layers removed (same model, data, eval, n "
              "and selection), with its 95% paired bootstrap interval [lo, hi] (documents resampled within each "
              "task, the same draw for both runs); L: the model's layers.")
    return t


# ------------------------------------------------------------------ output
def text(t: Table, pm: str = " ± ") -> pd.DataFrame:
    """Cells as text: 'mean' or 'mean ± std' (std over seeds), empty where there is no value; text cells as
    they are."""
    fmt = lambda df, head="": df.astype(object).map(  # noqa: E731
        lambda v: "" if not isinstance(v, str) and pd.isna(v) else v if isinstance(v, str) else f"{head}{v:.2f}")
    return fmt(t.mean) + fmt(t.std, pm).where(t.mean.notna(), "")


def markdown(t: Table) -> str:
    cells = text(t)
    return cells.where(~t.best(), "**" + cells + "**").reset_index().to_markdown(index=False, disable_numparse=True)


def latex(t: Table) -> str:
    """LaTeX through pandas' Styler: the best of each column per block in bold (\\textbf), labels escaped."""
    cells = text(t, " $\\pm$ ")
    labels = list(cells.index.names)
    bold = t.best().reset_index(drop=True).map(lambda b: "textbf: --rwrap;" if b else "")
    style = (cells.reset_index().style.hide(axis="index")
             .apply(lambda d: bold.reindex(columns=d.columns, fill_value=""), axis=None)
             .format(escape="latex", subset=labels).format_index(escape="latex", axis=1))
    return style.to_latex(hrules=True)


def numbers(t: Table) -> pd.DataFrame:
    """CSV: the means, and a '<column> std' column where some cell has several seeds."""
    out = t.mean.copy()
    for c in t.std.columns:
        if t.std[c].notna().any():
            out[f"{c} std"] = t.std[c]
    return out.reset_index()


def write(t: Table, out: Path, name: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(t)
    numbers(t).to_csv(out / f"{name}.csv", index=False)
    if t.note:
        md += f"\n\n{t.note}"
    (out / f"{name}.md").write_text(md + "\n")
    (out / f"{name}.tex").write_text(latex(t))
    return md


def rows_of(md: str, where: dict[str, list[str]]) -> str:
    """The rows of markdown table ``md`` (as :func:`markdown` writes it) whose column ``k`` holds one of
    ``where[k]``, without the columns that none of them fills; the text below the table is left out."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    split = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    df = pd.DataFrame([split(line) for line in lines[2:]], columns=split(lines[0]))
    unknown = sorted(set(where) - set(df.columns))
    if unknown:
        raise ValueError(f"table columns {unknown} do not exist (valid: {list(df.columns)})")
    for column, values in where.items():
        df = df[df[column].isin(values)]
    if df.empty:
        raise ValueError(f"no row of the table has {where}")
    return df.loc[:, (df != "").any()].to_markdown(index=False, disable_numparse=True)


_BLOCK = re.compile(r'(<!-- table ([\w/]+)((?: [\w.]+=(?:"[^"]*"|\S+))*) -->\n).*?(<!-- /table -->)', re.S)


def fill_blocks(text: str, tables_dir: str | Path) -> str:
    """``text`` (a README) with every block ``<!-- table NAME col=v1,v2 col="v 3" ... -->`` ...
    ``<!-- /table -->`` replaced by the rows of ``tables_dir/NAME.md`` that match (:func:`rows_of`): its
    tables are the aggregate's, never typed."""
    def fill(m: re.Match) -> str:
        path = Path(tables_dir) / f"{m.group(2)}.md"
        if not path.is_file():
            raise ValueError(f"README block 'table {m.group(2)}': {path} does not exist (valid: "
                             f"{sorted(p.stem for p in Path(tables_dir).glob('*.md'))})")
        where = dict(kv.split("=", 1) for kv in shlex.split(m.group(3)))
        return f"{m.group(1)}{rows_of(path.read_text(), {k: v.split(',') for k, v in where.items()})}\n{m.group(4)}"
    return _BLOCK.sub(fill, text)


PAPER = Path(__file__).resolve().parents[2] / "results" / "paper" / "linearpatch.csv"
PAPER_TASKS = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "winogrande", "wsc273", "race", "copa"]
PAPER_PPL = ["wikitext2", "c4", "ptb"]


def paper_rows(path: str | Path = PAPER) -> pd.DataFrame:
    """The LinearPatch paper's reported numbers (results/paper/linearpatch.csv: the official README's Tables
    1-4 and the abstract, each row naming its table) as frame rows: method '<lp method> [paper]', data
    wikitext2 and eval paper, the configuration lp's ``+experiment=paper_table`` runs them in."""
    p = pd.read_csv(path)
    p["method"] = [("dense" if m == "dense" else method_name(m, pa, d)) + " [paper]"
                   for m, pa, d in zip(p["metric"], p["patch"], p["distill"])]
    return p.assign(data="wikitext2", eval="paper", seed=0)


def paper(df: pd.DataFrame, path: str | Path = PAPER) -> Table:
    """The paper's numbers beside lp's runs of the same models (model, n): accuracy per task, Avg, RP and
    the three perplexities; lp's rows from records with eval=paper on those models, if any."""
    p = paper_rows(path)
    ours = df[df["model"].isin(set(p["model"])) & (df["eval"] == "paper")] if not df.empty else df
    rows = [p]
    if len(ours):
        o = ours.assign(**{t: ours.get(f"acc_{t}", float("nan")) * 100 for t in PAPER_TASKS},
                        **{k: [d.get(k) for d in ours["ppl_by_data"]] for k in PAPER_PPL}, avg=ours["avg_pruned"] * 100)
        rows.append(o[["model", "data", "eval", "n", "method", "seed", *PAPER_TASKS, "avg", "rp", *PAPER_PPL]])
    both = pd.concat(rows, ignore_index=True)
    cols = PAPER_TASKS + ["avg", "rp"] + PAPER_PPL
    long = both.melt(id_vars=["model", "data", "eval", "n", "method", "seed"], value_vars=cols, var_name="column")
    t = _table(long.dropna(subset=["value"]), ["model", "n", "method"], "column", "value", ["model", "n"],
               lower=False, order=cols)
    t.no_best = cols
    t.note = ("Rows marked [paper]: the numbers the LinearPatch paper reports (results/paper/linearpatch.csv, "
              "from the official repository's README Tables 1-4 and the paper's abstract; lm-eval 0.4.4, acc, "
              "LLaMA-3-8B = Llama-3.1-8B as its download table links). Other rows: lp's runs with eval=paper "
              "of the same model (python -m experiments.run -m +experiment=paper_table model=llama3.1_8b).")
    return t


def tables(df: pd.DataFrame) -> dict[str, Table]:
    found = {"ppl": ppl_by_depth(df), "methods": methods(df), "ppl_datasets": ppl_by_dataset(df)}
    for name, make in (("accuracy", accuracy), ("cost", cost), ("removed", removed_layers), ("patch_gain", patch_gain)):
        t = make(df)
        if t is not None:
            found[name] = t
    found["paper"] = paper(df)
    return found


TITLES = {"ppl": "pruned perplexity by layers removed", "methods": "pruned perplexity by selection metric "
          "and patch", "ppl_datasets": "perplexity by evaluation data (n=0: dense)",
          "accuracy": "zero-shot accuracy % per task, Avg and RP % (n=0: dense)",
          "cost": "parameters left and trained, minutes of training, beside RP %",
          "removed": "the layers each selection removes, per model and n",
          "patch_gain": "dRP of LinearPatch over no patch on the cosine block and Block Influence's layers",
          "paper": "the LinearPatch paper's reported numbers beside lp's runs of the same models"}


def build(records: str | Path, out: str | Path, by: list[str] = (), vs: dict | None = None,
          resamples: int = 1000) -> tuple[dict[str, Table], list]:
    """Every table from the records under ``records``, written to ``out``; also the files skipped and why.
    ``vs``: the reference of dRP (:func:`paired`)."""
    from ..records import load_records

    skipped: list = []
    df = frame(load_records(records, skipped), list(by))
    if df.empty:
        raise ValueError(f"--records {records}: no complete records found"
                         + (f" ({len(skipped)} skipped: {skipped[:3]})" if skipped else ""))
    for k, v in (vs or {}).items():  # a value no record has is a typo that would leave every dRP empty
        have = sorted(set(df[k].astype(str))) if k in df else []
        if k in KEY and str(v) not in have:  # (a field outside KEY: paired's error)
            raise ValueError(f"--vs {k}={v}: no record has it; the records' {k}: {have}")
    df = paired(df, vs, resamples)
    found = tables(df)
    for name, t in found.items():
        write(t, Path(out), name)
    return found, skipped
