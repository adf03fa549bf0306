"""A layer-pruned model with lp's patches, loadable with stock transformers and no lp installed:

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

Written into a saved folder by lp (lp.pruning.save_pruned) from this template; the two names below are filled
in there. The decoder weights are the pruned model's own (model.safetensors); each patch (lp_patches.safetensors,
positions in lp_pruning.json) is applied to the hidden state entering the layer at its position (the final norm
if the position is the number of layers), as lp applies it: x * r (diag) or x @ P (linearpatch), computed in
float32 or in the hidden states' dtype as it was saved. P is not folded into the weights: RMSNorm does not
commute with a non-orthogonal P.
"""
import json

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoConfig
from transformers.utils import cached_file

BASE_MODEL_TYPE = "__BASE_MODEL_TYPE__"
BASE_ARCHITECTURE = "__BASE_ARCHITECTURE__"


class LPPatchedConfig(type(AutoConfig.for_model(BASE_MODEL_TYPE))):
    model_type = "lp-patched-" + BASE_MODEL_TYPE


class LPPatch(torch.nn.Module):
    def __init__(self, kind: str, weight: torch.Tensor, precision: str):
        super().__init__()
        if kind not in ("diag", "linearpatch"):
            raise ValueError(f"patch kind {kind!r} has no stock-transformers form; load this folder with lp")
        self.kind, self.precision = kind, precision
        self.register_buffer("weight", weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if self.precision == "float32" else x.dtype
        w, h = self.weight.to(x.device, dtype), x.to(dtype)
        return (h * w if self.kind == "diag" else h @ w).to(x.dtype)


class LPPatchedForCausalLM(getattr(transformers, BASE_ARCHITECTURE)):
    config_class = LPPatchedConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        spec = json.loads(open(cached_file(pretrained_model_name_or_path, "lp_pruning.json")).read())
        weights = load_file(cached_file(pretrained_model_name_or_path, "lp_patches.safetensors"))
        model.lp_patches = torch.nn.ModuleDict()
        layers, norm = model.model.layers, model.model.norm
        for pos, kind in spec["patches"].items():
            patch = LPPatch(kind, weights[f"{pos}.weight"], spec["precision"].get(pos, "model"))
            model.lp_patches[pos] = patch.to(next(model.parameters()).device)
            target = norm if int(pos) == len(layers) else layers[int(pos)]
            target.register_forward_pre_hook(_applying(patch), with_kwargs=True)
        return model


def _applying(patch):
    def hook(module, args, kwargs):
        if args:
            return (patch(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": patch(kwargs["hidden_states"])}
    return hook
