"""A list of runs in ONE process: each line of a file is one run's Hydra overrides (``#`` starts a comment).

A multirun sweeps a grid; a comparison of methods is a list (each method its own selection, patch and
distillation). Run in one process, the runs share the loaded model and the cached prefixes (lp.pipeline's
Workspace), so a large model loads once. A run that fails is reported and the next one starts; the exit
status is 1 if any failed.

    python -m experiments.batch experiments/sweeps/qwen1.5b_n7.txt model=qwen2.5_coder_1.5b   # extra overrides: every run
    python -m experiments.batch --pending FILE OVERRIDES...   # the lines without a complete record; nothing runs
    python -m experiments.batch --part 2/3 FILE OVERRIDES...  # lines 2, 5, 8, ...: one of three processes
    python -m experiments.batch --runs 86,96 FILE OVERRIDES...  # only these runs (numbered as --pending lists them)
"""
import argparse
import logging
import shlex
import sys
import time
import traceback
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lp.files import DamagedFile, read_json
from lp.pipeline import check_config, run
from lp.records import record_problem
from lp.workspace import run_id

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def runs_of(path: str | Path) -> list[list[str]]:
    """The override list of each run in ``path``: one run a line, blank lines and ``#`` comments skipped."""
    runs = []
    for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:  # an unclosed quote
            raise ValueError(f"{path}, line {i}: {e}: {line!r}") from e
        if words:
            runs.append(words)
    return runs


def missing(cfg: dict) -> str | None:
    """Why the run of ``cfg`` would run under resume=true (no record, or not a complete one), or None."""
    path = Path(cfg["results_dir"]) / "records" / f"{run_id(cfg)}.json"
    try:
        return record_problem(read_json(path), path) if path.exists() else "no record"
    except DamagedFile as e:
        return str(e)


def part_of(text: str) -> tuple[int, int]:
    """``K/N`` (1 <= K <= N) as (K, N): the K-th of N shares of a file's runs."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--part {text!r}: give K/N with whole numbers, e.g. --part 1/2") from None
    if not 1 <= k <= n:
        raise SystemExit(f"--part {text}: K must be 1..N (N={n})")
    return k, n


def runs_numbered(text: str | None, count: int) -> set[int] | None:
    """The 1-based run numbers of ``--runs 3,7,12`` (None: every run), each checked against the file's ``count``."""
    if text is None:
        return None
    try:
        numbers = {int(w) for w in text.split(",")}
    except ValueError:
        raise SystemExit(f"--runs {text!r}: give run numbers separated by commas, e.g. --runs 3,7") from None
    if bad := sorted(i for i in numbers if not 1 <= i <= count):
        raise SystemExit(f"--runs {text}: the file has runs 1..{count}, not {bad}")
    return numbers


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help="one run's overrides a line")
    ap.add_argument("common", nargs="*", help="overrides for every run (before each line's own)")
    ap.add_argument("--pending", action="store_true",
                    help="list the runs that have no complete record in results_dir (what resume=true would run)")
    ap.add_argument("--part", default="1/1", metavar="K/N",
                    help="only runs K, K+N, K+2N, ... of the file (default 1/1: all): N processes share a file, on "
                    "one GPU or as a SLURM array (--part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT, --array=1-N); "
                    "each run's record is the one the whole file would write")
    ap.add_argument("--runs", metavar="N,M,...",
                    help="only these runs of the file, numbered as --pending lists them (with --part: those in the part)")
    a = ap.parse_args(argv)
    k, n = part_of(a.part)
    failed = []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        if not Path(a.file).is_file():
            raise SystemExit(f"{a.file}: no such batch file (one run's overrides a line)")
        lines, runs = runs_of(a.file), []
        for i, line in enumerate(lines, start=1):  # every run composed and checked first: a bad line stops the
            try:                                   # batch before any weights load
                runs.append(OmegaConf.to_container(compose("config", overrides=[*a.common, *line]), resolve=True))
                check_config(runs[-1])
            except Exception as e:
                raise SystemExit(f"{a.file}, run {i} ({' '.join(line)}): {type(e).__name__}: {e}") from e
        only = runs_numbered(a.runs, len(runs))
        mine = [i for i in range(k - 1, len(runs), n) if only is None or i + 1 in only]
        if a.pending:
            todo = [(i, why) for i in mine if (why := missing(runs[i]))]
            for i, why in todo:
                print(f"run {i + 1}: {' '.join(lines[i])}   ({why})")
            print(f"[batch] {len(todo)} of {len(mine)} runs have no complete record", flush=True)
            return 0
        for i in mine:
            cfg = runs[i]
            t = time.perf_counter()
            try:
                run(cfg, group=Path(a.file).stem)
            except Exception:
                failed.append(i)
                traceback.print_exc()
            print(f"[batch] run {i + 1} of {len(runs)} {'FAILED' if i in failed else 'done'} in "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
    if failed:
        print(f"[batch] failed: runs {[i + 1 for i in failed]} of {a.file}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
