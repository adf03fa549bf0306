"""Perplexity over non-overlapping windows (the paper's protocol)."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True, desc: str = "perplexity",
               prefix: "Prefix | None" = None) -> float:
    """exp(mean next-token NLL) over ``windows`` (w, seqlen); every window predicts its tokens 1..seqlen-1.

    With ``prefix`` (the dense hidden states entering layer ``prefix.layer`` for these windows), the first
    ``prefix.layer`` layers are not run: they are unchanged by pruning that starts at or after that layer.
    """
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        if prefix is None:
            logits = model(input_ids=batch, use_cache=False).logits
        else:
            logits = prefix.forward(model, start, start + batch_size)
        logits = logits[:, :-1].float()
        target = batch[:, 1:].to(logits.device)
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        count += target.numel()
    return math.exp(nll / count)


class _Skip(torch.nn.Module):
    """A decoder layer that returns its input (stands in for the layers a prefix cache replaces)."""

    def __init__(self, tuple_output: bool):
        super().__init__()
        self.tuple_output = tuple_output

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.tuple_output else hidden_states


def prefix_reuse_applies(model) -> bool:
    """Prefix reuse feeds a layer's dense input back as ``inputs_embeds``: only for families whose embeddings
    enter layer 0 untransformed (the layout's ``prefix_reuse``) and whose layers are all of one type."""
    from .models import Layout

    types = getattr(model.config, "layer_types", None) or []
    return Layout(model).family.prefix_reuse and len(set(types)) <= 1


@contextmanager
def layer_output_kind(model):
    """Yields a list that, after a forward pass inside the block, holds whether a decoder layer of this model
    returns a tuple (what :class:`_Skip` must mimic)."""
    from .models import Layout

    returns: list = []

    def kind(module, args, out):
        if not isinstance(out, torch.Tensor) and not (isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor)):
            raise ValueError(f"a decoder layer of {type(model).__name__} returned {type(out).__name__}, neither a tensor "
                             f"nor a tuple that starts with one, so prefix reuse cannot stand in for it; set "
                             f"eval.prefix_reuse=false, or mark the family prefix_reuse=False in lp.models.LAYOUTS")
        returns.append(isinstance(out, tuple))

    hook = Layout(model).layers[0].register_forward_hook(kind)
    try:
        yield returns
    finally:
        hook.remove()


class Prefix:
    """Dense hidden states entering decoder layer ``layer`` for a fixed set of evaluation windows.

    Pruning that removes only layers >= ``layer`` leaves layers [0, layer) and their output unchanged, so
    a sweep computes that output once (:meth:`compute`) and every pruned variant runs only the layers after it.
    """

    def __init__(self, hidden: torch.Tensor, layer: int, tuple_output: bool):
        self.hidden, self.layer, self._tuple = hidden, layer, tuple_output

    @classmethod
    def compute(cls, model, windows: torch.Tensor, layer: int, batch_size: int = 1) -> "Prefix":
        from .calibration import stream_boundaries
        from .models import Layout

        if not prefix_reuse_applies(model):
            raise ValueError(f"prefix reuse does not apply to {type(model).__name__} (lp.models.LAYOUTS)")
        lay = Layout(model)
        kept = lay.layers
        try:  # run only layers [0, layer): the boundary ``layer`` is then the final norm's input
            with layer_output_kind(model) as returns:
                lay.layers = torch.nn.ModuleList(list(kept)[:max(layer, 1)])
                hidden = torch.cat([b[layer].cpu() for b in stream_boundaries(model, windows, batch_size,
                                                                              progress=False)])
        finally:
            lay.layers = kept
        return cls(hidden, layer, returns[0])

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()

    def save(self, path) -> None:
        """Atomically (a reader sees a whole file or none)."""
        from .records import atomic_write

        atomic_write(path, lambda tmp: torch.save({"hidden": self.hidden, "layer": self.layer, "tuple": self._tuple}, tmp))

    @classmethod
    def load(cls, path, windows: torch.Tensor, layer: int, hidden_size: int) -> "Prefix":
        """The prefix saved at ``path``; :class:`lp.records.DamagedFile` naming the file if it cannot be read or
        is not the states entering ``layer`` of these windows at this hidden size, or holds a non-finite value."""
        from .records import DamagedFile, read_torch

        saved = read_torch(path)
        hidden = saved.get("hidden") if isinstance(saved, dict) else None
        ok = isinstance(saved, dict) and saved.get("layer") == layer and "tuple" in saved
        if not ok or not isinstance(hidden, torch.Tensor) or tuple(hidden.shape) != (*windows.shape, hidden_size):
            raise DamagedFile(f"{path} is damaged: not the states entering layer {layer} of {tuple(windows.shape)} "
                              f"windows at hidden size {hidden_size}")
        if not hidden.isfinite().all():
            raise DamagedFile(f"{path} is damaged: it holds non-finite hidden states")
        return cls(hidden, layer, saved["tuple"])

    def forward(self, model, start: int, stop: int) -> torch.Tensor:
        """Logits of the (pruned) model for windows[start:stop], its first ``layer`` layers skipped."""
        from .models import Layout

        lay = Layout(model)
        kept = lay.layers
        device = next(model.parameters()).device
        try:
            lay.layers = torch.nn.ModuleList([_Skip(self._tuple)] * self.layer + list(kept)[self.layer :])
            return model(inputs_embeds=self.hidden[start:stop].to(device), use_cache=False).logits
        finally:
            lay.layers = kept
