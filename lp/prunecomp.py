"""Prune&Comp (arXiv 2507.18212): iterative layer removal with magnitude compensation.

The official code (chenxinrui-tsinghua/PruneAndComp, CosSim_BI.py lines 115-128, magcomp.py) removes one layer
per round: it scores the layers of the current, already compensated model with the pruning metric (Block
Influence there; any metric of lp.selection here), removes the best one, i, and compensates the magnitude gap
by one scalar, the mean over channels of the per-sample, per-channel ratio mean|x_{i+1}| / mean|x_i| of the
inputs of layers i+1 and i (magcomp.py get_scale_params, lines 20-36), which it folds into the embeddings and
the branch outputs of all layers before i (fuse_scale, lines 44-49).

During the rounds lp puts the scalars exactly where the official fold puts them, with forward hooks (the
embeddings' output and each kept layer's write to the stream scaled; no weight is touched), so that later
rounds measure the same magnitudes. For the pruned model itself, the fold equals (pre-norm layers being
scale-invariant) one scalar patch per interface, the product of the scalars of its rounds
(lp.patches.prunecomp_patch), which save_model folds back into the weights.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager

import torch

from .calibration import collect_stats, stream_boundaries
from .models import Layout
from .modules import unwrap
from .pruning import pruned

log = logging.getLogger(__name__)


@torch.no_grad()
def channel_ratio(model, samples: torch.Tensor, i: int, batch_size: int = 1) -> float:
    """The official statistic at boundaries i -> i+1 of ``model`` as it is: per sample, the per-channel mean
    |x| over tokens of boundary i+1 over that of boundary i; averaged over samples, then over channels."""
    total, n = None, 0
    for xs in stream_boundaries(model, samples, batch_size, progress=False):
        r = xs[i + 1].float().abs().mean(1) / xs[i].float().abs().mean(1).clamp_min(1e-8)  # (B, d)
        total = r.sum(0) if total is None else total + r.sum(0)
        n += r.shape[0]
    return (total / n).mean().item()


@contextmanager
def folded_scales(model, kept: list[int], scales: dict[int, float]):
    """The official fold as hooks on the pruned model: the embeddings scaled by every scalar, the branch
    outputs of kept dense layer j by the scalars of the layers removed after j."""
    factor = lambda j: math.prod(a for i, a in scales.items() if i > j)  # noqa: E731

    hooks = [model.get_input_embeddings().register_forward_hook(lambda m, a, out: out * factor(-1))]
    layout = Layout(model)
    for j, layer in zip(kept, layout.layers):
        if factor(j) != 1:
            hooks += [m.register_forward_hook(lambda m, a, out, f=factor(j): out * f)
                      for m in layout.stream_additions(unwrap(layer))]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def select(model, samples: torch.Tensor, n: int, pick, batch_size: int = 1, progress: bool = False
           ) -> tuple[list[int], dict[int, float]]:
    """n rounds of: score the compensated pruned model, remove one layer, compensate. ``pick(model, stats)``
    returns the index, in the model as it is, of the layer to remove (a selection metric with n = 1). Returns
    the removed dense layers and each one's scalar."""
    removed: list[int] = []
    scales: dict[int, float] = {}
    for r in range(n):
        kept = [j for j in range(Layout(model).num_layers) if j not in removed]
        with pruned(model, removed, lambda *_: None), folded_scales(model, kept, scales):
            stats = collect_stats(model, samples, batch_size, progress=progress)
            i = pick(model, stats)
            scale = channel_ratio(model, samples, i, batch_size)
        dense = kept[i]
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"Prune&Comp round {r}: the compensation of layer {dense} is {scale}: the hidden "
                             f"states are not finite or vanish")
        removed.append(dense)
        scales[dense] = scale
        log.info(f"Prune&Comp round {r}: removed layer {dense}, scalar {scale:.4f}")
    return sorted(removed), scales
