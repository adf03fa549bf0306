"""Calibration: lp's one streamed pass against the official LinearPatch code, time and memory (a benchmark).

    python -m experiments.bench.calibration --official PATH/TO/LinearPatch --out results/bench_calibration_gpu.json
    python -m experiments.bench.calibration --shape tiny --samples 8 --seqlen 64 --official PATH   # CPU, code path

``--official`` is a checkout of github.com/chenxinrui-tsinghua/LinearPatch: its ``layer_select.select_layer``
(cosine selection pass + scale pass, ``insert_type="rotate"``) and ``block_scaling.generate_symmetric_matrix``
are imported from there and run as they are, on the same random-initialised fp16 LLaMA-3-8B-shaped model (the
official code casts its Hadamard matrix to fp16) and the same 1 x 2048-token samples. lp runs
``collect_stats`` (every boundary's statistics in one pass), the official selection rule
(``prune.similarity=linearpatch``) and ``build_patch("linearpatch")`` at each ``--batches`` size. Reported:
seconds, peak allocator memory above the weights, the block each picks, and the relative Frobenius difference
of the two patches.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from experiments.bench.common import (SHAPES, allocated, clock, default_device, device_name, emit, peak_gib,
                                      random_model, reset_peak)


def lp_pass(model, ids, batch: int, n: int):
    """lp's calibration, the official selection rule and the LinearPatch matrix: (block, P, seconds)."""
    from lp.calibration import collect_stats
    from lp.patches import build_patch
    from lp.selection import SelectionContext, select_layers

    t = clock()
    stats = collect_stats(model, ids, batch, progress=False)
    block = select_layers("cosine", SelectionContext(stats, n, settings={"similarity": "linearpatch"}))
    P = build_patch("linearpatch", stats, block[0], block[-1] + 1).weight.detach().float()
    return block, P, clock() - t


def official_pass(model, ids, n: int, path: str, device: str):
    """The official code's selection + scales on one sample a batch, P built as its block_scaling does."""
    sys.path.insert(0, path)
    import block_scaling
    import layer_select

    loader = [(ids[i : i + 1],) for i in range(len(ids))]
    t = clock()
    with contextlib.redirect_stdout(sys.stderr):  # its prints, kept out of the JSON
        _, start, end, _, scales, *_ = layer_select.select_layer(model, loader, n, "rotate", device)
    P = block_scaling.generate_symmetric_matrix(scales.float())
    return list(range(start, end)), P.float(), clock() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="llama3_8b")
    ap.add_argument("--remove", type=int, default=7)
    ap.add_argument("--samples", type=int, default=128, help="the official code divides by 128 whatever it is given")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batches", default="1,4", help="lp's calibration batch sizes, comma-separated")
    ap.add_argument("--official", help="a LinearPatch checkout (leave out to time lp alone)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    dev = default_device()
    model = random_model(a.shape, torch.float16, dev)  # fp16 also on a CPU: the official code's hooks ask for it
    weights = allocated()
    ids = torch.randint(0, model.config.vocab_size, (a.samples, a.seqlen),
                        generator=torch.Generator().manual_seed(0)).to(dev)
    out = {"model": f"LLaMA shape {a.shape!r}, random init, {next(model.parameters()).dtype}", "device": device_name(dev),
           "torch": torch.__version__, "samples": a.samples, "seqlen": a.seqlen, "removed_n": a.remove,
           "weights_gib": round(weights / 2**30, 3) if weights else None, "lp": {}}
    for b in map(int, a.batches.split(",")):
        lp_pass(model, ids[: 2 * b], b, a.remove)  # warm-up
        reset_peak()
        block, P_lp, sec = lp_pass(model, ids, b, a.remove)
        out["lp"][f"batch_{b}"] = {"seconds": round(sec, 3), "peak_gib_above_weights": peak_gib(weights), "block": block}
    if a.official:
        reset_peak()
        block_o, P_o, sec_o = official_pass(model, ids, a.remove, a.official, dev)
        out["official"] = {"seconds": round(sec_o, 3), "peak_gib_above_weights": peak_gib(weights), "block": block_o,
                           "batch": 1}
        out["same_block"] = block_o == block
        out["patch_rel_frobenius"] = ((P_lp - P_o.to(P_lp.device)).norm() / P_o.norm()).item()
        out["speedup_vs_official"] = {k: round(sec_o / v["seconds"], 2) for k, v in out["lp"].items()}
    return emit(out, a.out)


if __name__ == "__main__":
    main()
