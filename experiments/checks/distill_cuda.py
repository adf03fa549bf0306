"""Distillation under CUDA mixed precision, on a small random LLaMA-shaped model in bf16 (no download):
the patch stays float32, only the patch changes, and the loss stays finite in bf16 and fp16 autocast.

    python -m experiments.checks.distill_cuda
"""
import tempfile

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lp.calibration import collect_stats
from lp.distill import TeacherCache, distill_kl
from lp.patches import build_patch
from lp.pruning import patches_of, prune_and_patch


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    cfg = AutoConfig.for_model("llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=8,
                               num_attention_heads=9, num_key_value_heads=3, vocab_size=4096)

    def make():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16).eval().requires_grad_(False)

    teacher, student = make(), make()
    ids = torch.randint(0, 4096, (16, 256), device="cuda")
    stats = collect_stats(student, ids, 4, progress=False)
    prune_and_patch(student, [3, 4, 5], lambda s, e: build_patch("linearpatch", stats, s, e))
    patch = patches_of(student)[3]
    before = {n: t.clone() for n, t in student.named_parameters()}
    with tempfile.TemporaryDirectory() as d:
        cache = TeacherCache(d, 16, 256, 50, 4).build(teacher, ids, progress=False)
        for dtype in ("bfloat16", "float16"):
            res = distill_kl(student, cache, ids, cache, ids, lr=1e-3, weight_decay=1e-4, min_lr_factor=20,
                             epochs=2, autocast_dtype=dtype, progress=False)
            print(f"{dtype}: {res.steps} steps, loss {res.history[0]['loss']:.4f} -> {res.history[-1]['loss']:.4f}, "
                  f"val {[round(v, 4) for v in res.val]}, stopped: {res.stopped}")
    changed = [n for n, t in student.named_parameters() if not torch.equal(t, before[n])]
    print(f"changed parameters: {changed}; patch dtype: {patch.weight.dtype}; "
          f"model dtype: {student.model.embed_tokens.weight.dtype}")


if __name__ == "__main__":
    main()
