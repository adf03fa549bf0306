"""The paper's protocol end to end, timed per phase (a benchmark: the numbers are times, not quality).

    python -m experiments.bench.protocol --out results/bench_protocol_gpu.json                 # LLaMA-3-8B shape
    python -m experiments.bench.protocol --shape tiny --seqlen 64 --distill-samples 16 --ppl-windows 4   # CPU
    python -m experiments.bench.protocol --shape qwen2.5_1.5b --train last3 --out results/bench_tail_gpu.json  # Lu et al.

On a random-initialised LLaMA-3-8B-shaped model in bf16, with lp's own functions: calibration over
``--calib-samples`` x ``--seqlen`` tokens (lp.calibration.collect_stats), cosine selection of ``--remove``
layers, the LinearPatch matrix, the teacher's top-50 cache of ``--distill-samples`` x ``--seqlen`` tokens
(lp.distill.TeacherCache, written to a temporary folder), one epoch of offline distillation at the paper's
settings (batch 1, AdamW lr 1e-4, weight decay 1e-4, cosine to lr/20, bf16 autocast: conf/distill/paper.yaml),
and perplexity of the distilled model on ``--ppl-windows`` x ``--seqlen`` windows. Seconds and peak allocator
memory above the weights per phase (and the process's peak resident memory, what a CPU run can tell).
``--train`` picks what distillation trains (lp.distill.TRAIN_CHOICES: the patch, or ``last3`` and the like:
the last kept layers, the final norm and the head, as reverse-order pruning with partial-layer fine-tuning does,
the layers then removed from the end); the JSON counts the trained parameters. With fewer distillation samples than the paper's 5,000, the teacher and
distillation phases are also projected linearly to 5,000 (each sample is one independent forward or step), and
the JSON says which numbers are measured and which projected.
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from experiments.bench.common import (SHAPES, allocated, clock, default_device, device_name, emit, peak_gib,
                                      peak_rss_gib, random_model, reset_peak)

PAPER_SAMPLES = 5000


def main(argv=None) -> dict:
    from lp.calibration import collect_stats
    from lp.distill import TAIL_CHOICES, TRAIN_CHOICES, TeacherCache, distill_kl, trainable_parameters
    from lp.evaluation import perplexity
    from lp.patches import build_patch
    from lp.pruning import pruned
    from lp.selection import SelectionContext, select_layers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="llama3_8b")
    ap.add_argument("--remove", type=int, default=7)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-batch", type=int, default=1)
    ap.add_argument("--distill-samples", type=int, default=PAPER_SAMPLES)
    ap.add_argument("--topk", type=int, default=50)
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--train", choices=TRAIN_CHOICES, default="patch")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    dev = default_device()
    model = random_model(a.shape, getattr(torch, a.dtype), dev)
    weights = allocated()
    gen = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(0, model.config.vocab_size, (n, a.seqlen), generator=gen)  # noqa: E731
    calib, train, windows = tokens(a.calib_samples), tokens(a.distill_samples), tokens(a.ppl_windows)
    phases: dict[str, dict] = {}
    got: dict = {}

    def phase(name: str, fn):
        reset_peak()
        t = clock()
        got[name] = fn()
        phases[name] = {"seconds": round(clock() - t, 3), "peak_gib_above_weights": peak_gib(weights)}
        print(name, phases[name], flush=True)

    phase("calibration", lambda: collect_stats(model, calib.to(dev), a.calib_batch, progress=False))
    stats = got["calibration"]
    tail = a.train in TAIL_CHOICES  # reverse order: the last layers go, no patch
    phase("selection", lambda: list(range(model.config.num_hidden_layers - a.remove, model.config.num_hidden_layers))
          if tail else select_layers("cosine", SelectionContext(stats, a.remove, settings={"similarity": "token"})))
    s, e = got["selection"][0], got["selection"][-1] + 1
    phase("patch", lambda: build_patch("linearpatch", stats, s, e))
    patch = got["patch"]
    with tempfile.TemporaryDirectory() as tmp:
        cache = TeacherCache(tmp, a.distill_samples, a.seqlen, a.topk, shard_size=1)
        phase("teacher_cache", lambda: cache.build(model, train, progress=False))
        with pruned(model, got["selection"], lambda *_: None if tail else patch):
            trained = sum(p.numel() for p in trainable_parameters(model, a.train))
            phase("distillation", lambda: distill_kl(model, cache, train, lr=1e-4, weight_decay=1e-4, min_lr_factor=20,
                                                     epochs=1, train=a.train,
                                                     autocast_dtype="bfloat16" if a.dtype == "bfloat16" else None,
                                                     progress=False))
            phase("perplexity", lambda: perplexity(model, windows, 1, progress=False))
    measured = sum(p["seconds"] for p in phases.values())
    scale = PAPER_SAMPLES / a.distill_samples
    projected = measured + (scale - 1) * (phases["teacher_cache"]["seconds"] + phases["distillation"]["seconds"])
    out = {"model": f"LLaMA shape {a.shape!r}, random init, {a.dtype}", "device": device_name(dev), "torch": torch.__version__,
           "train": a.train, "trained_params": trained, "peak_rss_gib": peak_rss_gib(),
           "seqlen": a.seqlen, "calib_samples": a.calib_samples, "calib_batch": a.calib_batch,
           "distill_samples": a.distill_samples, "distill_steps": got["distillation"].steps, "topk": a.topk,
           "ppl_windows": a.ppl_windows, "removed": got["selection"],
           "weights_gib": round(weights / 2**30, 3) if weights else None, "phases": phases,
           "total_seconds_measured": round(measured, 1),
           f"total_seconds_at_{PAPER_SAMPLES}_samples": round(projected, 1),
           "projected": scale != 1,
           "note": (f"teacher_cache and distillation measured on {a.distill_samples} samples; the total at "
                    f"{PAPER_SAMPLES} scales those two phases by {scale:g}" if scale != 1 else "all measured")}
    return emit(out, a.out)


if __name__ == "__main__":
    main()
