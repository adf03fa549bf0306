"""The paper's figures from records and saved calibration statistics (no model needed). PNG and PDF.

    python -m experiments.figures                      # reads results/records, writes results/figures/

* magnitude.{png,pdf}   Fig. 1: mean token norm per layer boundary of the dense model, the removed block
                        of each depth shaded, and at its interface the per-channel mean |x| (Hadamard
                        basis) entering the block vs what the next layer expects, before and after LinearPatch
* cosine.{png,pdf}      mean token-wise cosine similarity between every pair of layer boundaries
* ppl_vs_n.{png,pdf}    pruned perplexity against the number of removed layers, one line per method
* patches.{png,pdf}     patch variants as bars, per depth
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

from experiments.aggregate import frame  # noqa: E402
from lp.calibration import BoundaryStats  # noqa: E402
from lp.pipeline import calib_stats_path  # noqa: E402
from lp.records import load_records  # noqa: E402


def save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.{ext}" for ext in ("png", "pdf")]
    for p in paths:
        fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def magnitude(stats: BoundaryStats, records: list[dict], out: Path) -> list[Path]:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.semilogy(stats.norm_mean.numpy(), marker=".")
    a.set(xlabel="layer boundary i (input of layer i)", ylabel="mean token L2 norm", title="dense model")
    lin = sorted((r for r in records if r["patch"] == "linearpatch" and r["distill"] == "none" and r["interfaces"]),
                 key=lambda r: r["n"])
    for r in lin:
        s, e = r["interfaces"][0]
        a.axvspan(s, e, alpha=0.12, label=f"removed, n={r['n']}")
    if lin:
        a.legend(fontsize=7)
        s, e = lin[len(lin) // 2]["interfaces"][0]
        xs, xe = stats.abs_mean_rot[s], stats.abs_mean_rot[e]
        order = xe.argsort()
        b.plot(xe[order].numpy(), label=f"expected by layer {e}: mean|x_{e} H|", lw=1)
        b.plot(xs[order].numpy(), label=f"delivered, no patch: mean|x_{s} H|", lw=1)
        b.plot((xs * (xe / xs))[order].numpy(), "--", label="delivered, LinearPatch", lw=1)
        b.set(xlabel="Hadamard channel (sorted)", ylabel="mean |activation|", title=f"interface {s} -> {e}")
        b.legend(fontsize=7)
    return save(fig, out, "magnitude")


def cosine(stats: BoundaryStats, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(4.8, 4))
    im = ax.imshow(stats.cos.numpy(), cmap="viridis", origin="lower")
    ax.set(xlabel="boundary j", ylabel="boundary i", title="mean cos(x_i, x_j)")
    fig.colorbar(im, ax=ax)
    return save(fig, out, "cosine")


def ppl_vs_n(df, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for (metric, patch, distill), g in df.groupby(["metric", "patch", "distill"]):
        g = g.groupby("n")["ppl_pruned"].mean()
        ax.plot(g.index, g.values, marker="o", label=f"{metric} + {patch}" + ("" if distill == "none" else f" + {distill}"))
    ax.axhline(df["ppl_dense"].iloc[0], color="k", lw=0.8, ls=":", label="dense")
    ax.set(xlabel="layers removed", ylabel="perplexity", title=f"{df['model'].iloc[0]} on {df['data'].iloc[0]}")
    ax.legend(fontsize=7)
    return save(fig, out, "ppl_vs_n")


def patches(df, out: Path) -> list[Path]:
    t = df[df["distill"] == "none"].pivot_table(index="n", columns="patch", values="ppl_pruned", aggfunc="mean")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    t.plot.bar(ax=ax, rot=0)
    ax.set(xlabel="layers removed", ylabel="perplexity", title="patch variants")
    return save(fig, out, "patches")


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default="results/records")
    ap.add_argument("--out", default="results/figures")
    a = ap.parse_args(argv)
    records = load_records(a.records)
    if not records:
        raise SystemExit(f"--records {a.records}: no complete records found")
    out = Path(a.out)
    df = frame(records)
    df = df[df["eval"] == df["eval"].mode()[0]]  # one evaluation setting: the most common one
    written = ppl_vs_n(df, out) + patches(df, out)
    path = Path(records[0].get("calib_stats") or calib_stats_path(records[0]["config"]))
    if path.is_file():
        stats = BoundaryStats.load(path)
        same = [r for r in records if Path(r.get("calib_stats") or calib_stats_path(r["config"])) == path]
        written += magnitude(stats, same, out) + cosine(stats, out)
    else:
        print(f"[lp] {path} not found: magnitude and cosine figures skipped")
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    main()
