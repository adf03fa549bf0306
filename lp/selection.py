"""Layer-selection metrics: which decoder layers to remove.

Each metric is a function registered in ``METRICS`` under its config name.  It gets a
:class:`SelectionContext` and returns the sorted indices of the layers to remove.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .calibration import BoundaryStats


@dataclass
class SelectionContext:
    stats: BoundaryStats
    n: int
    start: int | None = None  # force a contiguous block [start, start + n)
    indices: list[int] | None = None  # for `manual`
    seed: int = 0
    extra: dict = field(default_factory=dict)  # metric-specific inputs (model, samples, ...)

    @property
    def num_layers(self) -> int:
        return self.stats.num_layers


METRICS: dict[str, Callable[[SelectionContext], list[int]]] = {}


def register(name: str):
    def wrap(fn):
        METRICS[name] = fn
        return fn
    return wrap


def validate_n(n: int, num_layers: int) -> None:
    if not isinstance(n, int) or n < 0 or n >= num_layers:
        raise ValueError(f"prune.n={n!r} must be an integer in [0, {num_layers - 1}] for a model of {num_layers} layers")


def _block(ctx: SelectionContext, score: torch.Tensor, best=max) -> list[int]:
    """Contiguous block [s, s+n) whose score[s] is best (or the forced ``start``)."""
    L, n = ctx.num_layers, ctx.n
    if n == 0:
        return []
    if ctx.start is not None:
        if not 0 <= ctx.start <= L - n:
            raise ValueError(f"prune.start={ctx.start} must be in [0, {L - n}] to remove {n} of {L} layers")
        s = ctx.start
    else:
        candidates = list(range(0, L - n + 1))
        s = best(candidates, key=lambda i: score[i].item())
    return list(range(s, s + n))


@register("cosine")
def cosine(ctx: SelectionContext) -> list[int]:
    """LLM-Streamline / LinearPatch: the block whose input and output are most similar (token-wise cosine)."""
    L, n = ctx.num_layers, ctx.n
    score = torch.tensor([ctx.stats.cos[s, s + n].item() for s in range(L - n + 1)])
    return _block(ctx, score, best=max)


@register("angular")
def angular(ctx: SelectionContext) -> list[int]:
    """Gromov et al.: the block with the smallest mean angular distance arccos(cos)/pi."""
    L, n = ctx.num_layers, ctx.n
    score = torch.tensor([ctx.stats.angular[s, s + n].item() for s in range(L - n + 1)])
    return _block(ctx, score, best=min)


def block_influence_scores(stats: BoundaryStats) -> torch.Tensor:
    """ShortGPT's BI_i = 1 - E[cos(x_i, x_{i+1})] for every layer i."""
    L = stats.num_layers
    return 1 - torch.tensor([stats.cos[i, i + 1].item() for i in range(L)])


@register("block_influence")
def block_influence(ctx: SelectionContext) -> list[int]:
    """ShortGPT: the n layers with the lowest Block Influence (not necessarily contiguous)."""
    bi = block_influence_scores(ctx.stats)
    return sorted(torch.argsort(bi, stable=True)[: ctx.n].tolist())


@register("last")
def last(ctx: SelectionContext) -> list[int]:
    """Control: the last n layers."""
    return list(range(ctx.num_layers - ctx.n, ctx.num_layers))


@register("manual")
def manual(ctx: SelectionContext) -> list[int]:
    """Control: explicit indices (prune.indices); n is their count."""
    idx = sorted(set(ctx.indices or []))
    if len(idx) != ctx.n or any(not 0 <= i < ctx.num_layers for i in idx):
        raise ValueError(
            f"prune.indices={ctx.indices} must hold prune.n={ctx.n} distinct layers in [0, {ctx.num_layers - 1}]"
        )
    return idx


@register("random")
def random(ctx: SelectionContext) -> list[int]:
    """Sanity floor: n layers drawn uniformly at random (seeded)."""
    g = torch.Generator().manual_seed(ctx.seed)
    return sorted(torch.randperm(ctx.num_layers, generator=g)[: ctx.n].tolist())


def select_layers(metric: str, ctx: SelectionContext) -> list[int]:
    if metric not in METRICS:
        raise ValueError(f"prune.metric={metric!r} is not one of {sorted(METRICS)}")
    validate_n(ctx.n, ctx.num_layers)
    return METRICS[metric](ctx)


def interfaces(removed: list[int]) -> list[tuple[int, int]]:
    """Contiguous removed runs as (s, e) pairs: layers [s, e) removed, boundary s joined to boundary e."""
    runs: list[tuple[int, int]] = []
    for i in sorted(removed):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
