"""Wall time of a sweep with this framework's reuse vs the same runs done one by one without it.

    python -m experiments.bench.sweep --out results/bench_sweep.json

Framework: one Hydra multirun (model loaded once, calibration statistics and the dense evaluation computed
once and cached, the layers before the first removed one run once per block start). Baseline: one process
per run, each with an empty cache and prefix reuse off, i.e. every run loads, calibrates and evaluates the
dense model itself. Both do the same 3 patch variants x 3 depths with the same settings and must give the
same perplexities (checked).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lp.records import load_records

SWEEP = {"patch": ["none", "diag", "linearpatch"], "prune.n": [3, 5, 7]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="*", default=["data.calib_samples=32", "eval.max_windows=16"])
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    common = ["logger=none", "progress=false", *a.settings]
    run = [sys.executable, "-m", "experiments.run"]
    with tempfile.TemporaryDirectory() as tmp:
        fw_dir = Path(tmp) / "framework"
        t = time.perf_counter()
        subprocess.run(run + ["-m", *(f"{k}={','.join(map(str, v))}" for k, v in SWEEP.items()),
                              f"results_dir={fw_dir}", *common], check=True, capture_output=True)
        t_fw = time.perf_counter() - t
        base_dir = Path(tmp) / "baseline"
        t = time.perf_counter()
        for i, (patch, n) in enumerate((p, n) for p in SWEEP["patch"] for n in SWEEP["prune.n"]):
            subprocess.run(run + [f"patch={patch}", f"prune.n={n}", f"results_dir={base_dir}",
                                  f"cache_dir={base_dir}/cache{i}", "eval.prefix_reuse=false", *common],
                           check=True, capture_output=True)
        t_base = time.perf_counter() - t
        ppl = lambda d: {r["run_id"]: round(r["ppl"]["pruned"], 4) for r in load_records(d / "records")}  # noqa: E731
        same = ppl(fw_dir) == ppl(base_dir)
    out = {"runs": 9, "settings": a.settings, "framework_s": round(t_fw, 1), "run_by_run_s": round(t_base, 1),
           "speedup": round(t_base / t_fw, 2), "same_perplexities": same}
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
