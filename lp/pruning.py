"""Removing decoder layers, inserting patches at the interfaces, saving and loading the result."""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from contextlib import contextmanager
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .models import Layout, module_device
from .modules import PATCH_MODULES, ChannelScale, LinearPatch, Patched, ReplacementLayer, ResidualFFN, unwrap
from .patches import Fold

SPEC_FILE, PATCH_FILE = "lp_pruning.json", "lp_patches.safetensors"
REMOTE_FILE, REMOTE_KINDS = "modeling_lp.py", {"diag", "linearpatch"}  # weight patches: a remote-code form too
PATCHED_PREFIX = "lp-patched-"  # config.json's model_type of a folder with patches: plain loading fails loudly


log = logging.getLogger(__name__)

@contextmanager
def _dequantized(model: nn.Module):
    """A GGUF-loaded model holds de-quantised float weights but is flagged as quantised, and transformers
    refuses to save it: hide the flag while saving, so the folder holds the de-quantised weights."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or "gguf" not in type(quantizer).__name__.lower():
        yield
        return
    qc = model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if qc is not None:
            model.config.quantization_config = qc


@dataclass
class PruneSpec:
    """What was done to a dense model of ``original_layers`` layers."""

    original_layers: int
    removed: list[int]
    patches: dict[str, str] = field(default_factory=dict)  # position in the pruned model -> the module kind saved
    variant: str | None = None  # the patch variant that built them (conf/patch: lstsq and linearpatch save alike)
    replaced: list[int] = field(default_factory=list)  # removed layers whose place a ReplacementLayer took
    folded: dict[str, float] = field(default_factory=dict)  # scalar patches folded into the saved weights
    precision: dict[str, str] = field(default_factory=dict)  # position -> patch.precision of weight patches
    maps: dict[str, str] = field(default_factory=dict)  # dense layer -> kind of a d x d map folded into it (replaceme)
    widths: dict[str, dict] = field(default_factory=dict)  # layer -> {kv_heads, channels} it keeps (width pruning)


def interface_position(removed: list[int], e: int, replaced=()) -> int:
    """Index, in the pruned model, of the module that receives dense boundary ``e``: the number of layers
    before ``e`` that are kept, or whose place a replacement layer took."""
    gone = set(removed) - set(replaced)
    return sum(1 for i in range(e) if i not in gone)


def check_removed(removed: list[int], num_layers: int, replace: dict | None = None) -> None:
    """``removed`` distinct layer indices of a model of ``num_layers`` (holding the ``replace``d ones), or a ValueError."""
    replace = replace or {}
    bad = [i for i in removed if not isinstance(i, int) or not 0 <= i < num_layers]
    if bad or len(set(removed)) != len(removed) or not set(replace) <= set(removed):
        raise ValueError(f"layers to remove {removed} must be distinct indices in [0, {num_layers - 1}]"
                         f"{f' and include the replaced ones {sorted(replace)}' if replace else ''}")


def remove_layers(model: nn.Module, removed: list[int], replace: dict[int, nn.Module] | None = None) -> PruneSpec:
    """Drop ``removed`` decoder layers in place, ``replace[i]`` (if given) taking the place of removed layer
    ``i``; renumber the layers and update the config."""
    layout = Layout(model)
    L = layout.num_layers
    replace = replace or {}
    check_removed(removed, L, replace)
    spec = PruneSpec(original_layers=L, removed=sorted(removed), replaced=sorted(replace))
    slots = [i for i in range(L) if i not in set(removed) or i in replace]  # dense index of each new layer
    layout.layers = nn.ModuleList([replace.get(i, layout.layers[i]) for i in slots])
    spec.patches.update({str(pos): replace[i].kind for pos, i in enumerate(slots) if i in replace})
    for new_idx, layer in enumerate(layout.layers):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx
    cfg = model.config
    cfg.num_hidden_layers = len(slots)
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == L:
        cfg.layer_types = [cfg.layer_types[i] for i in slots]
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
    """Remove layers, then for each interface (s, e) attach ``make_patch(s, e)`` (skipped if it is None); a
    :class:`ReplacementLayer` takes the place of layer s instead.

    Patches are built first, on the dense model, so builders that run it see the dense hidden states; a
    :class:`Fold` goes into the weights of a kept layer instead."""
    check_removed(removed, Layout(model).num_layers)  # before any patch is built on them
    made = {(s, e): make_patch(s, e) for s, e in interfaces(removed)}
    replace = {s: p for (s, e), p in made.items() if isinstance(p, ReplacementLayer)}
    folds = [p for p in made.values() if isinstance(p, Fold)]
    for fold in folds:
        fold.apply(Layout(model).layers)
    spec = remove_layers(model, removed, replace)
    spec.maps = {str(f.layer): f.kind for f in folds}
    for (s, e), patch in made.items():
        if patch is not None and s not in replace and not isinstance(patch, Fold):
            pos = interface_position(spec.removed, e, spec.replaced)
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
    branches = [(owner, name, getattr(owner, name)) for layer in layers for owner, name in layout.branch_ends(unwrap(layer))
                if owner is not None and hasattr(owner, name)]
    try:
        yield prune_and_patch(model, removed, make_patch)
    finally:
        layout.layers, layout.norm = layers, norm
        for owner, name, module in branches:  # undo folds (replaceme)
            setattr(owner, name, module)
        for k, v in saved_cfg.items():
            setattr(cfg, k, v)
        for m, i in idx:
            m.layer_idx = i


def patches_of(model: nn.Module) -> dict[int, nn.Module]:
    """Position in the pruned model -> what was added there: a patch, or a replacement layer."""
    layout = Layout(model)
    found = {i: m.patch if isinstance(m, Patched) else m for i, m in enumerate(layout.layers)
             if isinstance(m, (Patched, ReplacementLayer))}
    if isinstance(layout.norm, Patched):
        found[layout.num_layers] = layout.norm.patch
    return found


def foldable(layout: Layout, layer: nn.Module) -> bool:
    """Whether a scale ``a`` of the residual stream entering ``layer`` moves exactly into dividing its branch
    outputs by ``a``: true for pre-norm layers whose branches end in a linear map added to the stream (the
    norms in front are scale-invariant, up to their epsilon); false where a norm follows a branch (Gemma 2/3,
    OLMo 2), which would undo the division."""
    ends = layout.branch_ends(unwrap(layer))
    return not layout.family.post_branch_norms and all(
        owner is not None and isinstance(getattr(owner, name, None), nn.Linear) for owner, name in ends)


def _fold_scalars(model: nn.Module, state: dict, patches: dict[int, nn.Module]) -> dict[int, float]:
    """Fold every scalar patch whose downstream layers are all :func:`foldable` into ``state`` (the saved
    weights; the model is not touched): scaling the stream by ``a`` at position p equals dividing the
    branch outputs of layers p, p+1, ... by ``a`` (the final norm is scale-invariant). Returns {p: a}."""
    layout = Layout(model)
    layers = list(layout.layers)
    folded = {pos: p.weight.item() for pos, p in patches.items()
              if isinstance(p, ChannelScale) and p.weight.numel() == 1 and all(foldable(layout, x) for x in layers[pos:])}
    for pos, a in folded.items():
        for j in range(pos, len(layers)):
            for t in layout.family.branch_outputs:
                for kind in ("weight", "bias"):
                    key = f"{layout.layers_prefix}.{j}.{t}.{kind}"
                    if state.get(key) is not None:
                        state[key] = state[key] / a
    return folded


def foreign_folder(path: str | Path) -> str | None:
    """Why save_model=``path`` may not be written (a file, or a folder lp did not save), or None."""
    path = Path(path).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir()) and not (path / SPEC_FILE).is_file()):
        return (f"{'a file' if not path.is_dir() else 'a folder of other files'} is there; lp replaces only a folder "
                f"it saved itself (with {SPEC_FILE}): give a new or empty folder")
    return None


def save_pruned(model: nn.Module, tokenizer, path: str | Path, spec: PruneSpec, fold: bool = True) -> None:
    """A Hugging Face folder of the pruned model, plus the patches and the spec beside it.

    With ``fold``, scalar patches (prunecomp) are folded into the saved weights where that is exact (see
    :func:`foldable`): the folder is then a plain model that ``from_pretrained`` loads without lp."""
    path = Path(path)
    if why := foreign_folder(path):
        raise FileExistsError(f"save_model={path}: {why}")
    _remove_stale(path)
    tmp = path.with_name(f".{path.name}.saving-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_pruned(model, tokenizer, tmp, spec, fold)
        if path.exists():  # the old folder out of the way, the new one in: a reader sees one run's folder or none
            theirs = sorted(f.name for f in path.iterdir()) if path.is_dir() else []
            extra = [f for f in theirs if not (tmp / f).exists()]
            if extra:  # files lp would not write again: a user's, kept by refusing to replace the folder
                raise FileExistsError(f"save_model={path}: the folder holds files that this save would not write "
                                      f"({extra[:5]}): move them away, or give a new folder")
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.replace(old)
            tmp.replace(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.replace(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _gone(p: Path) -> bool:
    """Whether the process whose id ends the name of folder ``p`` (``...-PID``) has ended."""
    try:
        os.kill(int(p.name.rsplit("-", 1)[-1]), 0)
    except (ValueError, ProcessLookupError):
        return True
    except PermissionError:
        pass
    return False


def _remove_stale(path: Path) -> None:
    """What an interrupted save of ``path`` left beside it (its process gone): half-written ``.saving-PID``
    folders are removed; an earlier complete model moved aside (``.old-PID``: the save was killed between its
    two renames) is put back where no complete model is, and removed once one is."""
    if not path.parent.is_dir():
        return
    for p in path.parent.glob(f".{path.name}.saving-*"):
        if _gone(p):
            shutil.rmtree(p, ignore_errors=True)
    for p in sorted(path.parent.glob(f".{path.name}.old-*")):
        if not _gone(p):
            continue
        if (path / SPEC_FILE).is_file():
            shutil.rmtree(p, ignore_errors=True)
        elif (p / SPEC_FILE).is_file() and not path.exists():
            p.replace(path)
            log.warning(f"{path}: a save was interrupted after moving the earlier model aside; it is restored from {p}")


def _write_pruned(model: nn.Module, tokenizer, path: Path, spec: PruneSpec, fold: bool) -> None:
    """The folder's content; the spec is written last (a folder without it is not a saved model)."""
    from safetensors.torch import save_file

    layout = Layout(model)
    patches = patches_of(model)
    layers, norm = layout.layers, layout.norm
    try:  # save the plain pruned model, then put the wrappers back
        layout.layers = nn.ModuleList([unwrap(m) for m in layers])
        layout.norm = unwrap(norm)
        state = model.state_dict()
        folded = _fold_scalars(model, state, patches) if fold else {}
        with _dequantized(model):
            model.save_pretrained(path, state_dict=state)
    finally:
        layout.layers, layout.norm = layers, norm
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    kept = {pos: p for pos, p in patches.items() if pos not in folded and not isinstance(p, ReplacementLayer)}
    save_file({f"{pos}.{k}": v.detach().cpu().contiguous() for pos, p in kept.items()
               for k, v in p.state_dict().items()}, str(path / PATCH_FILE))
    spec = dataclasses.replace(spec, patches={k: v for k, v in spec.patches.items() if int(k) not in folded},
                               folded={str(k): v for k, v in folded.items()},
                               precision={str(pos): p.precision for pos, p in kept.items() if hasattr(p, "precision")})
    kinds = {kind for kind in spec.patches.values() if kind != ReplacementLayer.kind}
    if spec.widths:  # layers of their own widths: config.json has one width for all, so plain loading must fail
        config = json.loads((path / "config.json").read_text())
        config.update(model_type=f"{PATCHED_PREFIX}{config['model_type']}",
                      lp_note="width-pruned model (its layers' widths in lp_pruning.json): load it with "
                              "lp.pruning.load_pruned(folder)")
        (path / "config.json").write_text(json.dumps(config, indent=2))
    if kinds:
        # patches that plain from_pretrained would silently drop: make it fail loudly instead, naming the way;
        # weight patches also get the hub's remote-code form (a modeling file and auto_map)
        config = json.loads((path / "config.json").read_text())
        remote = kinds <= REMOTE_KINDS
        config.update(model_type=f"{PATCHED_PREFIX}{config['model_type']}",
                      lp_note="patched model: load it with lp.pruning.load_pruned(folder)" + (
                          ", or AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)" if remote else
                          f"; patches {sorted(kinds - REMOTE_KINDS)} have no stock-transformers form"))
        if remote:
            template = (Path(__file__).parent / "remote" / REMOTE_FILE).read_text()
            (path / REMOTE_FILE).write_text(template.replace("__BASE_MODEL_TYPE__", config["model_type"].removeprefix(
                PATCHED_PREFIX)).replace("__BASE_ARCHITECTURE__", config["architectures"][0]))
            config["auto_map"] = {"AutoConfig": "modeling_lp.LPPatchedConfig",
                                  "AutoModelForCausalLM": "modeling_lp.LPPatchedForCausalLM"}
        (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2))


def load_pruned(path: str | Path, dtype: str = "auto", device: str = "cpu"):
    """Inverse of :func:`save_pruned`: (model, tokenizer, spec) with the patches in place."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .models import DTYPES

    path = Path(path)
    _remove_stale(path)
    if not (path / SPEC_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a folder written by lp.pruning.save_pruned (no {SPEC_FILE})")
    try:
        spec = PruneSpec(**json.loads((path / SPEC_FILE).read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path / SPEC_FILE} is damaged: {e}") from e
    config = json.loads((path / "config.json").read_text())
    kind = config.pop("model_type").removeprefix(PATCHED_PREFIX)
    config.pop("lp_note", None)
    config.pop("auto_map", None)
    config = AutoConfig.for_model(kind, **config)
    if spec.widths:
        model = _load_narrowed(path, config, spec.widths, DTYPES[dtype]).to(device).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=DTYPES[dtype]).to(device).eval()
    model.requires_grad_(False)
    # config: the plain one above, so that the tokenizer never reads the folder's remote-code config (which
    # would ask the user whether to run lp's own code)
    tokenizer = AutoTokenizer.from_pretrained(path, config=config) if (path / "tokenizer_config.json").is_file() else None
    try:
        weights = load_file(str(path / PATCH_FILE))
    except Exception as e:  # missing, truncated, not safetensors
        raise ValueError(f"{path / PATCH_FILE} could not be read ({type(e).__name__}: {e}): the folder is damaged; "
                         f"save the model again") from e
    layers = Layout(model).layers
    L = len(layers)
    bad = [i for i in spec.removed if not 0 <= i < spec.original_layers] + \
        [p for p in spec.patches if not (p.isdigit() and 0 <= int(p) <= L)]
    if bad or spec.original_layers - len(spec.removed) + len(spec.replaced) != L:
        raise ValueError(f"{path / SPEC_FILE} does not fit the saved model of {L} layers (bad entries: {bad})")
    for pos, kind in spec.patches.items():
        state = {k.split(".", 1)[1]: v for k, v in weights.items() if k.split(".", 1)[0] == pos}
        if kind == ReplacementLayer.kind:  # saved as a decoder layer of the model itself
            layers[int(pos)] = ReplacementLayer(layers[int(pos)])
            continue
        if kind == ResidualFFN.kind:  # same shapes as a decoder layer's MLP; weights loaded below
            donor = unwrap(layers[min(int(pos), len(layers) - 1)])
            patch = ResidualFFN(*map(copy.deepcopy, Layout(model).mlp_branch(donor)))
            patch.load_state_dict(state)
        else:
            _check_patch_weight(path, pos, kind, state, model.config.hidden_size)
            patch = PATCH_MODULES[kind](state["weight"], spec.precision.get(pos, "model"))
        bad = [k for k, v in patch.state_dict().items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise ValueError(f"{path / PATCH_FILE}: the patch at layer {pos} holds non-finite values in {bad}: the "
                             f"file is damaged; save the model again")
        patch.requires_grad_(False)
        attach_patch(model, int(pos), patch)
    return model, tokenizer, spec


def _load_narrowed(path: Path, config, widths: dict, dtype):
    """A width-pruned folder: the model built from its config, each layer given its saved widths, then the
    weights (every tensor of the folder's safetensors files, shapes checked by load_state_dict)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from .width import apply_shapes

    if dtype == "auto":  # what from_pretrained's "auto" reads: the dtype the folder was saved in
        dtype = getattr(config, "dtype", None) or "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    try:
        apply_shapes(model, widths)
        state = {k: v for f in sorted(path.glob("*.safetensors")) if f.name != PATCH_FILE for k, v in load_file(str(f)).items()}
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError, KeyError, IndexError, OSError) as e:
        raise ValueError(f"{path}: the saved weights do not fit the widths in {SPEC_FILE} ({type(e).__name__}: {e}): "
                         f"the folder is damaged; save the model again") from e
    tied = {k for k in result.missing_keys if config.tie_word_embeddings and k.endswith("lm_head.weight")}
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ValueError(f"{path}: the saved weights lack {sorted(set(result.missing_keys) - tied)[:5]} or hold unknown "
                         f"{result.unexpected_keys[:5]}: the folder is damaged; save the model again")
    model.tie_weights()
    return model


def _check_patch_weight(path: Path, pos: str, kind: str, state: dict, hidden: int) -> None:
    """A weight patch's one tensor is there and of the shape its kind has at this model's hidden size."""
    if kind not in PATCH_MODULES:
        raise ValueError(f"{path / SPEC_FILE}: patch kind {kind!r} at layer {pos} is not one lp knows "
                         f"({sorted(PATCH_MODULES)})")
    want = {ChannelScale.kind: [(hidden,), (1,), ()], LinearPatch.kind: [(hidden, hidden)]}.get(kind)  # others: theirs
    got = tuple(state["weight"].shape) if "weight" in state else None
    if got is None or want is not None and got not in want:
        raise ValueError(f"{path / PATCH_FILE}: the {kind} patch at layer {pos} has weight shape {got}, not one of {want} "
                         f"(hidden size {hidden} in config.json): the file is damaged or of another model")


def interfaces(removed: list[int]) -> list[tuple[int, int]]:
    """Contiguous removed runs as (s, e) pairs: layers [s, e) removed, boundary s joined to boundary e."""
    runs: list[tuple[int, int]] = []
    for i in sorted(removed):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
