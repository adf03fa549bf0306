"""Structured width pruning: LLM-Pruner (Ma et al., 2023), block-wise, with first-order Taylor importance.

The rule, as the official code runs it for LLaMA-3 (github horseee/LLM-Pruner, llama3.py; the README's command:
``--block_wise --block_{attention,mlp}_layer_start 4 --block_{attention,mlp}_layer_end 30 --pruner_type taylor
--taylor param_first``, and the defaults ``--grouping_strategy sum --num_examples 10 --iterative_steps 1``):

- The calibration loss: ``model(x, labels=x).loss`` on ``num_examples`` = 10 samples of 64 tokens, one
  backward (llama3.py, lines 131-152: ``get_examples('bookcorpus', tokenizer, args.num_examples, seq_len=64)``).
- The salience of a weight is ``|w * dL/dw|`` (``param_first``: hf_llama_pruner.py, TaylorImportance, lines
  266-288: ``salience = layer.weight * layer.weight.grad``, then ``salience.abs().sum(1)`` for output channels
  and ``.sum(0)`` for input channels); biases and norms do not count.
- Coupled channels are pruned together and their importance is the SUM over the group (``grouping_strategy
  sum``, ``_reduce``, line 221): an MLP channel is a row of gate_proj and of up_proj and a column of down_proj; an
  attention unit is one key/value head (``consecutive_groups = {k_proj: head_dim}``, roots ``k_proj``:
  llama3.py, lines 107-115) with the query heads that attend to it (the GQA expand mapping of commit aaab7ba)
  and their columns of o_proj.
- Local pruning (``global_pruning`` off): every layer in the range loses the same fraction ``ratio`` of its
  units, ``n_pruned = C - int(C * (1 - ratio))`` channels (metapruner.py, prune_local, lines 249-252), in
  whole heads for attention (``n_pruned // head_dim``, line 274); the lowest-importance units go. Layers
  before ``protect_first`` (4) and the last ``protect_last`` (2) keep their width (layers 4-29 of 32).

lp's deliberate differences (docs/methods.md): the samples are the run's calibration data (Brown by default),
not BookCorpus; the ratio is, unless given, the largest whose removed parameters stay within ``prune.n``
decoder layers' worth, so that one table compares methods at (at most) the same parameter count; no LoRA
recovery stage (the LinearPatch paper's LLM-Pruner rows stand beside training-free methods).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .models import Layout

GRID = 10_000  # ratios tried when matching a parameter budget: k / GRID


@dataclass(frozen=True)
class Unit:
    """One layer's prunable widths: key/value heads (each with its query heads) and MLP channels."""

    kv_heads: int
    head_dim: int
    group: int  # query heads per key/value head
    channels: int
    head_params: int  # parameters one key/value head group holds (q, k, v rows, biases, o columns)
    channel_params: int  # parameters one MLP channel holds (gate and up rows, down column, biases)


def _modules(layout: Layout, i: int) -> dict[str, nn.Linear]:
    """Layer ``i``'s projections by role (q, k, v, o, gate, up, down), where its layout says they are."""
    found = {k: getattr(owner, name, None) for k, (owner, name) in layout.projections(i).items()}
    missing = [path for role, path in layout.family.projections if not isinstance(found[role], nn.Linear)]
    if missing:
        raise ValueError(f"prune=llm_pruner slices each layer's {', '.join(p for _, p in layout.family.projections)} "
                         f"(nn.Linear); layer {i} ({type(layout.layers[i]).__name__}) lacks {missing}")
    return found


def unit_of(layout: Layout, i: int) -> Unit:
    m = _modules(layout, i)
    attn = layout.projections(i)["q"][0]
    hidden = m["q"].in_features
    head_dim = getattr(attn, "head_dim", None) or m["q"].out_features // attn.config.num_attention_heads
    kv = m["k"].out_features // head_dim
    group = m["q"].out_features // m["k"].out_features
    bias = lambda lin: lin.bias is not None  # noqa: E731
    head = head_dim * (group + 2) * hidden + hidden * head_dim * group + head_dim * (
        group * bias(m["q"]) + bias(m["k"]) + bias(m["v"]))
    channel = 3 * hidden + bias(m["gate"]) + bias(m["up"])
    return Unit(kv, head_dim, group, m["gate"].out_features, head, channel)


def pruned_counts(unit: Unit, ratio: float) -> tuple[int, int]:
    """(key/value heads, MLP channels) that LLM-Pruner's local rule removes from a layer at ``ratio``."""
    C = unit.kv_heads * unit.head_dim
    heads = (C - int(C * (1 - ratio))) // unit.head_dim
    return heads, unit.channels - int(unit.channels * (1 - ratio))


def pruned_layers(num_layers: int, protect_first: int, protect_last: int) -> list[int]:
    layers = list(range(protect_first, num_layers - protect_last))
    if not layers:
        raise ValueError(f"prune.protect_first={protect_first} and prune.protect_last={protect_last} leave no layer "
                         f"of {num_layers} to prune: their sum must be below the layer count")
    return layers


def ratio_for(units: list[Unit], budget: int) -> float:
    """The largest ratio (a multiple of 1/GRID, below 1: every layer keeps a head and a channel) whose removed
    parameters stay within ``budget``."""
    def removed(r: float) -> int:
        total = 0
        for u in units:
            h, c = pruned_counts(u, r)
            total += h * u.head_params + c * u.channel_params
        return total

    best = 0.0
    for k in range(GRID):  # removed() steps up with r: keep the last one within the budget
        r = k / GRID
        if any(pruned_counts(u, r)[0] >= u.kv_heads or pruned_counts(u, r)[1] >= u.channels for u in units):
            break
        if removed(r) > budget:
            break
        best = r
    return best


def importance(model: nn.Module, samples: torch.Tensor, layers: list[int], batch_size: int) -> dict[int, dict]:
    """Per layer: the Taylor importance (param_first, summed over each coupled group) of every key/value head
    and every MLP channel, from one calibration loss over ``samples`` (batches averaged into the mean loss of
    the whole set, as one batch of them would give)."""
    layout = Layout(model)
    mods = {i: _modules(layout, i) for i in layers}
    weights = [m.weight for ms in mods.values() for m in ms.values()]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    try:
        device = next(model.parameters()).device
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size].to(device)
            with torch.enable_grad():
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                (loss * len(batch) / len(samples)).backward()
        out = {}
        for i, m in mods.items():
            s = {k: (lin.weight * lin.weight.grad).abs().float() for k, lin in m.items()}
            u = unit_of(layout, i)
            d, g = u.head_dim, u.group
            q_rows = s["q"].sum(1).view(u.kv_heads, g * d).sum(1)  # query heads h*g .. h*g+g-1 per kv head h
            o_cols = s["o"].sum(0).view(u.kv_heads, g * d).sum(1)
            kv = s["k"].sum(1).view(u.kv_heads, d).sum(1) + s["v"].sum(1).view(u.kv_heads, d).sum(1)
            out[i] = {"heads": (q_rows + o_cols + kv).cpu(),
                      "channels": (s["gate"].sum(1) + s["up"].sum(1) + s["down"].sum(0)).cpu()}
        return out
    finally:
        for w, flag in zip(weights, flags):
            w.grad = None
            w.requires_grad_(flag)


@dataclass
class WidthPlan:
    """What LLM-Pruner keeps: per pruned layer, the kept key/value heads and MLP channels (sorted indices)."""

    ratio: float
    heads: dict[int, list[int]]
    channels: dict[int, list[int]]

    def record(self) -> dict:
        """What the run's record keeps: the ratio, and per layer the kept key/value heads and channel count."""
        return {"ratio": self.ratio, "layers": {str(i): {"kv_heads": self.heads[i], "channels": len(self.channels[i])}
                                                 for i in self.heads}}

    def shapes(self) -> dict[str, dict[str, int]]:
        """Per layer, how many key/value heads and channels it keeps (what a saved model records)."""
        return {str(i): {"kv_heads": len(self.heads[i]), "channels": len(self.channels[i])} for i in self.heads}


def plan(model: nn.Module, samples: torch.Tensor, n: int, ratio: float | None, protect_first: int, protect_last: int,
         batch_size: int = 1) -> WidthPlan:
    """LLM-Pruner's block-wise plan: at ``ratio``, or (None) at the largest ratio within ``n`` layers' parameters."""
    layout = Layout(model)
    layers = pruned_layers(layout.num_layers, protect_first, protect_last)
    units = {i: unit_of(layout, i) for i in layers}
    if ratio is None:
        per_layer = sum(p.numel() for p in layout.layers[0].parameters())
        ratio = ratio_for(list(units.values()), n * per_layer)
    imp = importance(model, samples, layers, batch_size)
    heads, channels = {}, {}
    for i in layers:
        h, c = pruned_counts(units[i], ratio)
        heads[i] = sorted(torch.argsort(imp[i]["heads"], stable=True)[h:].tolist())
        channels[i] = sorted(torch.argsort(imp[i]["channels"], stable=True)[c:].tolist())
    return WidthPlan(ratio, heads, channels)


def _sliced(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.detach()
    w = w.index_select(0, rows.to(w.device)) if rows is not None else w
    w = w.index_select(1, cols.to(w.device)) if cols is not None else w
    b = lin.bias.detach() if lin.bias is not None else None
    b = b.index_select(0, rows.to(b.device)) if b is not None and rows is not None else b
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    new.requires_grad_(lin.weight.requires_grad)
    return new


def head_rows(heads: list[int], size: int) -> torch.Tensor:
    """Row indices of whole heads (or head groups) of ``size`` rows each."""
    return torch.tensor([h * size + j for h in heads for j in range(size)], dtype=torch.long)


def shrink_layer(layout: Layout, i: int, heads: list[int], channels: list[int]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Replace layer ``i``'s projections by ones that keep ``heads`` (key/value heads, with their query heads)
    and ``channels``; returns (owner, name, original) for every module replaced."""
    m, where, u = _modules(layout, i), layout.projections(i), unit_of(layout, i)
    kv_rows, q_rows = head_rows(heads, u.head_dim), head_rows(heads, u.head_dim * u.group)
    ch = torch.tensor(channels, dtype=torch.long)
    cut = {"q": {"rows": q_rows}, "k": {"rows": kv_rows}, "v": {"rows": kv_rows}, "o": {"cols": q_rows},
           "gate": {"rows": ch}, "up": {"rows": ch}, "down": {"cols": ch}}
    new = {where[role]: _sliced(m[role], **how) for role, how in cut.items()}
    undo = []
    for (owner, name), lin in new.items():
        undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, lin)
    return undo


@contextmanager
def width_pruned(model: nn.Module, width: WidthPlan):
    """The plan applied in place for the duration of the block, then the dense projections put back."""
    layout = Layout(model)
    undo = []
    try:
        for i in width.heads:
            undo += shrink_layer(layout, i, width.heads[i], width.channels[i])
        yield width
    finally:
        for owner, name, lin in reversed(undo):
            setattr(owner, name, lin)


def apply_shapes(model: nn.Module, shapes: dict[str, dict[str, int]]) -> None:
    """Give a freshly built model the saved widths (the first heads and channels: the weights then load into
    them), so that a width-pruned folder's state dict fits."""
    layout = Layout(model)
    for i, s in shapes.items():
        shrink_layer(layout, int(i), list(range(s["kv_heads"])), list(range(s["channels"])))
