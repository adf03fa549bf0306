"""Generation with a KV cache: dense, pruned and pruned + LinearPatch (a benchmark, not a test).

    python -m experiments.bench.generation --out results/bench_generation_gpu.json    # LLaMA-3-8B shape, GPU
    python -m experiments.bench.generation --shape tiny --prompts 16 --batches 1,2 --new-tokens 8 --rounds 2

Random-initialised LLaMA-3-8B shape in bf16 (speed does not depend on trained weights), ``--remove`` of its
layers removed as a block near the end (where cosine selection puts it on LLaMA-3-8B), LinearPatch at its
default precision. For every prompt length x batch size and every round (the variants interleaved in each
round, their order rotating, so drift hits them alike; one untimed pass of each at every new shape first): greedy decoding of ``--new-tokens`` tokens with HF's KV cache, a plain loop
(one prefill that yields the first token, then one forward pass per token). Reported per cell: prefill ms,
decode ms per token (the loop's time / (new tokens - 1)), decode tokens/s over the batch, each as median / min
/ max over rounds; peak allocator memory above the weights and the KV cache's bytes after the last token; the
decode speed-up against the ideal L / (L - removed); the patch op timed alone on the decode step's (batch, 1,
d) hidden state, as a share of the patched model's decode time per token.
"""
from __future__ import annotations

import argparse

import torch

from experiments.bench.common import (SHAPES, allocated, clock, default_device, device_name, emit, peak_gib,
                                      random_model, reset_peak, spread, timed)


def cache_bytes(cache) -> int:
    """Bytes of the key and value tensors a HF cache holds (layers never written hold none)."""
    if hasattr(cache, "layers"):  # transformers >= 4.56: one entry per layer
        tensors = [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    else:
        tensors = list(cache.key_cache) + list(cache.value_cache)
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@torch.no_grad()
def generate(model, prompt: torch.Tensor, new_tokens: int):
    """Greedy decoding with the KV cache: (prefill seconds, decode seconds per token, the cache)."""
    t0 = clock()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = clock()
    cache = out.past_key_values
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    t2 = clock()
    return t1 - t0, (t2 - t1) / max(new_tokens - 1, 1), cache


def main(argv=None) -> dict:
    from lp.calibration import collect_stats
    from lp.patches import PatchContext, build_patch
    from lp.pruning import pruned

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="llama3_8b")
    ap.add_argument("--remove", type=int, default=7)
    ap.add_argument("--prompts", default="128,512,2048", help="prompt lengths, comma-separated")
    ap.add_argument("--batches", default="1,16,64", help="batch sizes, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    dev = default_device()
    model = random_model(a.shape, torch.bfloat16 if dev == "cuda" else torch.float32, dev)
    weights = allocated()
    L, vocab, d = model.config.num_hidden_layers, model.config.vocab_size, model.config.hidden_size
    s = L - a.remove - 1
    removed = list(range(s, s + a.remove))
    gen = torch.Generator().manual_seed(0)
    stats = collect_stats(model, torch.randint(0, vocab, (4, 512), generator=gen).to(dev), 1, progress=False)
    patch = build_patch("linearpatch", PatchContext(stats, {"precision": "model"}), s, s + a.remove)
    variants = {"dense": None, "pruned": lambda *_: None, "patched": lambda *_: patch}

    def under(name, fn):
        if variants[name] is None:
            return fn()
        with pruned(model, removed, variants[name]):
            return fn()

    for name in variants:  # warm-up: kernels compiled and the allocator grown before any clock runs
        under(name, lambda: generate(model, torch.randint(0, vocab, (1, 16), generator=gen).to(dev), 4))
    ideal = L / (L - a.remove)
    cells = []
    for batch in map(int, a.batches.split(",")):
        for length in map(int, a.prompts.split(",")):
            prompt = torch.randint(0, vocab, (batch, length), generator=gen).to(dev)
            got = {name: {"prefill": [], "decode": []} for name in variants}
            for name in variants:  # each shape's first pass pays one-time costs (kernel choice, allocator growth)
                under(name, lambda: generate(model, prompt, 3))
            names = list(variants)
            for r in range(a.rounds):
                for name in names[r % 3:] + names[: r % 3]:  # the order rotates: no variant is always first
                    if r == 0:
                        reset_peak()
                    try:
                        pre, dec, cache = under(name, lambda: generate(model, prompt, a.new_tokens))
                    except torch.OutOfMemoryError as e:
                        got[name]["error"] = f"out of memory: {str(e)[:100]}"
                        continue
                    got[name]["prefill"].append(pre)
                    got[name]["decode"].append(dec)
                    if r == 0:
                        got[name]["peak_gib_above_weights"] = peak_gib(weights)
                        got[name]["kv_cache_bytes"] = cache_bytes(cache)
                    del cache
            cell = {"batch": batch, "prompt": length, "new_tokens": a.new_tokens}
            for name, g in got.items():
                if "error" in g or not g["decode"]:
                    cell[name] = {"error": g.get("error", "no round finished")}
                    continue
                cell[name] = {"prefill_ms": spread([1e3 * v for v in g["prefill"]]),
                              "decode_ms_per_token": spread([1e3 * v for v in g["decode"]]),
                              "decode_tok_s": spread([batch / v for v in g["decode"]]),
                              "peak_gib_above_weights": g["peak_gib_above_weights"],
                              "kv_cache_bytes": g["kv_cache_bytes"]}
            if all("error" not in cell[n] for n in variants):
                med = {n: cell[n]["decode_ms_per_token"]["median"] for n in variants}
                h = torch.randn(batch, 1, d, device=dev, dtype=next(model.parameters()).dtype)
                op_ms = 1e3 * timed(lambda: patch(h), repeat=200, warmup=10)
                cell["summary"] = {
                    "decode_speedup_pruned": round(med["dense"] / med["pruned"], 4),
                    "decode_speedup_patched": round(med["dense"] / med["patched"], 4),
                    "decode_speedup_ideal": round(ideal, 4),
                    "patched_pct_of_ideal": round(100 * med["dense"] / med["patched"] / ideal, 2),
                    "prefill_speedup_patched": round(cell["dense"]["prefill_ms"]["median"]
                                                     / cell["patched"]["prefill_ms"]["median"], 4),
                    "patch_op_ms": round(op_ms, 5),
                    "patch_op_pct_of_decode": round(100 * op_ms / med["patched"], 3),
                    "kv_cache_ratio": round(cell["patched"]["kv_cache_bytes"] / cell["dense"]["kv_cache_bytes"], 4),
                    "kv_cache_ratio_ideal": round((L - a.remove) / L, 4)}
            print(cell, flush=True)
            cells.append(cell)
    out = {"model": f"LLaMA shape {a.shape!r}, random init, {next(model.parameters()).dtype}", "device": device_name(dev),
           "torch": torch.__version__, "layers": L, "removed": removed, "rounds": a.rounds,
           "weights_gib": round(weights / 2**30, 3) if weights else None, "cells": cells}
    return emit(out, a.out)


if __name__ == "__main__":
    main()
