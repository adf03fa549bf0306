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
* ``prunecomp`` (after Prune&Comp, 2025): one scalar per interface, mean ||x_e|| / mean ||x_s||.
* ``lstsq`` (training-free linear replacement, as ReplaceMe 2025): the d×d map M minimising ||X_s M - X_e||²
  over calibration tokens, closed form from streamed Gram matrices (ridge ``ridge`` · mean diagonal).
* ``streamline_ffn`` (LLM-Streamline, arXiv 2403.19135): the block replaced by one residual SwiGLU FFN,
  initialised from the block's first layer's MLP and trained with MSE to map X_s to X_e.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .calibration import BoundaryStats, stream_boundaries
from .hadamard import hadamard


class ChannelScale(nn.Module):
    """x -> x * r (diagonal patch; a 1-element r is one scalar for all channels)."""

    kind = "diag"

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        with torch.autocast(x.device.type, enabled=False):  # float32 math under mixed precision
            return (x.to(w.device, torch.float32) * w).to(x.dtype)


class LinearPatch(nn.Module):
    """x -> x P with a dense d×d matrix P (row-vector convention, as hidden states are stored)."""

    kind = "linearpatch"

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(matrix.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        with torch.autocast(x.device.type, enabled=False):
            return (x.to(w.device, torch.float32) @ w).to(x.dtype)


class ResidualFFN(nn.Module):
    """x -> x + mlp(norm(x)): a decoder layer without attention (LLM-Streamline's FFN replacement)."""

    kind = "streamline_ffn"

    def __init__(self, norm: nn.Module, mlp: nn.Module):
        super().__init__()
        self.norm, self.mlp = norm, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


PATCH_MODULES = {m.kind: m for m in (ChannelScale, LinearPatch)}  # rebuilt from their one weight


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


@dataclass
class PatchContext:
    """What a patch builder may use: calibration statistics, and the dense model with its calibration
    samples for builders that need the hidden states themselves (lstsq, streamline_*)."""

    stats: BoundaryStats
    settings: dict = field(default_factory=dict)  # the patch config (ridge, epochs, lr, ...)
    model: nn.Module | None = None
    samples: torch.Tensor | None = None
    batch_size: int = 1

    def pairs(self, s: int, e: int):
        """Yield (x_s, x_e) float32 hidden-state batches (tokens, d) of the dense model."""
        if self.model is None or self.samples is None:
            raise ValueError("this patch variant fits on hidden states: pass model and samples")
        for xs in stream_boundaries(self.model, self.samples, self.batch_size, progress=False):
            d = xs[s].shape[-1]
            yield xs[s].reshape(-1, d).float().cpu(), xs[e].reshape(-1, d).float().cpu()


def diag_patch(ctx: PatchContext, s: int, e: int) -> ChannelScale:
    return ChannelScale(_ratio(ctx.stats.abs_mean[e], ctx.stats.abs_mean[s]))


def linear_patch(ctx: PatchContext, s: int, e: int) -> LinearPatch:
    r = _ratio(ctx.stats.abs_mean_rot[e], ctx.stats.abs_mean_rot[s])
    H = hadamard(r.numel(), torch.float32)
    return LinearPatch(H @ torch.diag(r) @ H.T)


def prunecomp_patch(ctx: PatchContext, s: int, e: int) -> ChannelScale:
    return ChannelScale(_ratio(ctx.stats.norm_mean[e], ctx.stats.norm_mean[s]).reshape(1))


def lstsq_patch(ctx: PatchContext, s: int, e: int) -> LinearPatch:
    gram = cross = None
    for xs, xe in ctx.pairs(s, e):
        xs, xe = xs.double(), xe.double()
        gram = xs.T @ xs if gram is None else gram + xs.T @ xs
        cross = xs.T @ xe if cross is None else cross + xs.T @ xe
    ridge = float(ctx.settings.get("ridge", 1e-4)) * gram.diagonal().mean()
    M = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), cross)
    return LinearPatch(M.float())


def streamline_ffn_patch(ctx: PatchContext, s: int, e: int) -> ResidualFFN:
    from .models import Layout

    layer = Layout(ctx.model).layers[s]
    net = ResidualFFN(copy.deepcopy(unwrap(layer).post_attention_layernorm), copy.deepcopy(unwrap(layer).mlp)).float()
    net.requires_grad_(True)
    xs, xe = map(torch.cat, zip(*ctx.pairs(s, e)))
    opt = torch.optim.AdamW(net.parameters(), lr=float(ctx.settings.get("lr", 1e-4)), weight_decay=0.0)
    g = torch.Generator().manual_seed(int(ctx.settings.get("seed", 0)))
    bs = int(ctx.settings.get("token_batch", 1024))
    from tqdm.auto import tqdm

    for _ in tqdm(range(int(ctx.settings.get("epochs", 1))), desc="streamline_ffn"):
        for idx in torch.randperm(len(xs), generator=g).split(bs):
            loss = torch.nn.functional.mse_loss(net(xs[idx]), xe[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.requires_grad_(False)
    return net.to(next(layer.parameters()).dtype)


PATCHES: dict[str, Callable[[PatchContext, int, int], nn.Module | None]] = {
    "none": lambda ctx, s, e: None,
    "diag": diag_patch,
    "linearpatch": linear_patch,
    "prunecomp": prunecomp_patch,
    "lstsq": lstsq_patch,
    "streamline_ffn": streamline_ffn_patch,
}
NEEDS_HIDDEN_STATES = {"lstsq", "streamline_ffn"}


def build_patch(variant: str, ctx: PatchContext | BoundaryStats, s: int, e: int) -> nn.Module | None:
    """The patch for joining boundary ``s`` to boundary ``e`` (None for ``none``)."""
    if variant not in PATCHES:
        raise ValueError(f"patch.variant={variant!r} is not one of {sorted(PATCHES)}")
    if isinstance(ctx, BoundaryStats):
        ctx = PatchContext(ctx)
    return PATCHES[variant](ctx, s, e)
