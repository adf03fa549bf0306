"""Patches applied to the residual stream at a pruning interface, and the wrapper that holds them.

A patch is a small ``nn.Module`` mapping hidden states (..., d) -> (..., d) with a float32 weight, computed in
the hidden states' dtype (``precision="float32"``: in float32 whatever the model's dtype).  :class:`Patched` wraps the module that receives the interface's hidden state (the first kept
layer after the removed block, or the final norm) and applies the patch to its input, so the patch is part
of the model: it moves with ``.to()``, shows in ``state_dict()`` and runs under ``generate`` with a KV cache.

Variants (``PATCHES``, one config each in conf/patch/):
* ``none``: nothing inserted.
* ``diag``: channel-wise scaling, r = mean|x_e| / mean|x_s| in the plain basis.
* ``linearpatch`` (LinearPatch, arXiv 2505.24680): P = H diag(r) Hᵀ with H an orthonormal Hadamard matrix and
  r = mean|x_e H| / mean|x_s H|, measured in the Hadamard basis, where the massive per-token outliers are
  spread over all channels.
* ``prunecomp`` (Prune&Comp, arXiv 2507.18212): the layers are removed one at a time, each round scoring
  the layers of the pruned, compensated model and compensating the removal by one scalar (lp.prunecomp);
  here a scalar patch per interface, the product of its rounds' scalars (folded into the weights on save).
* ``replaceme`` (ReplaceMe, arXiv 2505.02819): a d×d map T fitted by least squares from the MLP output of
  layer s-1 to what the block adds to it, folded into that layer's down_proj: zero extra parameters
  (:class:`Fold`).
* ``lstsq``: the d×d map M minimising ||X_s M - X_e||² from the block's input to its output over calibration
  tokens, closed form from streamed Gram matrices (ridge ``ridge`` · mean diagonal). Training-free, like
  ReplaceMe, but not its estimator: a separate, more expressive d×d patch.
* ``streamline_ffn`` (LLM-Streamline, arXiv 2403.19135): the block replaced by one residual SwiGLU FFN,
  initialised from the block's first layer's MLP and trained with MSE to map X_s to X_e.
* ``streamline_layer`` (LLM-Streamline): the block replaced by one decoder layer, initialised from the block's
  first layer and trained with MSE to map X_s to X_e. It is a :class:`ReplacementLayer` that takes a place
  in the model's layer list (its own KV cache slot), not a patch on another layer's input.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .calibration import BoundaryStats, stream_block_io, stream_boundaries, tree_to
from .modules import ChannelScale, LinearPatch, ReplacementLayer, ResidualFFN, WeightPatch, unwrap
from .hadamard import CONSTRUCTIONS, hadamard
from .models import Layout, module_device
from .settings import Int, Number, OneOf, read


FIT_SAMPLES = Int(1, none_ok=True)  # patch.fit_samples: the calibration samples a fitted patch uses (null: all)


def _ratio(num: torch.Tensor, den: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return num / den.clamp_min(eps)


@dataclass
class PatchContext:
    """What a patch builder may use: calibration statistics, and the dense model with its calibration
    samples for builders that need the hidden states themselves (lstsq, streamline_*)."""

    stats: BoundaryStats
    settings: dict = field(default_factory=dict)  # the patch config: what the variant reads (ridge, epochs, lr, ...)
    model: nn.Module | None = None
    samples: torch.Tensor | None = None
    batch_size: int = 1
    fitted: dict = field(default_factory=dict)  # what selection fitted for the patch (prunecomp's scalars)
    seed: int = 0  # of the trained patches' batch order (the run's seed)

    def setting(self, name: str):
        return read(self.settings, "patch", name)

    def require_hidden_states(self) -> None:
        if self.model is None or self.samples is None:
            raise ValueError("this patch variant fits on hidden states: pass model and samples")

    def pairs(self, s: int, e: int):
        """Yield (x_s, x_e) float32 hidden-state batches (tokens, d) of the dense model."""
        self.require_hidden_states()
        for xs in stream_boundaries(self.model, self.samples, self.batch_size, progress=False):
            d = xs[s].shape[-1]
            yield xs[s].reshape(-1, d).float().cpu(), xs[e].reshape(-1, d).float().cpu()


@dataclass(frozen=True)
class PatchMethod:
    """What a patch variant is: its builder, and what the pipeline must do for it (read by the pipeline's
    stages, validation and ``prune=patched``; nothing else lists variants)."""

    build: Callable[[PatchContext, int, int], nn.Module | None]
    from_statistics: bool = False  # built from the one-pass statistics alone (so prune=patched can score it)
    needs_hidden_states: bool = False  # fitted on the block's input and output hidden states (a second pass)
    changes_earlier_layer: bool = False  # folds into layer s-1: the hidden states entering layer s change too
    replaces_block: bool = False  # selects n+1 layers and puts one trained layer in their place
    reads: dict = field(default_factory=dict)  # patch setting -> its rule (lp.settings), values in conf/patch/


PATCHES: dict[str, PatchMethod] = {}


def register(name: str, **capabilities):
    """Register a patch variant ``name`` (patch.variant=name): the one place a patch is declared, with the
    capabilities of :class:`PatchMethod` (``reads``: the patch.* settings it reads, each with its rule, which
    validation checks). What it saves as follows from the module it returns (lp.modules: a WeightPatch
    subclass with its own ``kind``)."""
    def wrap(fn):
        PATCHES[name] = PatchMethod(fn, **capabilities)
        return fn
    return wrap


register("none", from_statistics=True)(lambda ctx, s, e: None)


@register("diag", from_statistics=True)
def diag_patch(ctx: PatchContext, s: int, e: int) -> ChannelScale:
    return ChannelScale(_ratio(ctx.stats.abs_mean[e], ctx.stats.abs_mean[s]))


@register("linearpatch", from_statistics=True, reads={"hadamard": OneOf(tuple(sorted(CONSTRUCTIONS)))})
def linear_patch(ctx: PatchContext, s: int, e: int) -> LinearPatch:
    """LinearPatch as the official code builds it (chenxinrui-tsinghua/LinearPatch): P = H diag(r) Hᵀ
    (block_scaling.py, generate_symmetric_matrix, lines 6-10), r the per-channel mean |x H| of the input of
    layer e over that of layer s (layer_select.py, get_scale_params, lines 11-15 and 33-34), applied to the
    output of layer s-1, i.e. the input of the first kept layer (block_scaling.py, register_linear_patch,
    lines 28-44). Differences: r here is the ratio of means over all calibration tokens, the official code
    averages 128 per-sample ratios (line 46). H is ``patch.hadamard``'s: ``quarot`` the official code's matrix
    (rotate_utils/hadamard_utils.py), ``paley`` lp's Sylvester x Paley matrix; they differ for sizes that are
    not powers of two (576 = 36 x 16). H is the matrix the statistics were measured with (``stats.hadamard``);
    a ``hadamard`` setting that names another is refused (the pipeline keys the calibration cache on it)."""
    r = _ratio(ctx.stats.abs_mean_rot[e], ctx.stats.abs_mean_rot[s])
    basis = ctx.stats.hadamard
    if ctx.settings.get("hadamard", basis) not in CONSTRUCTIONS:
        raise ValueError(f"patch.hadamard={ctx.settings['hadamard']!r} is not one of {list(CONSTRUCTIONS)}")
    if ctx.settings.get("hadamard", basis) != basis:  # no setting (a direct call): the statistics' basis
        raise ValueError(f"patch.hadamard={ctx.settings['hadamard']}, but the calibration statistics were measured "
                         f"in the {basis!r} basis: recalibrate with hadamard_construction={ctx.settings['hadamard']!r}")
    H = hadamard(r.numel(), torch.float32, construction=basis)
    return LinearPatch(H @ torch.diag(r) @ H.T)


@register("prunecomp")
def prunecomp_patch(ctx: PatchContext, s: int, e: int) -> ChannelScale:
    """Prune&Comp's compensation of the interface (s, e): the product of the scalars of the rounds that
    removed its layers (``ctx.fitted['prunecomp']``, dense layer -> scalar, from lp.prunecomp.select). The
    official code folds each scalar into the embeddings and the branch outputs of every layer before the
    removed one (magcomp.py fuse_scale, lines 44-49); with pre-norm layers that equals scaling the stream
    entering the first kept layer, which is what this patch does (save_model folds it back into weights)."""
    scales = ctx.fitted.get("prunecomp")
    if scales is None:
        raise ValueError("patch=prunecomp compensates Prune&Comp's iterative removal: its scalars come from "
                         "lp.prunecomp.select (the pipeline runs it for patch=prunecomp)")
    return ChannelScale(torch.tensor([math.prod(scales[i] for i in range(s, e))], dtype=torch.float32))


@dataclass
class Fold:
    """A d×d map T folded into the linear map that ends the MLP of dense layer ``layer``: the layer then
    writes ``mlp(x) T`` to the stream (weight Tᵀ W, bias b T). Adds no parameter; ``pruning.pruned`` puts the
    original module back on exit, and a saved model carries the folded weights."""

    layer: int
    T: torch.Tensor
    kind: str = "replaceme"
    target: str = "mlp.down_proj"

    def apply(self, layers: nn.ModuleList) -> None:
        owner_name, name = self.target.rsplit(".", 1)
        owner = unwrap(layers[self.layer]).get_submodule(owner_name)
        old = getattr(owner, name)
        T = self.T.to(old.weight.device, torch.float64)
        new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                        device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(T.T @ old.weight.double())
            if old.bias is not None:
                new.bias.copy_(old.bias.double() @ T)
        new.requires_grad_(False)
        setattr(owner, name, new)


@register("replaceme", needs_hidden_states=True, changes_earlier_layer=True,
          reads={"ridge": Number(positive=False), "fit_samples": FIT_SAMPLES})
def replaceme_patch(ctx: PatchContext, s: int, e: int) -> Fold:
    """ReplaceMe's least-squares estimator (mts-ai/ReplaceMe ReplaceMe/lstsq.py): on calibration tokens, M the
    MLP output of layer s-1 and Y = x_s - M the stream before it (lines 185-196), T = (MᵀM + αI)⁻¹ Mᵀ(x_e - Y)
    in float64 (lines 201-222: a2 = h_n + mlp - h_i), folded into layer s-1's down_proj as Tᵀ W (lines 240-246).
    The block itself is chosen by ReplaceMe's last-token angular distance (``+experiment=replaceme``:
    prune=angular). Differences: lp's calibration samples (official: its calib dataset, padded batches whose
    padding tokens also enter the fit); ``ridge`` is α as a fraction of MᵀM's mean diagonal (official α = 0)."""
    ctx.require_hidden_states()
    if s == 0:
        raise ValueError("patch=replaceme folds its map into layer s-1, but the block starts at layer 0: use a "
                         "selection whose block starts at 1 or later (ReplaceMe's own starts at 1 or later)")
    layout = Layout(ctx.model)
    layer = unwrap(layout.layers[s - 1])
    names = dict(layer.named_modules())
    if not isinstance(names.get("mlp.down_proj"), nn.Linear) or layout.family.post_branch_norms:
        raise ValueError(f"patch=replaceme needs layers whose MLP ends in mlp.down_proj added to the stream "
                         f"(LLaMA, Qwen, Mistral layouts); {type(layer).__name__} does not")
    got = {}
    hook = names["mlp"].register_forward_hook(lambda m, a, out: got.__setitem__("mlp", out))
    gram = cross = None
    try:
        for xs in stream_boundaries(ctx.model, ctx.samples, ctx.batch_size, progress=False):
            d = xs[s].shape[-1]
            M = got["mlp"].reshape(-1, d).double().cpu()
            target = (xs[e].reshape(-1, d).double().cpu() - xs[s].reshape(-1, d).double().cpu()) + M
            gram = M.T @ M if gram is None else gram + M.T @ M
            cross = M.T @ target if cross is None else cross + M.T @ target
    finally:
        hook.remove()
    ridge = float(ctx.setting("ridge")) * gram.diagonal().mean()
    T = torch.linalg.lstsq(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), cross).solution
    return Fold(s - 1, T)


@register("lstsq", needs_hidden_states=True, reads={"ridge": Number(positive=False), "fit_samples": FIT_SAMPLES})
def lstsq_patch(ctx: PatchContext, s: int, e: int) -> LinearPatch:
    gram = cross = None
    for xs, xe in ctx.pairs(s, e):
        xs, xe = xs.double(), xe.double()
        gram = xs.T @ xs if gram is None else gram + xs.T @ xs
        cross = xs.T @ xe if cross is None else cross + xs.T @ xe
    ridge = float(ctx.setting("ridge")) * gram.diagonal().mean()
    M = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), cross)
    return LinearPatch(M.float())


def _fit_mse(net: nn.Module, n_items: int, batch: int, loss_of, *, lr: float, epochs: int, seed: int,
             weight_decay: float = 0.0, min_lr: float | None = None, clip: float | None = None,
             desc: str) -> nn.Module:
    """Train ``net`` (in float32) for ``epochs`` passes over ``n_items`` items in shuffled batches of ``batch``
    (lp.training.train: AdamW, cosine from ``lr`` to ``min_lr`` or constant if None, gradient norm clipped at
    ``clip`` if given); ``loss_of(net, indices)`` is the MSE of one batch. Returns it frozen. A non-finite loss
    is an error."""
    from .training import train

    net.float()
    g = torch.Generator().manual_seed(seed)
    train(list(net.parameters()), lambda epoch: torch.randperm(n_items, generator=g).split(batch),
          lambda idx: loss_of(net, idx), steps_per_epoch=math.ceil(n_items / batch), lr=float(lr),
          weight_decay=float(weight_decay), epochs=int(epochs), min_lr=None if min_lr is None else float(min_lr),
          clip=None if clip is None else float(clip), nonfinite="raise", lr_setting="patch.lr", desc=desc)
    return net.requires_grad_(False)


@register("streamline_ffn", needs_hidden_states=True,
          reads={"lr": Number(), "epochs": Int(0), "token_batch": Int(1), "fit_samples": FIT_SAMPLES})
def streamline_ffn_patch(ctx: PatchContext, s: int, e: int) -> ResidualFFN:
    """LLM-Streamline's FFN replacement as lp builds it: x + mlp(norm(x)) with the norm and SwiGLU MLP of layer s,
    trained with MSE. Not the official code's: its README trains Transformer layers (``streamline_layer``) and
    calls them better than an FFN or SwiGLU; its FFN example (examples/mlp_mseloss_train_without_memory_issue,
    modeling_llama.py lines 59-70) is a randomly initialised ReLU MLP d -> 4d -> d without residual."""
    layout = Layout(ctx.model)
    layer = unwrap(layout.layers[s])
    dev, dtype = module_device(layer), next(layer.parameters()).dtype
    net = ResidualFFN(*map(copy.deepcopy, layout.mlp_branch(layer))).to(dev)
    xs, xe = map(torch.cat, zip(*ctx.pairs(s, e)))

    def loss_of(net, idx):
        return nn.functional.mse_loss(net(xs[idx].to(dev)), xe[idx].to(dev))

    # lp's recipe: AdamW at a constant lr, no weight decay, no clipping (the settings it reads: lr, epochs, token_batch)
    return _fit_mse(net, len(xs), int(ctx.setting("token_batch")), loss_of, lr=ctx.setting("lr"),
                    epochs=ctx.setting("epochs"), seed=ctx.seed, desc="streamline_ffn").to(dtype)


@register("streamline_layer", needs_hidden_states=True, replaces_block=True,
          reads={"lr": Number(), "min_lr": Number(none_ok=True), "weight_decay": Number(positive=False),
                 "clip": Number(none_ok=True), "epochs": Int(0), "fit_samples": FIT_SAMPLES})
def streamline_layer_patch(ctx: PatchContext, s: int, e: int) -> ReplacementLayer:
    """LLM-Streamline's layer replacement as its official code (RUCKBReasoning/LLM-Streamline): the block
    [s, e) holds n+1 layers (the pipeline selects with interval n+1, train_mseloss.py line 120); one decoder
    layer initialised from layer s (train_lightweightnetwork.py, init_layer, lines 147-179) is trained with MSE
    from the block's input to its output (get_train_data.py lines 38-39; lines 211-252: AdamW lr 2e-4, weight
    decay 1e-3, cosine schedule to 5e-5, gradient norm clipped at 5) and takes the block's place (train_mseloss.py
    lines 16-52). Differences: ``epochs`` passes over lp's calibration samples, one batch a step (official: one
    epoch over 100,000 SlimPajama sequences of 2048 tokens, 16 batches of 8 accumulated a step, 0.5% warm-up,
    the best state by validation MSE kept); the layer is given the model's attention mask and position
    embeddings (official: position ids only)."""
    ctx.require_hidden_states()
    layer = unwrap(Layout(ctx.model).layers[s])
    dev, dtype = module_device(layer), next(layer.parameters()).dtype
    net = copy.deepcopy(layer).to(dev)
    batches = list(stream_block_io(ctx.model, ctx.samples, s, e, ctx.batch_size))

    def loss_of(net, idx):
        xs, kwargs, xe = batches[int(idx[0])]
        out = net(xs.to(dev, torch.float32), **tree_to(kwargs, dev, torch.float32))
        out = out[0] if isinstance(out, tuple) else out
        return nn.functional.mse_loss(out, xe.to(dev, torch.float32))

    trained = _fit_mse(net, len(batches), 1, loss_of, lr=ctx.setting("lr"), min_lr=ctx.setting("min_lr"),
                       weight_decay=ctx.setting("weight_decay"), clip=ctx.setting("clip"),
                       epochs=ctx.setting("epochs"), seed=ctx.seed, desc="streamline_layer")
    return ReplacementLayer(trained.to(dtype))


def build_patch(variant: str, ctx: PatchContext | BoundaryStats, s: int, e: int) -> nn.Module | None:
    """The patch for joining boundary ``s`` to boundary ``e`` (None for ``none``)."""
    if variant not in PATCHES:
        raise ValueError(f"patch.variant={variant!r} is not one of {sorted(PATCHES)}")
    if isinstance(ctx, BoundaryStats):
        ctx = PatchContext(ctx)
    patch = PATCHES[variant].build(ctx, s, e)
    if isinstance(patch, WeightPatch) and "precision" in ctx.settings:  # else the module's own (WeightPatch's)
        patch.precision = ctx.settings["precision"]
    return patch
