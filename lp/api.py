"""lp from Python, on a model you already have: the functions the Hydra runner's stages call, with plain arguments.

    import lp
    stats = lp.calibrate(model, tokenizer, texts, samples=128, seqlen=2048)     # one streamed pass
    removed = lp.choose_layers(stats, n=7, metric="cosine")                     # any name in lp.METRICS
    lp.prune(model, removed, stats, patch="linearpatch")                        # in place; any name in lp.PATCHES
    ppl = lp.perplexity(model, lp.windows(tokenizer, eval_text, seqlen=2048))
    results, outcomes = lp.evaluate_tasks(model, tokenizer, ["arc_easy_local"], limit=200,
                                          include_path=lp.local_task_dir())
    lp.save_pruned(model, tokenizer, "out/lp7", spec)                           # spec: what lp.prune returned

``lp.pruned(model, removed, make_patch)`` is the reversible form (a context manager) that sweeps use. Metrics that
run the model (ppl, sleb, taylor) take ``model=`` and ``samples=`` in :func:`choose_layers`; a metric's or a
patch's settings (conf/prune/*.yaml, conf/patch/*.yaml) are keyword arguments, their defaults those files' values.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import data as data_lib
from .calibration import BoundaryStats, collect_stats
from .hadamard import OFFICIAL
from .patches import PatchContext, build_patch
from .pruning import PruneSpec, prune_and_patch
from .selection import SelectionContext, select_layers

CONF = Path(__file__).resolve().parents[1] / "conf"


def _defaults(group: str, option: str) -> dict:
    """The values of conf/<group>/<option>.yaml where the checkout has them (the runner's defaults), else {}."""
    path = CONF / group / f"{option}.yaml"
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _text(texts) -> str:
    return texts if isinstance(texts, str) else "\n\n".join(texts)


def calibration_windows(tokenizer, texts, samples: int = 128, seqlen: int = 2048, seed: int = 0,
                        bos="auto") -> torch.Tensor:
    """``samples`` random windows of ``seqlen`` tokens from ``texts`` (a string or a list of documents), the
    runner's rule (lp.data.calibration_samples; BOS first where the tokenizer adds one, ``bos=auto``)."""
    stream = data_lib.token_stream(tokenizer, _text(texts))
    return data_lib.calibration_samples(stream, samples, seqlen, seed, data_lib.bos_id(tokenizer, bos))


def windows(tokenizer, texts, seqlen: int = 2048, max_windows: int | None = None, bos="auto") -> torch.Tensor:
    """Consecutive perplexity windows of ``texts``, the runner's rule (lp.data.eval_windows)."""
    stream = data_lib.token_stream(tokenizer, _text(texts))
    return data_lib.eval_windows(stream, seqlen, max_windows, data_lib.bos_id(tokenizer, bos))


def calibrate(model, tokenizer, texts, samples: int = 128, seqlen: int = 2048, seed: int = 0, bos="auto",
              batch_size: int = 1, hadamard: str = OFFICIAL, progress: bool = False) -> BoundaryStats:
    """The statistics every selection and training-free patch reads, in one pass over the calibration windows."""
    return collect_stats(model, calibration_windows(tokenizer, texts, samples, seqlen, seed, bos), batch_size,
                         progress=progress, hadamard_construction=hadamard)


def choose_layers(stats: BoundaryStats, n: int, metric: str = "cosine", seed: int = 0, model=None,
                  samples: torch.Tensor | None = None, batch_size: int = 1, **settings) -> list[int]:
    """The ``n`` layers that ``metric`` (a name in lp.METRICS) removes."""
    settings = {**_defaults("prune", metric), "metric": metric, "n": n, **settings}
    ctx = SelectionContext(stats=stats, n=n, start=settings.get("start"), indices=settings.get("indices"), seed=seed,
                           model=model, samples=samples, batch_size=batch_size, settings=settings)
    return select_layers(metric, ctx)


def prune(model, removed: list[int], stats: BoundaryStats, patch: str = "linearpatch", seed: int = 0,
          **settings) -> PruneSpec:
    """Remove ``removed`` from ``model`` in place and put ``patch`` (a training-free name in lp.PATCHES; "none"
    for none) at each interface; the spec :func:`lp.pruning.save_pruned` takes."""
    ctx = PatchContext(stats, settings={**_defaults("patch", patch), "variant": patch, **settings}, seed=seed)
    return prune_and_patch(model, removed, lambda s, e: build_patch(patch, ctx, s, e))
