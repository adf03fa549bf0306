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
        target = batch[:, 1:].to(logits.device)
        nll += summed_nll(logits[:, :-1], target)
        count += target.numel()
    return math.exp(nll / count)


def summed_nll(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The summed next-token NLL of a batch of windows' logits (b, t, vocab) against ``target`` (b, t), one window
    at a time in float32: the whole batch in float32 is b x t x vocab x 4 bytes (8 windows x 2048 tokens x
    Gemma-3's 262k vocabulary: 16 GiB beside the model's own logits)."""
    return sum(F.cross_entropy(o.float(), t, reduction="sum").item() for o, t in zip(logits, target))


def prefix_reuse_applies(model) -> bool:
    """Prefix reuse feeds a layer's dense input back as ``inputs_embeds``: only for families whose embeddings
    enter layer 0 untransformed (the layout's ``prefix_reuse``)."""
    from .models import Layout

    return Layout(model).family.prefix_reuse


@contextmanager
def layer_output_kind(model):
    """Yields a list that, after a forward pass inside the block, holds whether a decoder layer of this model
    returns a tuple (what :class:`lp.models.Skip` must mimic)."""
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


PREFIX_FORMAT = 1  # of save_states' files


def prefix_budget() -> int:
    """Bytes of dense hidden states a process may keep for prefix reuse: LP_PREFIX_BUDGET_GIB (default 4) GiB."""
    import os

    return int(float(os.environ.get("LP_PREFIX_BUDGET_GIB", "4")) * 2**30)


def save_states(path, layer: int, tuple_output: bool, states: dict[str, torch.Tensor]) -> None:
    """Dense hidden states entering decoder layer ``layer`` (a tensor per key: the perplexity windows, or
    each zero-shot batch), atomically (a reader sees a whole file or none): the one prefix-state file format."""
    from .files import atomic_write

    atomic_write(path, lambda tmp: torch.save({"format": PREFIX_FORMAT, "layer": layer, "tuple_output": tuple_output,
                                               "states": states}, tmp))


def load_states(path, layer: int, hidden_size: int) -> tuple[bool, dict[str, torch.Tensor]]:
    """(tuple_output, states) saved at ``path`` by :func:`save_states`; :class:`lp.files.DamagedFile` naming
    the file if it cannot be read, is of another format, layer or hidden size, or holds a non-finite value."""
    from .files import DamagedFile, read_torch

    saved = read_torch(path)
    states = saved.get("states") if isinstance(saved, dict) else None
    ok = isinstance(states, dict) and saved.get("format") == PREFIX_FORMAT and saved.get("layer") == layer \
        and "tuple_output" in saved and all(isinstance(k, str) and isinstance(h, torch.Tensor) and h.dim() == 3
                                            and h.shape[-1] == hidden_size for k, h in states.items())
    if not ok:
        raise DamagedFile(f"{path} is damaged: not the states entering layer {layer} at hidden size {hidden_size}")
    if not all(h.isfinite().all() for h in states.values()):
        raise DamagedFile(f"{path} is damaged: it holds non-finite hidden states")
    return saved["tuple_output"], states


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
        # run only layers [0, layer): the boundary ``layer`` is then the final norm's input
        with layer_output_kind(model) as returns, Layout(model).layers_swapped(Layout(model).layers[:max(layer, 1)]):
            hidden = torch.cat([b[layer].cpu() for b in stream_boundaries(model, windows, batch_size, progress=False)])
        return cls(hidden, layer, returns[0])

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()

    def save(self, path) -> None:
        save_states(path, self.layer, self._tuple, {"windows": self.hidden})

    @classmethod
    def load(cls, path, windows: torch.Tensor, layer: int, hidden_size: int) -> "Prefix":
        """The prefix saved at ``path`` (:func:`load_states`); DamagedFile also if it is not these windows'."""
        from .files import DamagedFile

        tuple_output, states = load_states(path, layer, hidden_size)
        hidden = states.get("windows")
        if hidden is None or tuple(hidden.shape) != (*windows.shape, hidden_size):
            raise DamagedFile(f"{path} is damaged: not the states entering layer {layer} of {tuple(windows.shape)} "
                              f"windows at hidden size {hidden_size}")
        return cls(hidden, layer, tuple_output)

    def forward(self, model, start: int, stop: int) -> torch.Tensor:
        """Logits of the (pruned) model for windows[start:stop], its first ``layer`` layers skipped."""
        from .models import Layout

        device = next(model.parameters()).device
        with Layout(model).skipping(self.layer, self._tuple):
            return model(inputs_embeds=self.hidden[start:stop].to(device), use_cache=False).logits
