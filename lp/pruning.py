"""Removing decoder layers, inserting patches at the interfaces, saving and loading the result."""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .models import Layout
from .patches import PATCH_MODULES, Patched, ResidualFFN, unwrap

SPEC_FILE, PATCH_FILE = "lp_pruning.json", "lp_patches.safetensors"


@dataclass
class PruneSpec:
    """What was done to a dense model of ``original_layers`` layers."""

    original_layers: int
    removed: list[int]
    patches: dict[str, str] = field(default_factory=dict)  # position in the pruned model -> patch kind

    @property
    def kept(self) -> list[int]:
        return [i for i in range(self.original_layers) if i not in set(self.removed)]


def interface_position(removed: list[int], e: int) -> int:
    """Index, in the pruned model, of the module that receives dense boundary ``e`` (= #kept layers < e)."""
    gone = set(removed)
    return sum(1 for i in range(e) if i not in gone)


def module_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` computes: the execution device of an accelerate hook (split or offloaded models,
    whose weights may sit on 'meta' until used), else the device of its first parameter."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    ref = next(module.parameters(), None)
    return None if ref is None else ref.device


def remove_layers(model: nn.Module, removed: list[int]) -> PruneSpec:
    """Drop ``removed`` decoder layers in place; renumber the kept ones and update the config."""
    layout = Layout(model)
    L = layout.num_layers
    bad = [i for i in removed if not 0 <= i < L]
    if bad or len(set(removed)) != len(removed):
        raise ValueError(f"layers to remove {removed} must be distinct indices in [0, {L - 1}]")
    spec = PruneSpec(original_layers=L, removed=sorted(removed))
    layout.layers = nn.ModuleList([layout.layers[i] for i in spec.kept])
    for new_idx, layer in enumerate(layout.layers):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx
    cfg = model.config
    cfg.num_hidden_layers = len(spec.kept)
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == L:
        cfg.layer_types = [cfg.layer_types[i] for i in spec.kept]
    return spec


def attach_patch(model: nn.Module, position: int, patch: nn.Module) -> None:
    """Wrap pruned layer ``position`` (or the final norm if ``position`` = number of layers) with ``patch``."""
    layout = Layout(model)
    target = layout.norm if position == layout.num_layers else layout.layers[position]
    if isinstance(target, Patched):
        raise ValueError(f"position {position} already has a patch")
    device = module_device(target)
    if device is not None:
        patch.to(device)
    wrapped = Patched(patch, target)
    if position == layout.num_layers:
        layout.norm = wrapped
    else:
        layout.layers[position] = wrapped


def prune_and_patch(model: nn.Module, removed: list[int], make_patch) -> PruneSpec:
    """Remove layers, then for each interface (s, e) attach ``make_patch(s, e)`` (skipped if it is None).

    Patches are built first, on the dense model, so builders that run it see the dense hidden states."""
    made = {(s, e): make_patch(s, e) for s, e in interfaces(removed)}
    spec = remove_layers(model, removed)
    for (s, e), patch in made.items():
        if patch is not None:
            pos = interface_position(spec.removed, e)
            attach_patch(model, pos, patch)
            spec.patches[str(pos)] = patch.kind
    return spec


@contextmanager
def pruned(model: nn.Module, removed: list[int], make_patch):
    """Prune and patch in place for the duration of the block, then restore the dense model exactly.

    Only module references, ``layer_idx`` attributes and config fields change, so restoring is free: a sweep
    loads its model once and prunes it many times.
    """
    layout = Layout(model)
    layers, norm = layout.layers, layout.norm
    cfg = model.config
    saved_cfg = {k: getattr(cfg, k) for k in ("num_hidden_layers", "layer_types") if hasattr(cfg, k)}
    idx = [(m, m.layer_idx) for layer in layers for m in layer.modules() if hasattr(m, "layer_idx")]
    try:
        yield prune_and_patch(model, removed, make_patch)
    finally:
        layout.layers, layout.norm = layers, norm
        for k, v in saved_cfg.items():
            setattr(cfg, k, v)
        for m, i in idx:
            m.layer_idx = i


def patches_of(model: nn.Module) -> dict[int, nn.Module]:
    layout = Layout(model)
    found = {i: m.patch for i, m in enumerate(layout.layers) if isinstance(m, Patched)}
    if isinstance(layout.norm, Patched):
        found[layout.num_layers] = layout.norm.patch
    return found


def save_pruned(model: nn.Module, tokenizer, path: str | Path, spec: PruneSpec) -> None:
    """A Hugging Face folder of the pruned model, plus the patches and the spec beside it."""
    from safetensors.torch import save_file

    path = Path(path)
    layout = Layout(model)
    patches = patches_of(model)
    layers, norm = layout.layers, layout.norm
    try:  # save the plain pruned model, then put the wrappers back
        layout.layers = nn.ModuleList([unwrap(m) for m in layers])
        layout.norm = unwrap(norm)
        model.save_pretrained(path)
    finally:
        layout.layers, layout.norm = layers, norm
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    save_file({f"{pos}.{k}": v.detach().cpu().contiguous() for pos, p in patches.items()
               for k, v in p.state_dict().items()}, str(path / PATCH_FILE))
    (path / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2))


def load_pruned(path: str | Path, dtype: str = "auto", device: str = "cpu"):
    """Inverse of :func:`save_pruned`: (model, tokenizer, spec) with the patches in place."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import DTYPES

    path = Path(path)
    if not (path / SPEC_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a folder written by lp.pruning.save_pruned (no {SPEC_FILE})")
    spec = PruneSpec(**json.loads((path / SPEC_FILE).read_text()))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    weights = load_file(str(path / PATCH_FILE))
    layers = Layout(model).layers
    for pos, kind in spec.patches.items():
        state = {k.split(".", 1)[1]: v for k, v in weights.items() if k.split(".", 1)[0] == pos}
        if kind == ResidualFFN.kind:  # same shapes as a decoder layer's MLP; weights loaded below
            donor = unwrap(layers[min(int(pos), len(layers) - 1)])
            patch = ResidualFFN(copy.deepcopy(donor.post_attention_layernorm), copy.deepcopy(donor.mlp))
            patch.load_state_dict(state)
        else:
            patch = PATCH_MODULES[kind](state["weight"])
        patch.requires_grad_(False)
        attach_patch(model, int(pos), patch)
    return model, tokenizer, spec


def interfaces(removed: list[int]) -> list[tuple[int, int]]:
    """Contiguous removed runs as (s, e) pairs: layers [s, e) removed, boundary s joined to boundary e."""
    runs: list[tuple[int, int]] = []
    for i in sorted(removed):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
