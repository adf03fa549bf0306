"""Paired bootstrap intervals of retention (numpy, no torch).

Every model of a comparison answers the same documents, so RP (pruned mean accuracy / dense mean accuracy x 100)
and the difference dRP between two runs are paired quantities. One resample draws documents with replacement
within each task and applies the SAME draw to every model; RP and dRP are recomputed on it; the interval is the
percentile interval over ``resamples`` draws, seeded, so it is reproducible.

Outcomes are lm-eval's own per-document scores (``log_samples``), per task ``{"ids": [...], "acc": [0/1 ...],
"acc_norm": [...] | None}``; only documents that every compared model scored enter (a run with ``eval.limit``
compares on the documents both scored). A record without outcomes gets no interval (their side files are read
and checked by lp.records.load_outcomes) and the tables say so.
"""
from __future__ import annotations

import numpy as np

CHUNK = 256  # resamples drawn at once (bounds memory: CHUNK x documents indices)


def _aligned(models: list[dict], metric: str) -> dict[str, np.ndarray]:
    """{task: array (models, documents)} of 0/1 outcomes on the documents every model scored."""
    tasks = set(models[0])
    if any(set(m) != tasks for m in models):
        raise ValueError(f"the compared models were scored on different tasks: {[sorted(m) for m in models]}")
    out = {}
    for t in sorted(tasks):
        if any(m[t].get(metric) is None for m in models):
            raise ValueError(f"task {t!r} has no per-document {metric}")
        maps = [dict(zip(map(str, m[t]["ids"]), m[t][metric])) for m in models]
        common = [i for i in maps[0] if all(i in mp for mp in maps[1:])]
        if not common:
            raise ValueError(f"task {t!r}: no document was scored by every compared model")
        out[t] = np.array([[mp[i] for i in common] for mp in maps], dtype=np.float64)
    return out


def task_means(models: list[dict], metric: str = "acc", resamples: int = 1000, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Per-task mean outcome of each model on the common documents: the point estimate (models, tasks), the
    paired resamples (resamples, models, tasks), and the documents per task."""
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"bootstrap.resamples={resamples!r} must be an integer >= 1")
    aligned = _aligned(models, metric)
    rng = np.random.default_rng(seed)
    point = np.stack([a.mean(axis=1) for a in aligned.values()], axis=1)
    boot = np.empty((resamples, len(models), len(aligned)))
    for j, a in enumerate(aligned.values()):
        n = a.shape[1]
        for lo in range(0, resamples, CHUNK):
            idx = rng.integers(0, n, size=(min(CHUNK, resamples - lo), n))
            boot[lo : lo + len(idx), :, j] = a[:, idx].mean(axis=2).T
    return point, boot, {t: a.shape[1] for t, a in aligned.items()}


def _rp(means: np.ndarray, i: int) -> np.ndarray:
    """RP of model i against model 0 (dense) from per-task means (..., models, tasks)."""
    return 100 * means[..., i, :].mean(axis=-1) / means[..., 0, :].mean(axis=-1)


def _interval(values: np.ndarray, level: float) -> dict:
    """The percentile interval over the resamples where the value is defined (a draw of only wrong dense
    answers leaves RP undefined: with few documents), and how many were not."""
    if not 0 < level < 1:
        raise ValueError(f"bootstrap.level={level!r} must be in (0, 1)")
    a, ok = (1 - level) / 2, values[np.isfinite(values)]
    ci = [float(np.quantile(ok, a)), float(np.quantile(ok, 1 - a))] if len(ok) else None
    return {"ci": ci, "undefined_resamples": int(len(values) - len(ok))}


def rp_interval(dense: dict, pruned: dict, metric: str = "acc", resamples: int = 1000, seed: int = 0,
                level: float = 0.95) -> dict:
    """RP on the documents both scored, with its paired bootstrap interval."""
    point, boot, docs = task_means([dense, pruned], metric, resamples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"rp": float(_rp(point, 1)), **_interval(_rp(boot, 1), level), "level": level,
                "resamples": resamples, "seed": seed, "documents": sum(docs.values())}


def drp_interval(dense: dict, run: dict, reference: dict, metric: str = "acc", resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict:
    """dRP = RP(run) - RP(reference), both against the same dense model, on the documents all three scored,
    with its paired bootstrap interval (one draw of documents for all three models)."""
    point, boot, docs = task_means([dense, run, reference], metric, resamples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"drp": float(_rp(point, 1) - _rp(point, 2)), **_interval(_rp(boot, 1) - _rp(boot, 2), level),
                "level": level, "resamples": resamples, "seed": seed, "documents": sum(docs.values())}
