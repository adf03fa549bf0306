"""Patches applied to the residual stream at a pruning interface, and the wrapper that holds them.

A patch is a small ``nn.Module`` mapping hidden states (..., d) -> (..., d), computed in float32 whatever the
model's dtype.  :class:`Patched` wraps the module that receives the interface's hidden state (the first kept
layer after the removed block, or the final norm) and applies the patch to its input, so the patch is part
of the model: it moves with ``.to()``, shows in ``state_dict()`` and runs under ``generate`` with a KV cache.

Variants (``PATCHES``, one config each in conf/patch/):
* ``none``: nothing inserted.
* ``diag``: channel-wise scaling, r = mean|x_e| / mean|x_s| in the plain basis.
* ``linearpatch`` (LinearPatch, arXiv 2505.24680): P = H diag(r) Hᵀ with H an orthonormal Hadamard matrix and
  r = mean|x_e H| / mean|x_s H|, measured in the Hadamard basis, where the massive per-token outliers are
  spread over all channels.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .calibration import BoundaryStats
from .hadamard import hadamard


class ChannelScale(nn.Module):
    """x -> x * r (diagonal patch)."""

    kind = "diag"

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return (x.to(w.device, torch.float32) * w).to(x.dtype)


class LinearPatch(nn.Module):
    """x -> x P with a dense d×d matrix P (row-vector convention, as hidden states are stored)."""

    kind = "linearpatch"

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(matrix.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return (x.to(w.device, torch.float32) @ w).to(x.dtype)


PATCH_MODULES = {m.kind: m for m in (ChannelScale, LinearPatch)}


class Patched(nn.Module):
    """Applies ``patch`` to the hidden state entering ``inner`` (a decoder layer or the final norm)."""

    def __init__(self, patch: nn.Module, inner: nn.Module):
        super().__init__()
        self.patch = patch
        self.inner = inner

    def forward(self, *args, **kwargs):
        if args:
            args = (self.patch(args[0]),) + args[1:]
        else:
            kwargs["hidden_states"] = self.patch(kwargs["hidden_states"])
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):  # attributes that model code reads off a layer (attention_type, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def unwrap(module: nn.Module) -> nn.Module:
    return module.inner if isinstance(module, Patched) else module


def _ratio(num: torch.Tensor, den: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return num / den.clamp_min(eps)


def diag_patch(stats: BoundaryStats, s: int, e: int) -> ChannelScale:
    return ChannelScale(_ratio(stats.abs_mean[e], stats.abs_mean[s]))


def linear_patch(stats: BoundaryStats, s: int, e: int) -> LinearPatch:
    r = _ratio(stats.abs_mean_rot[e], stats.abs_mean_rot[s])
    H = hadamard(r.numel(), torch.float32)
    return LinearPatch(H @ torch.diag(r) @ H.T)


PATCHES: dict[str, Callable[[BoundaryStats, int, int], nn.Module | None]] = {
    "none": lambda stats, s, e: None,
    "diag": diag_patch,
    "linearpatch": linear_patch,
}


def build_patch(variant: str, stats: BoundaryStats, s: int, e: int) -> nn.Module | None:
    """The patch for joining boundary ``s`` to boundary ``e`` (None for ``none``)."""
    if variant not in PATCHES:
        raise ValueError(f"patch.variant={variant!r} is not one of {sorted(PATCHES)}")
    return PATCHES[variant](stats, s, e)
