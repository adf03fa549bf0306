"""What an EvoPress search costs on a model's shape (a benchmark, not a test).

    python -m experiments.bench.evopress --out results/bench_evopress_gpu.json       # Qwen2.5-1.5B shape, GPU, bf16
    python -m experiments.bench.evopress --shape tiny --out results/bench_evopress_cpu.json   # the code path on a CPU

Times lp.evopress.KLFitness's one-off work (the dense log-probabilities and the prefix states of
--samples x --seqlen tokens) and --generations generations of the official schedule (32 offspring on 2,048
tokens, survivors 2 then 1 on 2,048 and 32,768), then extrapolates to the full k(L-k)/1.5 generations. Random
weights (speed does not depend on trained weights); the search's own choices are meaningless here.
"""
from __future__ import annotations

import argparse

import torch

from experiments.bench.common import SHAPES, clock, default_device, device_name, emit, peak_gib, random_model, reset_peak


def main(argv=None) -> dict:
    from lp.evopress import KLFitness, Schedule, search

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="qwen2.5_1.5b")
    ap.add_argument("--remove", type=int, default=7)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--generations", type=int, default=3, help="generations timed (the rest extrapolated)")
    ap.add_argument("--topk", type=int, default=None, help="dense top-k kept (default: the whole vocabulary)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    dev = default_device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = random_model(a.shape, dtype, dev)
    L = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (a.samples, a.seqlen), generator=torch.Generator().manual_seed(0))
    tokens = a.samples * a.seqlen
    schedule = Schedule(generations=a.generations, initial=2, initial_tokens=min(2048, tokens),
                        tokens=(min(2048, tokens), min(32768, tokens)))
    reset_peak()
    t = clock()
    fitness = KLFitness(model, ids, batch_size=1, topk=a.topk)
    t_dense = clock() - t
    t = clock()
    result = search(fitness, L, a.remove, a.samples, a.seqlen, schedule, seed=0)
    t_search = clock() - t
    full = Schedule().generations_for(a.remove, L)
    per_generation = t_search / a.generations  # the 2 initial candidates: a rounding error beside 32 offspring
    out = {"shape": a.shape, "dtype": str(dtype).removeprefix("torch."), "device": device_name(dev),
           "torch": torch.__version__, "layers": L, "removed": a.remove, "search_tokens": tokens,
           "topk": a.topk, "dense_cache_seconds": round(t_dense, 2), "stride": fitness.stride,
           "generations_timed": a.generations, "fitness_evaluations": result.evaluations,
           "seconds_per_generation": round(per_generation, 2), "generations_full": full,
           "full_search_seconds_estimate": round(t_dense + per_generation * full, 1),
           "peak_gib": peak_gib()}
    return emit(out, a.out)


if __name__ == "__main__":
    main()
