"""The modules a patch is made of, and the wrappers that put them into a model (torch only: what
``lp.calibration``, ``lp.pruning`` and ``lp.patches`` share, so that none of them imports another back).

A weight patch (:class:`ChannelScale`, :class:`LinearPatch`, or any subclass of :class:`WeightPatch` with its
own ``kind``) is rebuilt from its one weight when a saved model loads (``PATCH_MODULES``, filled as the classes
are defined). :class:`Patched` applies a patch to the input of the module it wraps; :class:`ReplacementLayer`
takes a removed block's place in the layer list.
"""
from __future__ import annotations

import torch
from torch import nn


PRECISIONS = ("float32", "model")
MODEL_PRECISION = "model"  # a patch computes in the hidden states' dtype unless patch.precision says float32
PATCH_MODULES: dict[str, type] = {}  # kind -> WeightPatch subclass, rebuilt from its one weight on load


class WeightPatch(nn.Module):
    """A patch with one float32 weight. ``precision``: ``model`` (the default) computes in the hidden states'
    dtype (bf16 on a GPU: tensor cores with float32 accumulation; the float32 weight is the master copy that
    distillation updates, as under autocast); ``float32`` computes in float32 whatever the model's dtype,
    about 11x slower in a bf16 model (README, Speed)."""

    kind: str | None = None  # the name it is saved as; a subclass with its own kind is registered

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            PATCH_MODULES[cls.kind] = cls

    def __init__(self, weight: torch.Tensor, precision: str = MODEL_PRECISION):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.precision = precision

    @property
    def precision(self) -> str:
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        if value not in PRECISIONS:
            raise ValueError(f"patch.precision={value!r} is not one of {list(PRECISIONS)}")
        self._precision = value

    def op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if self.precision == "float32" else x.dtype
        with torch.autocast(x.device.type, enabled=False):  # the chosen precision, also under mixed precision
            return self.op(x.to(self.weight.device, dtype), self.weight.to(dtype)).to(x.dtype)


class ChannelScale(WeightPatch):
    """x -> x * r (diagonal patch; a 1-element r is one scalar for all channels)."""

    kind = "diag"

    def op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * w


class LinearPatch(WeightPatch):
    """x -> x P with a dense d×d matrix P (row-vector convention, as hidden states are stored)."""

    kind = "linearpatch"

    def op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w


class ResidualFFN(nn.Module):
    """x -> x + mlp(norm(x)): a decoder layer without attention (LLM-Streamline's FFN replacement)."""

    kind = "streamline_ffn"

    def __init__(self, norm: nn.Module, mlp: nn.Module):
        super().__init__()
        self.norm, self.mlp = norm, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class _Wrapper(nn.Module):
    """Stands where a decoder layer (or the final norm) stood; model code reads attributes off layers
    (``attention_type``, ...), so unknown attributes are looked up on ``inner``."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


class Patched(_Wrapper):
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


class ReplacementLayer(_Wrapper):
    """A trained decoder layer standing in for a removed block (LLM-Streamline's layer replacement)."""

    kind = "streamline_layer"

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def unwrap(module: nn.Module) -> nn.Module:
    return module.inner if isinstance(module, _Wrapper) else module
