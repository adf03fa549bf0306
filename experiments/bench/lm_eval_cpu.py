"""lm-eval's own side of a zero-shot evaluation, before and after lp.harness (a benchmark, not a test).

    python -m experiments.bench.lm_eval_cpu --out results/bench_lm_eval_cpu.json            # whole local suite
    python -m experiments.bench.lm_eval_cpu eval=quick                                      # the main job's tasks

The model returns seeded random numbers (its ``_loglikelihood_tokens``; the token ids it was given are
fingerprinted after the timed run), so that only lm-eval's work and the tokenisation are timed, with the default model's tokenizer. Timed, one after another in one process (the
TaskManager built before): lm-eval's ``simple_evaluate`` with HFLM as it is installed (templates compiled per
document, requests tokenised one string at a time); then lp's path (lp.harness: compiled-template reuse, the
suite of tasks and their requests, the token ids) cold (empty caches), warm in the process, and warm from disk
(a new suite and empty token memo, the files under a fresh cache folder). Every run must give the same
per-document outcomes and feed the model the same token ids as lm-eval's own path (checked, reported).
"""
from __future__ import annotations

import argparse
import hashlib
import random
import tempfile
import time

from experiments.bench.common import emit


def main(argv=None) -> dict:
    from hydra import compose, initialize_config_dir
    from lm_eval import simple_evaluate, utils
    from lm_eval.models.huggingface import HFLM
    from omegaconf import OmegaConf

    from experiments.batch import CONF
    from lp import harness
    from lp.engine import PackedLM
    from lp.models import load_model
    from lp.tasks import local_task_dir, task_manager
    from lp.zeroshot import _quiet_lm_eval, outcomes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*", help="config overrides (default: eval=local, the whole suite)")
    a = ap.parse_args(argv)
    overrides = ["eval=local", *a.overrides]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    m, e, seed = cfg["model"], cfg["eval"], cfg["seed"]
    model, tok = load_model(m["name_or_path"], m.get("gguf_file"), m["dtype"], m["device"], parts=m.get("parts"),
                            sha256=m.get("sha256"), install=m.get("install") or "")
    tasks, limit = list(e["tasks"]), e.get("limit")
    tm = task_manager(local_task_dir(), tuple(tasks))
    fed: dict = {}

    def random_scores(self, requests, disable_tqdm=False, override_bs=None):
        fed[self.label] = requests  # fingerprinted after the timed run: the model's part, not lm-eval's
        r = random.Random(0)
        return [(r.random(), False) for _ in requests]

    RandomHF = type("RandomHF", (HFLM,), {"_loglikelihood_tokens": random_scores})
    RandomLp = type("RandomLp", (PackedLM,), {"_loglikelihood_tokens": random_scores})
    rows, outs = {}, {}

    def run(label, fn):
        t = time.perf_counter()
        with _quiet_lm_eval():
            out = fn()
        rows[label] = {"seconds": round(time.perf_counter() - t, 2)}
        requests, h = fed[label], hashlib.sha256()
        for _, ctx, cont in requests:
            h.update(repr((list(ctx), list(cont))).encode())
        fed[label] = (h.hexdigest(), len(requests), sum(len(c) + len(x) for _, c, x in requests))
        outs[label] = {t_: outcomes(t_, out) for t_ in tasks}
        print(label, rows[label], flush=True)

    def hf(label):
        lm = RandomHF(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
        lm.label = label
        return lm

    run("lm_eval_simple_evaluate", lambda: simple_evaluate(
        model=hf("lm_eval_simple_evaluate"), tasks=tasks, limit=limit, num_fewshot=e.get("num_fewshot"),
        task_manager=tm, log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed))
    with tempfile.TemporaryDirectory() as cache:
        def lp(label):
            lm = RandomLp(pretrained=model, tokenizer=tok, device="cpu", cache_dir=cache)
            lm.label = label
            return harness.evaluate(lm, harness.suite(tm, tasks, limit, e.get("num_fewshot"), seed, cache))

        harness.reuse_compiled_templates()
        harness._SUITES.clear()
        harness._ENCODINGS.clear()
        run("lp_cold", lambda: lp("lp_cold"))
        run("lp_warm_in_process", lambda: lp("lp_warm_in_process"))
        harness._SUITES.clear()
        harness._ENCODINGS.clear()
        run("lp_warm_from_disk", lambda: lp("lp_warm_from_disk"))
    utils.apply_template = utils.apply_template.__wrapped__  # lm-eval as installed again
    base = outs["lm_eval_simple_evaluate"]
    same_outcomes = {k: v == base for k, v in outs.items()}
    same_tokens = {k: fed[k] == fed["lm_eval_simple_evaluate"] for k in fed}
    for k in rows:
        rows[k].update(requests=fed[k][1], tokens=fed[k][2])
    return emit({
        "what": "lm-eval's side of one zero-shot evaluation (a model returning random numbers): lm-eval as "
                "installed vs lp.harness cold / warm in the process / warm from disk",
        "command": "python -m experiments.bench.lm_eval_cpu " + " ".join(a.overrides),
        "machine": "this 2-core CPU machine", "tasks": tasks, "limit": limit,
        "documents": sum(len(o["ids"]) for o in base.values()), "tokenizer": m["name"],
        "date": time.strftime("%Y-%m-%d"), "runs": rows,
        "speedup_warm_in_process": round(rows["lm_eval_simple_evaluate"]["seconds"] / rows["lp_warm_in_process"]["seconds"], 1),
        "same_outcomes_as_lm_eval": same_outcomes, "same_token_ids_as_lm_eval": same_tokens,
    }, a.out)


if __name__ == "__main__":
    main()
