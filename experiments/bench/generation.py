"""Generation with a KV cache: dense, pruned and pruned + LinearPatch (a benchmark, not a test).

    python -m experiments.bench.generation --out results/bench_generation_gpu.json    # LLaMA-3-8B shape, GPU
    python -m experiments.bench.generation --shape tiny --prompts 16 --batches 1,2 --new-tokens 8 --rounds 2
    python -m experiments.bench.generation --table results/bench_generation_gpu.json   # docs/performance.md's table

Random-initialised LLaMA-3-8B shape in bf16 (speed does not depend on trained weights), ``--remove`` of its
layers removed as a block near the end (where cosine selection puts it on LLaMA-3-8B), LinearPatch at its
default precision. For every prompt length x batch size and every round (the variants interleaved in each
round, their order rotating, so drift hits them alike; one untimed pass of each at every new shape first):
greedy decoding of ``--new-tokens`` tokens with a KV cache, one prefill that yields the first token, then one
step per token. ``--decode graph`` (the GPU default) captures the decode step in a CUDA graph over a static
cache, so the time per token is the GPU's, not HF's per-step host work; ``dynamic`` is HF's eager loop.
Reported per cell: prefill ms,
decode ms per token (the loop's time / (new tokens - 1)), decode tokens/s over the batch, each as median / min
/ max over rounds; peak allocator memory above the weights and the KV cache's bytes after the last token; the
decode speed-up against the ideal L / (L - removed); the patch op timed alone on the decode step's (batch, 1,
d) hidden state, as a share of the patched model's decode time per token.
"""
from __future__ import annotations

import argparse
import inspect
import json

import torch
from transformers import DynamicCache

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
    """Greedy decoding with HF's dynamic KV cache, one eager forward per token.

    Returns (prefill seconds, decode seconds per token, the cache, the (batch, new_tokens) tokens).
    """
    cache = DynamicCache(config=model.config)
    kw = {_cache_arg(model): cache, "use_cache": True}
    t0 = clock()
    token = model(input_ids=prompt, logits_to_keep=1, **kw).logits[:, -1].argmax(-1, keepdim=True)
    t1 = clock()
    tokens = [token]
    for _ in range(new_tokens - 1):
        token = model(input_ids=token, **kw).logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    t2 = clock()
    return t1 - t0, (t2 - t1) / max(new_tokens - 1, 1), cache, torch.cat(tokens, 1)


def _cache_arg(model) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate_static(model, prompt: torch.Tensor, new_tokens: int, graph: bool):
    """Greedy decoding with a static KV cache, each decode step one CUDA graph replay when ``graph``.

    HF's eager decode step costs tens of milliseconds of Python and kernel launches whatever the model does, so
    the layers removed hardly show in it. Here the step (the 4D mask from the position, the forward pass, the
    argmax, the position advanced) is captured once and replayed: the GPU runs it without waiting for the host.
    Returns (prefill seconds, decode seconds per token, the cache, the (batch, new_tokens) tokens).
    """
    from transformers import StaticCache

    batch, length = prompt.shape
    total, dev = length + new_tokens, prompt.device
    dtype = next(model.parameters()).dtype
    cache = StaticCache(config=model.config, max_cache_len=total)
    kw = {_cache_arg(model): cache, "use_cache": True, "logits_to_keep": 1}
    t0 = clock()
    out = model(input_ids=prompt, **kw)
    tokens = torch.zeros(batch, new_tokens, dtype=torch.long, device=dev)
    tokens[:, 0] = out.logits[:, -1].argmax(-1)
    t1 = clock()
    prefill = t1 - t0
    pos = torch.full((batch, 1), length, dtype=torch.long, device=dev)  # the position of the token fed in
    cols = torch.arange(total, device=dev).view(1, 1, 1, total)
    token = tokens[:, :1].clone()
    lengths = [layer.cumulative_length for layer in cache.layers]  # how far each layer's cache is written
    start = [n.clone() for n in lengths]

    def step():
        mask = torch.where(cols <= pos.view(batch, 1, 1, 1), 0.0, torch.finfo(dtype).min).to(dtype)
        nxt = model(input_ids=token, position_ids=pos, attention_mask=mask, **kw).logits[:, -1].argmax(-1, keepdim=True)
        tokens.scatter_(1, (pos - length + 1).clamp(max=new_tokens - 1), nxt)
        token.copy_(nxt)
        pos.add_(1)

    def rewind():  # back to the state right after the prefill
        pos.fill_(length)
        token.copy_(tokens[:, :1])
        for n, n0 in zip(lengths, start):
            n.copy_(n0)

    replay = step
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # CUDA graphs want a few warm-up runs on a side stream
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        replay = g.replay
        rewind()
        t1 = clock()  # the capture is a one-time cost, like compiling: not part of the time per token
    for _ in range(new_tokens - 1):
        replay()
    t2 = clock()
    return prefill, (t2 - t1) / max(new_tokens - 1, 1), cache, tokens


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
    ap.add_argument("--decode", choices=("graph", "static", "dynamic"),
                    help="graph: static cache, each step a CUDA graph replay (the default on a GPU); static: the "
                         "same steps run eagerly (the default on a CPU); dynamic: HF's dynamic cache, eager")
    ap.add_argument("--check-tokens", type=int, default=8,
                    help="per cell and variant, this many tokens decoded both ways: the share that agree with "
                         "the dynamic cache's is reported")
    ap.add_argument("--out")
    ap.add_argument("--table", metavar="JSON", help="print the markdown table of a saved run, and run nothing")
    a = ap.parse_args(argv)
    if a.table:
        print(table(json.loads(open(a.table).read())))
        return {}
    dev = default_device()
    decode = a.decode or ("graph" if dev == "cuda" else "static")
    if decode == "graph" and dev != "cuda":
        raise SystemExit("--decode graph needs a GPU (CUDA graphs); use --decode static on a CPU")
    run = (lambda m, p, n: generate(m, p, n)) if decode == "dynamic" else \
        (lambda m, p, n: generate_static(m, p, n, graph=decode == "graph"))
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
        under(name, lambda: run(model, torch.randint(0, vocab, (1, 16), generator=gen).to(dev), 4))
    ideal = L / (L - a.remove)
    cells = []
    for batch in map(int, a.batches.split(",")):
        for length in map(int, a.prompts.split(",")):
            prompt = torch.randint(0, vocab, (batch, length), generator=gen).to(dev)
            got = {name: {"prefill": [], "decode": []} for name in variants}
            agree = {}
            for name in variants:  # each shape's first pass pays one-time costs (kernel choice, allocator growth)
                k = a.check_tokens
                mine, ref = under(name, lambda: (run(model, prompt, k)[3], generate(model, prompt, k)[3]))
                agree[name] = round((mine == ref).float().mean().item(), 4)
            names = list(variants)
            for r in range(a.rounds):
                for name in names[r % 3:] + names[: r % 3]:  # the order rotates: no variant is always first
                    if r == 0:
                        reset_peak()
                    try:
                        pre, dec, cache, _ = under(name, lambda: run(model, prompt, a.new_tokens))
                    except torch.OutOfMemoryError as e:
                        got[name]["error"] = f"out of memory: {str(e)[:100]}"
                        continue
                    got[name]["prefill"].append(pre)
                    got[name]["decode"].append(dec)
                    if r == 0:
                        got[name]["peak_gib_above_weights"] = peak_gib(weights)
                        got[name]["kv_cache_bytes"] = cache_bytes(cache)
                    del cache
            cell = {"batch": batch, "prompt": length, "new_tokens": a.new_tokens,
                    "tokens_agreeing_with_dynamic_cache": agree}
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
           "torch": torch.__version__, "decode": decode, "layers": L, "removed": removed, "rounds": a.rounds,
           "weights_gib": round(weights / 2**30, 3) if weights else None, "cells": cells}
    return emit(out, a.out)


def table(out: dict) -> str:
    """The medians of a saved run as a markdown table (dense / pruned / patched where three numbers)."""
    rows = ["| batch | prompt | prefill ms dense / pruned / patched | prefill speed-up | decode ms/token dense / "
            "pruned / patched | decode speed-up | % of ideal | patch op alone % of decode | patched - pruned % of decode | peak GiB above weights "
            "dense / patched | KV cache ratio |", "|---:|---:|---|---:|---|---:|---:|---:|---:|---|---:|"]
    for c in out["cells"]:
        if "summary" not in c:
            rows.append(f"| {c['batch']} | {c['prompt']} | failed: {c} |")
            continue
        three = lambda key: " / ".join(f"{c[n][key]['median']:.2f}" for n in ("dense", "pruned", "patched"))  # noqa: E731
        s, dec = c["summary"], {n: c[n]["decode_ms_per_token"]["median"] for n in ("pruned", "patched")}
        rows.append(f"| {c['batch']} | {c['prompt']} | {three('prefill_ms')} | {s['prefill_speedup_patched']:.2f} | "
                    f"{three('decode_ms_per_token')} | {s['decode_speedup_patched']:.3f} | {s['patched_pct_of_ideal']:.1f} | "
                    f"{s['patch_op_pct_of_decode']:.2f} | {100 * (dec['patched'] - dec['pruned']) / dec['patched']:.2f} | {c['dense']['peak_gib_above_weights']:.2f} / "
                    f"{c['patched']['peak_gib_above_weights']:.2f} | {s['kv_cache_ratio']:.4f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
