"""Tables from run records (pandas): every complete record under results/records, any number of sweeps.

    python -m experiments.aggregate                       # prints and writes results/tables/*.{md,csv,tex}
    python -m experiments.aggregate --records DIR --out DIR
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from lp.records import load_records


def frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        row = {k: r[k] for k in ("model", "data", "metric", "n", "patch", "distill", "eval", "seed")}
        row.update(ppl_dense=r["ppl"]["dense"], ppl_pruned=r["ppl"]["pruned"], removed=str(r["removed"]),
                   params_pruned=r["params_pruned"], created=r["created"])
        rp = r.get("retention") or {}
        row["rp"] = rp.get("rp")
        for t, v in (r.get("zeroshot") or {}).get("pruned", {}).items():
            row[f"acc_{t}"] = v
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    # a run repeated with the same settings: keep the newest record
    key = ["model", "data", "metric", "n", "patch", "distill", "eval", "seed"]
    return df.sort_values("created").drop_duplicates(key, keep="last").reset_index(drop=True)


def ppl_table(df: pd.DataFrame) -> pd.DataFrame:
    """Pruned perplexity: rows (model, data, eval, metric, patch, distill), columns n; mean over seeds."""
    table = df.pivot_table(index=["model", "data", "eval", "metric", "patch", "distill"], columns="n",
                           values="ppl_pruned", aggfunc="mean").round(2)
    table.columns = [f"n={c}" for c in table.columns]
    return table.reset_index()


def markdown(table: pd.DataFrame) -> str:
    return table.astype(object).where(table.notna(), "").to_markdown(index=False)


def write(table: pd.DataFrame, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"{name}.csv", index=False)
    (out / f"{name}.md").write_text(markdown(table) + "\n")
    (out / f"{name}.tex").write_text(table.to_latex(index=False) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default="results/records")
    ap.add_argument("--out", default="results/tables")
    args = ap.parse_args(argv)
    df = frame(load_records(args.records))
    if df.empty:
        raise SystemExit(f"--records {args.records}: no complete records found")
    table = ppl_table(df)
    write(table, Path(args.out), "ppl")
    dense = df.groupby(["model", "data"])["ppl_dense"].first().round(2)
    print(f"dense perplexity:\n{dense.to_string()}\n\npruned perplexity (columns: layers removed):\n{markdown(table)}")


if __name__ == "__main__":
    main()
