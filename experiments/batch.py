"""A list of runs in ONE process: each line of a file is one run's Hydra overrides (``#`` starts a comment).

A multirun sweeps a grid; a comparison of methods is a list (each method its own selection, patch and
distillation). Run in one process, the runs share the loaded model and the cached prefixes (lp.pipeline's
Workspace), so a large model loads once. A run that fails is reported and the next one starts; the exit
status is 1 if any failed.

    python -m experiments.batch experiments/sweeps/qwen1.5b_n7.txt model=qwen2.5_coder_1.5b   # extra overrides: every run
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

from lp.models import model_config
from lp.pipeline import run, validate

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


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help="one run's overrides a line")
    ap.add_argument("common", nargs="*", help="overrides for every run (before each line's own)")
    a = ap.parse_args(argv)
    failed = []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        runs = [OmegaConf.to_container(compose("config", overrides=[*a.common, *line]), resolve=True)
                for line in runs_of(a.file)]
        for cfg in runs:  # every run composed and checked first: a bad line stops the batch before any weights load
            validate(cfg, *model_config(cfg["model"]))
        for i, cfg in enumerate(runs):
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
