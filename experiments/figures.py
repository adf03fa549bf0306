"""The paper's figures from records and saved calibration statistics (no model needed): PNG and PDF.

    python -m experiments.figures                      # reads runs/records, writes runs/figures/
    python -m experiments.figures --results results    # the committed records, into results/figures/
    python -m experiments.figures --results results --model qwen2.5-coder-0.5b --out /tmp/figs   # another model's
"""
import argparse
from pathlib import Path

from lp.records import load_records
from lp.report.figures import (cosine, depth, depth_figures, load, magnitude, methods, outliers, patch_gain, patches,
                               ppl_vs_n, save, selection_scores)
from lp.report.tables import frame, paper_rows


def main_model() -> str:
    """The record name of the model the main job runs: conf/config.yaml's default model."""
    from hydra import compose, initialize_config_dir

    from experiments.batch import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config").model.name


def main(argv=None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="runs", help="the runs' results_dir (default runs, as experiments.run's; "
                    "results: the committed records)")
    ap.add_argument("--records", help="default: RESULTS/records")
    ap.add_argument("--out", help="default: RESULTS/figures")
    ap.add_argument("--model", help="the model (a record's model name) of the figures of one model: the interface, "
                    "methods, patches and PPL figures (default: the main job's when it has records, else the most "
                    "common among the records whose calibration statistics are at hand)")
    a = ap.parse_args(argv)
    a.records = a.records or str(Path(a.results) / "records")
    a.out = a.out or str(Path(a.results) / "figures")
    every = load_records(a.records)  # read once: the depth figures take every model, the others the most common
    if not every:
        raise SystemExit(f"--records {a.records}: no complete records found")
    stats_dir = Path(a.records).parent / "stats"  # the statistics beside the records (records name them)
    main_job = main_model()
    model = a.model or (main_job if any(r["model"] == main_job for r in every) else None)
    records, df, stats, same = load(every, stats_dir, model)
    out = Path(a.out)
    written = save(ppl_vs_n(df), out, "ppl_vs_n") + save(patches(df), out, "patches")
    written += save(methods(df), out, "methods")
    table = frame(every)
    for name, model, eval_ in depth_figures(table):
        written += save(depth(table, model, paper_rows(), eval_), out, name)
    if (fig := patch_gain(table)) is not None:
        written += save(fig, out, "patch_gain")
    if (fig := selection_scores(records, stats_dir)) is not None:
        written += save(fig, out, "selection_scores")
    if stats is None:
        print("calibration statistics not found: magnitude, outliers and cosine figures skipped")
    else:
        written += save(magnitude(stats, same), out, "magnitude") + save(cosine(stats), out, "cosine")
        written += save(outliers(stats, same), out, "outliers")
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    main()
