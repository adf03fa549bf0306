"""Zero-shot evaluation: lp's engine against lm-eval's HFLM on the same model and tasks (a benchmark, not a test).

    python -m experiments.bench.engine --out results/bench_engine_cpu.json                 # default model, eval=quick
    python -m experiments.bench.engine --out results/bench_engine_gpu.json model=qwen2.5_coder_1.5b \\
        model.name_or_path=DIR model.gguf_file=F model.parts=null eval=local eval.limit=null --removed 14-20

Overrides after the options compose the run's config (conf/, as experiments.run takes them). Timed, on the
dense model: HFLM at eval.zeroshot_batch_size (default eval.batch_size), then lp's engine (which keeps the states
entering the first removed layer); on the model with --removed layers taken out: lp's engine starting from
those states (prefix reuse), then from the embeddings. Reported: seconds, peak GPU memory, tokens each engine
fed the model and the TFLOP/s that makes (2 x parameters per token, the head only where each engine applies
it), the seconds each engine spent in its scoring loop (``_loglikelihood_tokens``; the rest is lm-eval's side and
tokenisation, lp.harness), and the documents whose acc or acc_norm differs between engines and between prefix
reuse on and off, and the seconds the model's forward took (synchronised). ``--attention sdpa,flex`` times lp's
engine with each kernel for its prefix-sharing mask (eval.attention; the first keeps the keys ``dense_lp``,
``pruned_lp_prefix_reuse``, ``pruned_lp``, the others get a ``_<kernel>`` suffix, after an untimed warm-up
that compiles the kernel) and counts the documents whose outcome differs from the first; ``--token-budgets
16384,65536`` does the same for eval.token_budget (keys with a ``_<kernel>_tb<budget>`` suffix), each budget with
each kernel. With ``--fp32-limit N``: on N documents a task, HFLM (its default log-softmax and
``softmax_dtype=float32``) and lp's engine on the model as loaded, against both engines on the model loaded in
float32 (the reference): which engine's outcomes are closer to float32.
"""
from __future__ import annotations

import argparse
import time

import torch

from experiments.bench.common import SHAPES, clock, device_name, emit, peak_gib, random_model, reset_peak


def _blocks(spec: str) -> list[int]:
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def _differ(a: dict, b: dict) -> dict:
    """Documents whose acc or acc_norm differs between two sets of outcomes, of all."""
    n = d = 0
    for t in a:
        for m in ("acc", "acc_norm"):
            if a[t][m] is not None:
                d += sum(x != y for x, y in zip(a[t][m], b[t][m], strict=True))
        n += len(a[t]["ids"])
    return {"documents": n, "differ": d, "fraction": round(d / n, 5)}


def main(argv=None) -> dict:
    from hydra import compose, initialize_config_dir
    from lm_eval.models.huggingface import HFLM
    from omegaconf import OmegaConf

    from experiments.batch import CONF
    from lp import engine as lp_engine
    from lp.engine import PrefixStates
    from lp.models import Layout, load_model
    from lp.pruning import pruned
    from lp.tasks import local_task_dir
    from lp.zeroshot import evaluate_tasks

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--removed", default="14-18", help="layers to take out, lo-hi (default: the main job's block)")
    ap.add_argument("--fp32-limit", type=int, default=0, help="documents a task for the float32 comparison (0: none)")
    ap.add_argument("--attention", default="sdpa", help="eval.attention kernels for lp's engine, comma-separated")
    ap.add_argument("--token-budgets", default="", help="eval.token_budget values for lp's engine, comma-separated "
                    "(default: the config's); each with each kernel, the first pair the reference")
    ap.add_argument("--shape", choices=SHAPES, help="time a random-initialised model of this shape (with the config's "
                    "tokenizer) instead of the config's model: for the engine's speed, not its outcomes")
    ap.add_argument("--skip-hflm", action="store_true", help="lp's engine only (no HFLM run, no dense speed-up)")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=a.overrides), resolve=True)
    m, e = cfg["model"], cfg["eval"]
    model, tok = load_model(m["name_or_path"], m.get("gguf_file"), m["dtype"], m["device"], m.get("device_map"),
                            parts=m.get("parts"), sha256=m.get("sha256"), install=m.get("install") or "")
    if a.shape:
        model = random_model(a.shape, model.dtype, str(model.device), min_vocab=len(tok))
    lay, removed = Layout(model), _blocks(a.removed)
    per_layer = sum(p.numel() for p in lay.layers[0].parameters())
    head = sum(p.numel() for p in lay.head.parameters())
    zs = dict(tasks=list(e["tasks"]), limit=e.get("limit"), num_fewshot=e.get("num_fewshot"),
              include_path=local_task_dir(), seed=cfg["seed"])

    fed = {}  # what each engine gives the model: token positions x layers run, positions through the head

    def forward(fn, *args, **kw):
        """``fn`` with the time until its work on the device is done added to fed["forward"]."""
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t0 = clock()
        out = fn(*args, **kw)
        sync()
        fed["forward"] += clock() - t0
        return out

    def lp_batch(orig):
        def counted(model_, b, prefix=None, attention="sdpa"):
            start = prefix.layer if prefix is not None and b.key in prefix.states else 0
            fed["layers"] += b.ids.numel() * (Layout(model_).num_layers - start)
            fed["head"] += sum(len(w[2]) for w in b.where)
            return forward(orig, model_, b, prefix, attention)
        return counted

    def hflm_batch(orig):
        def counted(self, inps, *args, **kw):
            fed["layers"] += inps.numel() * Layout(self.model).num_layers
            fed["head"] += inps.numel()
            return forward(orig, self, inps, *args, **kw)
        return counted

    def timed(name, model_=None, limit=zs["limit"], **kw):
        owner, attr, wrap = ((HFLM, "_model_call", hflm_batch) if kw["engine"] == "hflm"
                             else (lp_engine, "final_hidden", lp_batch))
        loop_owner = HFLM if kw["engine"] == "hflm" else lp_engine.PackedLM
        orig, orig_loop = getattr(owner, attr), loop_owner.__dict__["_loglikelihood_tokens"]
        loop = [0.0]

        def timed_loop(self, *args, **kwargs):
            t0 = clock()
            try:
                return orig_loop(self, *args, **kwargs)
            finally:
                loop[0] += clock() - t0

        setattr(owner, attr, wrap(orig))
        setattr(loop_owner, "_loglikelihood_tokens", timed_loop)
        fed.update(layers=0, head=0, forward=0.0)
        reset_peak()
        t = clock()
        try:
            _, out = evaluate_tasks(model_ or model, tok, **{**zs, "limit": limit}, **kw)
        finally:
            setattr(owner, attr, orig)
            setattr(loop_owner, "_loglikelihood_tokens", orig_loop)
        s = clock() - t
        flops = 2 * (fed["layers"] * per_layer + fed["head"] * head)
        rows[name] = {"seconds": round(s, 2), "engine_loop_seconds": round(loop[0], 2),
                      "forward_seconds": round(fed["forward"], 2), "peak_gib": peak_gib(),
                      "tokens_x_layers": fed["layers"], "head_positions": fed["head"],
                      "tflops_per_s": round(flops / s / 1e12, 3), "engine_loop_tflops_per_s": round(flops / loop[0] / 1e12, 3)}
        print(name, rows[name], flush=True)
        return out

    rows: dict = {}
    kernels = a.attention.split(",")
    budgets = [int(b) for b in a.token_budgets.split(",")] if a.token_budgets else [e["token_budget"]]
    hf = None if a.skip_hflm else timed("dense_hflm", engine="hflm", batch_size=e.get("zeroshot_batch_size") or e["batch_size"])
    differ = {}
    for i, (kernel, budget) in enumerate((k, b) for k in kernels for b in budgets):
        name = kernel if budget == budgets[0] else f"{kernel}_tb{budget}"
        sfx, lp_kw = ("" if i == 0 else f"_{name}"), dict(engine="lp", token_budget=budget, attention=kernel)
        try:
            if i:  # compiles the kernel (and its dynamic-shape variant) outside the timed runs
                evaluate_tasks(model, tok, **{**zs, "limit": 20}, **lp_kw)
            states = PrefixStates(min(removed), 64 * 2**30)
            dense = timed(f"dense_lp{sfx}", **lp_kw, prefix=states)
            with pruned(model, removed, lambda *_: None):
                reuse = timed(f"pruned_lp_prefix_reuse{sfx}", **lp_kw, prefix=states)
                plain = timed(f"pruned_lp{sfx}", **lp_kw)
        except Exception as err:  # a later kernel that fails here is reported, the first is not optional
            if i == 0:
                raise
            differ[f"{name}_failed"] = f"{type(err).__name__}: {err}"[:2000]
            print(name, "failed:", differ[f"{name}_failed"], flush=True)
            continue
        if i == 0:
            kept = {"prefix_states_gib": round(states.nbytes / 2**30, 3), "prefix_hits": states.hits}
            first = dense, reuse, plain
        else:
            differ[f"outcomes_differ_{name}_vs_{kernels[0]}"] = {
                "dense": _differ(first[0], dense), "pruned": _differ(first[2], plain)}
        del states
    dense, reuse, plain = first
    fp32 = {}
    if a.fp32_limit:
        n, bs = a.fp32_limit, e.get("zeroshot_batch_size") or e["batch_size"]
        sub = {"hflm": timed("subset_hflm", engine="hflm", batch_size=bs, limit=n),
               "hflm_softmax_fp32": timed("subset_hflm_softmax_fp32", engine="hflm", batch_size=bs, limit=n,
                                          softmax_dtype="float32"),
               "lp": timed("subset_lp", engine="lp", token_budget=budgets[0], limit=n)}
        model = None
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        ref_model, _ = load_model(m["name_or_path"], m.get("gguf_file"), "float32", m["device"], m.get("device_map"),
                                  parts=m.get("parts"), sha256=m.get("sha256"), install=m.get("install") or "")
        ref = {"hflm": timed("subset_fp32_hflm", ref_model, engine="hflm", batch_size=bs, limit=n),
               "lp": timed("subset_fp32_lp", ref_model, engine="lp", token_budget=budgets[0], limit=n)}
        fp32 = {"limit": n, "reference": "both engines on the model loaded in float32",
                "fp32_hflm_vs_fp32_lp": _differ(ref["hflm"], ref["lp"]),
                **{f"{k}_vs_fp32_{r}": _differ(v, ref[r]) for k, v in sub.items() for r in ("hflm", "lp")}}
        print("fp32", fp32, flush=True)
    return emit({
        "what": "zero-shot evaluation, lm-eval's HFLM vs lp's engine (lp/engine.py)",
        "command": "python -m experiments.bench.engine " + " ".join(
            [f"--removed {a.removed}", *([f"--fp32-limit {a.fp32_limit}"] if a.fp32_limit else []),
             *([f"--shape {a.shape}"] if a.shape else []), *(["--skip-hflm"] if a.skip_hflm else []),
             *([f"--attention {a.attention}"] if a.attention != "sdpa" else []),
             *([f"--token-budgets {a.token_budgets}"] if a.token_budgets else []), *a.overrides]),
        "device": device_name(m["device"]), "torch": torch.__version__,
        "model": f"{a.shape} shape, random weights, {m['name']}'s tokenizer" if a.shape else m["name"], "dtype": m["dtype"],
        "tasks": zs["tasks"], "limit": zs["limit"], "removed": removed, "token_budget": budgets[0],
        "hflm_batch_size": e.get("zeroshot_batch_size") or e["batch_size"], "date": time.strftime("%Y-%m-%d"),
        "runs": rows, **({} if hf is None else {
            "speedup_dense": round(rows["dense_hflm"]["seconds"] / rows["dense_lp"]["seconds"], 2),
            "outcomes_differ_dense_lp_vs_hflm": _differ(hf, dense)}),
        **kept,
        "outcomes_differ_prefix_reuse_on_vs_off": _differ(reuse, plain),
        **differ,
        "float32_comparison": fp32,
    }, a.out)


if __name__ == "__main__":
    main()
