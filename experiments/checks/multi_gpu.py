"""A model split over several GPUs by accelerate (device_map=auto, as `model.device_map=auto` does) gives
the same pruned + patched outputs as the same model on one GPU, each patch on its layer's GPU.

    python -m experiments.checks.multi_gpu          # needs 2 or more CUDA GPUs
"""
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lp.calibration import collect_stats
from lp.models import Layout
from lp.patches import build_patch
from lp.pruning import patches_of, prune_and_patch


def main() -> None:
    n = torch.cuda.device_count()
    assert n >= 2, f"needs 2+ GPUs, found {n}"
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=32000)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(d)
        one = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).to("cuda:0").eval()
        per_gpu = {i: "3GiB" for i in range(n)}  # small budget per GPU forces a split
        split = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map="auto", max_memory=per_gpu).eval()
    devices = sorted({str(p.device) for p in split.parameters()})
    ids = torch.randint(0, 32000, (4, 512), device="cuda:0")
    stats = collect_stats(one, ids, 2, progress=False)
    stats_split = collect_stats(split, ids, 2, progress=False)
    removed = [5, 6, 7, 11, 12]
    for m in (one, split):
        prune_and_patch(m, removed, lambda s, e: build_patch("linearpatch", stats, s, e))
    with torch.no_grad():
        a = one(input_ids=ids).logits.float()
        b = split(input_ids=ids).logits.float().to(a.device)
    layers = Layout(split).layers
    placed = {pos: (str(p.weight.device), str(next(layers[pos].inner.parameters()).device))
              for pos, p in patches_of(split).items()}
    print(f"split over {devices}; patch position -> (patch device, layer device): {placed}")
    print(f"calibration statistics, split vs one GPU: max |diff| of mean|xH| "
          f"{(stats.abs_mean_rot - stats_split.abs_mean_rot).abs().max().item():.3g}, of cos "
          f"{(stats.cos - stats_split.cos).abs().max().item():.3g}")
    print(f"pruned + patched logits, split vs one GPU: max |diff| {(a - b).abs().max().item():.3g} "
          f"(logit scale {a.abs().max().item():.3g}); same argmax on {(a.argmax(-1) == b.argmax(-1)).float().mean().item():.4f} of tokens")


if __name__ == "__main__":
    main()
