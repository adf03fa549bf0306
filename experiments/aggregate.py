"""The paper's tables from every record: prints them and writes RESULTS/tables/*.{md,tex,csv}.

    python -m experiments.aggregate                       # the records a run writes by default (runs/)
    python -m experiments.aggregate --results results     # the committed records, into results/tables
    python -m experiments.aggregate --records DIR --out DIR
    python -m experiments.aggregate --by patch.lr         # runs that differ in patch.lr get rows of their own
    python -m experiments.aggregate --readme README.md    # also refill its <!-- table NAME col=v --> blocks
    python -m experiments.aggregate --vs metric=cosine,patch=linearpatch   # dRP against LP[L] instead of no patch
"""
import argparse
import logging
from pathlib import Path

from lp.files import atomic_write
from lp.report.tables import TITLES, build, fill_blocks


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="runs", help="the runs' results_dir (default runs, as experiments.run's; "
                    "results: the committed records)")
    ap.add_argument("--records", help="default: RESULTS/records")
    ap.add_argument("--out", help="default: RESULTS/tables")
    ap.add_argument("--by", action="append", default=[], metavar="FIELD",
                    help="a config field (e.g. patch.lr) that tells runs apart; repeatable")
    ap.add_argument("--readme", action="append", default=[],
                    help="a markdown file whose <!-- table NAME col=v1,v2 --> blocks to refill; repeatable")
    ap.add_argument("--vs", metavar="FIELD=VALUE,...",
                    help="dRP's reference run: these fields set, the others (model, data, eval, n, metric, seed) "
                         "the run's own (default: patch=none,distill=none, the same selection unpatched; a value "
                         "no record has is refused)")
    ap.add_argument("--resamples", type=int, default=1000, help="paired bootstrap resamples")
    args = ap.parse_args(argv)
    args.records = args.records or str(Path(args.results) / "records")
    args.out = args.out or str(Path(args.results) / "tables")
    try:
        pairs = [kv for kv in (args.vs or "").split(",") if kv]
        bad = [kv for kv in pairs if "=" not in kv]
        if bad:
            raise ValueError(f"--vs {args.vs!r}: {bad} is not FIELD=VALUE (e.g. --vs metric=cosine,patch=linearpatch)")
        vs = dict(kv.split("=", 1) for kv in pairs) if args.vs is not None else None
        found, skipped = build(args.records, args.out, args.by, vs, args.resamples)
        for readme in args.readme:
            text = fill_blocks(Path(readme).read_text(), args.out)
            atomic_write(readme, lambda tmp, text=text: Path(tmp).write_text(text))
    except ValueError as e:
        raise SystemExit(str(e))
    for path, why in skipped:
        print(f"skipped {path}: {why}")
    for name in found:
        print(f"{TITLES[name]} ({args.out}/{name}.md):\n{(Path(args.out) / f'{name}.md').read_text()}")
    return found


if __name__ == "__main__":
    main()
