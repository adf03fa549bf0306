"""Speed and memory at real scale, on a random-initialised LLaMA-3-8B-shaped model (speed does not depend
on trained weights). Writes JSON to stdout and, with --out, to a file.

    python -m experiments.bench.speed --out results/bench_gpu.json            # on a CUDA GPU

Measures (bf16, batch 1 x 2048 tokens unless told otherwise):
  calibration   lp.calibration.collect_stats over N samples vs N plain forward passes of the decoder stack
  prefill       dense (32 layers), pruned (7 removed) and pruned + LinearPatch (patch.precision model, the
                default: bf16 here, and float32): time and tokens/s; the patch op timed alone
  distill step  one offline-KL training step of the patch: lp's way (all weights frozen, backward from the
                patch only) vs the straightforward way (whole model requires grad, full backward)
"""
from __future__ import annotations

import argparse
import time

import torch

from experiments.bench.common import emit, peak_gib, random_model, reset_peak, timed


def peak(fn) -> float:
    reset_peak()
    fn()
    return peak_gib()


def main(argv=None) -> None:
    from lp.calibration import collect_stats
    from lp.distill import topk_kl
    from lp.models import Layout
    from lp.patches import PatchContext, build_patch
    from lp.pruning import pruned

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--remove", type=int, default=7)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-batch", type=int, default=4)
    ap.add_argument("--topk", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=10, help="timed prefill passes per variant and round")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds over the variants (median taken)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    dev = "cuda"
    model = random_model("llama3_8b", torch.bfloat16, dev, layers=a.layers)
    base = Layout(model).base
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": "LLaMA-3-8B shape, random init, bf16",
           "layers": a.layers, "removed": a.remove, "seqlen": a.seqlen}
    ids = torch.randint(0, 128256, (a.calib_samples, a.seqlen), device=dev)

    # --- calibration: one streamed pass vs plain forward passes of the same samples
    def plain():
        with torch.no_grad():
            for i in range(0, a.calib_samples, a.calib_batch):
                base(input_ids=ids[i : i + a.calib_batch], use_cache=False)

    t_plain = timed(plain, repeat=1, warmup=1)
    t0 = time.perf_counter()
    stats = collect_stats(model, ids, a.calib_batch, progress=False)
    torch.cuda.synchronize()
    t_calib = time.perf_counter() - t0
    out["calibration"] = {"samples": a.calib_samples, "batch": a.calib_batch, "plain_forward_s": round(t_plain, 3),
                          "collect_stats_s": round(t_calib, 3), "ratio": round(t_calib / t_plain, 3)}

    # --- prefill
    x = ids[:1]
    fwd = lambda: model(input_ids=x, use_cache=False)  # noqa: E731
    s = a.layers - a.remove - 1  # a block near the end, as cosine selection picks on LLaMA-3-8B
    removed = list(range(s, s + a.remove))
    cheap, exact = PatchContext(stats, {"precision": "model"}), PatchContext(stats, {"precision": "float32"})
    variants = {"dense": None, "pruned": lambda *_: None,
                "patched_float32": lambda s_, e_: build_patch("linearpatch", exact, s_, e_),
                "patched_model": lambda s_, e_: build_patch("linearpatch", cheap, s_, e_)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        dense_mem = peak(fwd)
        for _ in range(a.rounds):  # interleaved rounds: clock drift hits every variant alike
            for name, make in variants.items():
                if make is None:
                    times[name].append(timed(fwd, repeat=a.repeat))
                    continue
                with pruned(model, removed, make):
                    times[name].append(timed(fwd, repeat=a.repeat))
                    if name == "patched_model" and len(times[name]) == 1:
                        patched_mem = peak(fwd)
        # the patch's own cost, timed alone on a hidden state of the prefill's shape: end-to-end differences
        # of ~1% are within the round-to-round spread, the op's time is not
        h = torch.randn(1, a.seqlen, model.config.hidden_size, device=dev, dtype=torch.bfloat16)
        op = {name: timed(lambda p=build_patch("linearpatch", ctx, s, s + a.remove).to(dev): p(h), repeat=200)
              for name, ctx in (("float32", exact), ("model", cheap))}
    t = {k: sorted(v)[len(v) // 2] for k, v in times.items()}  # median over rounds
    ideal = a.layers / (a.layers - a.remove)
    out["prefill"] = {
        **{f"{k}_ms": round(1e3 * v, 2) for k, v in t.items()},
        **{f"{k}_tok_s": round(a.seqlen / v) for k, v in t.items()},
        "speedup_ideal": round(ideal, 4),
        **{f"speedup_{k}": round(t["dense"] / v, 4) for k, v in t.items() if k != "dense"},
        **{f"patch_overhead_pct_{k}": round(100 * (t[f"patched_{k}"] - t["pruned"]) / t["pruned"], 3)
           for k in ("float32", "model")},
        "pruned_round_spread_pct": round(100 * (max(times["pruned"]) - min(times["pruned"])) / t["pruned"], 3),
        **{f"patch_op_ms_{k}": round(1e3 * v, 4) for k, v in op.items()},
        **{f"patch_op_pct_of_pruned_{k}": round(100 * v / t["pruned"], 3) for k, v in op.items()},
        "rounds": a.rounds, "repeats_per_round": a.repeat,
        "peak_gib_dense": round(dense_mem, 2), "peak_gib_patched": round(patched_mem, 2),
    }

    # --- one distillation step: lp's way vs the straightforward way
    with torch.no_grad():
        top = model(input_ids=x, use_cache=False).logits.float().topk(a.topk, dim=-1)
    probs, idx = top.values.softmax(-1), top.indices
    res = {}
    with pruned(model, removed, lambda s_, e_: build_patch("linearpatch", stats, s_, e_)):
        patch = Layout(model).layers[s].patch
        for name, everything in (("lp_frozen_prefix", False), ("straightforward_full_backward", True)):
            model.requires_grad_(everything)
            patch.requires_grad_(True)
            opt = torch.optim.AdamW(patch.parameters(), lr=1e-4)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(input_ids=x, use_cache=False).logits
                loss = topk_kl(logits, probs, idx)
                opt.zero_grad(set_to_none=True)
                model.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            try:
                t = timed(step, repeat=3, warmup=1)
                res[name] = {"step_ms": round(1e3 * t, 1), "peak_gib": round(peak(step), 2)}
            except torch.OutOfMemoryError as e:
                res[name] = {"error": f"out of memory: {str(e)[:120]}"}
            model.zero_grad(set_to_none=True)
            model.requires_grad_(False)
            torch.cuda.empty_cache()
    out["distill_step"] = res
    emit(out, a.out)


if __name__ == "__main__":
    main()
