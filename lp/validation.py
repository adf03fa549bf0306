"""The config checked before any weights load: what each group's settings may be (the rule tables, read from
the registries as they are now), how the choices go together, and the bounds only the model knows.

The rule types are lp.settings'; the values themselves, defaults included, live once in conf/<group>/*.yaml; a
metric's or a patch's own settings come with its registration (lp.selection.register, lp.patches.register).
Bounds that rules name are the model's: "layers" its last layer index, "start" the last start of an n-layer
block, "context" its context length.
"""
from __future__ import annotations

import math
from pathlib import Path

from . import data as data_lib
from .distill import TAIL_CHOICES, TRAIN_CHOICES
from .engine import ATTENTION, ENGINES
from .export import gguf_problem
from .hadamard import CONSTRUCTIONS, OFFICIAL, is_supported
from .keys import DISTILL_USES
from .models import DTYPES, LAYOUTS, device_problem
from .modules import PRECISIONS
from .patches import PATCHES
from .pruning import foreign_folder
from .selection import METRICS
from .settings import Flag, Fraction, Int, Limit, Number, OneOf, Path_, check, check_value
from .tracking import BACKENDS
from .width import pruned_layers
from .zeroshot import RP_METRICS

DISTILL_METHODS = ["none", "offline_kl", "mse"]


def hadamard_of(cfg: dict) -> str:
    """The Hadamard basis of the run's rotated statistics: patch.hadamard, or for patches without the setting
    the official code's (``quarot``, LinearPatch's default), so that a sweep over patches calibrates once."""
    return cfg["patch"].get("hadamard", OFFICIAL)


def trained(dist: dict) -> str:
    """What distillation trains (lp.distill.TRAIN_CHOICES): distill.train for offline_kl; mse trains the
    patches alone and has no such setting."""
    return dist["train"] if dist["method"] == "offline_kl" else "patch"


def scoring_patch(cfg: dict) -> str:
    """The training-free patch that ``prune=patched`` scores each block with: prune.patch, or the run's."""
    variant = cfg["prune"].get("patch") or cfg["patch"]["variant"]
    cheap = [v for v, m in PATCHES.items() if m.from_statistics]
    if variant not in cheap:
        raise ValueError(f"prune.metric=patched scores blocks with a patch built from the calibration statistics "
                         f"alone; patch={variant} is not one: set ++prune.patch to one of {cheap}")
    return variant


def _rules() -> dict:
    """The settings every run reads, per config group (the registries as they are now: a metric or patch
    registered after import is a valid choice)."""
    return {"prune": {"metric": OneOf(tuple(sorted(METRICS))), "n": Int(0, "layers")},
            "patch": {"variant": OneOf(tuple(sorted(PATCHES)))},
            "distill": {"method": OneOf(tuple(DISTILL_METHODS))},
            "data": {"seqlen": Int(2, "context"), "calib_samples": Int(1, "calib_samples"), "calib_batch_size": Int(1),
                     "bos": OneOf(data_lib.BOS_CHOICES)},
            "eval": {"max_windows": Int(1, none_ok=True), "batch_size": Int(1), "prefix_reuse": Flag(),
                     "rp_metric": OneOf(RP_METRICS), "engine": OneOf(ENGINES), "token_budget": Int(1)},
            "logger": {"backend": OneOf(BACKENDS)}, "model": {"dtype": OneOf(tuple(DTYPES))}}


OPTIONAL = {  # settings that mean something when left out, said where they are read
    "patch": {"precision": OneOf(PRECISIONS), "hadamard": OneOf(tuple(sorted(CONSTRUCTIONS)))},
    "eval": {"limit": Limit(), "num_fewshot": Int(0, none_ok=True), "zeroshot_batch_size": Int(1, none_ok=True),
             "attention": OneOf(tuple(ATTENTION))},
}
_TRAINED = {"samples": Int(1), "val_samples": Int(0, none_ok=True), "seqlen": Int(2, "context"),
            "batch_size": Int(1), "lr": Number(), "weight_decay": Number(positive=False),
            "epochs": Int(1)}  # 0 epochs would label an untrained patch distilled
DISTILL = {"none": {}, "mse": _TRAINED,  # what each distill.method reads
           "offline_kl": {**_TRAINED, "topk": Int(1, "vocab"), "min_lr_factor": Number(), "early_stop": Int(1, none_ok=True),
                          "train": OneOf(TRAIN_CHOICES), "autocast": OneOf(("bfloat16", "float16", None))}}
DISTILL_USES.update({method: set(rules) for method, rules in DISTILL.items()})


def narrows(cfg: dict) -> bool:
    """The run's metric prunes width (heads, channels: lp.width) and removes no layer."""
    return METRICS[cfg["prune"]["metric"]].width is not None


def validate_choices(cfg: dict, hidden_size: int | None = None) -> None:
    """The choices go together (each already valid by its rule), and the model's hidden size has a Hadamard
    matrix of the run's basis."""
    p, dist, variant = cfg["prune"], cfg["distill"], cfg["patch"]["variant"]
    if hidden_size is not None and not is_supported(hidden_size, hadamard_of(cfg)):
        raise ValueError(f"patch.hadamard={hadamard_of(cfg)}: no Hadamard matrix of the model's hidden size {hidden_size} "
                         f"(valid: {[c for c in CONSTRUCTIONS if is_supported(hidden_size, c)]}; ++patch.hadamard=... for a "
                         f"patch without the setting, whose statistics use the official basis)")
    if dist["method"] == "mse" and variant == "streamline_layer":
        raise ValueError("distill=mse trains patches on hidden states alone; patch=streamline_layer is a decoder "
                         "layer already trained so: use distill=none or distill=offline_kl")
    if variant == "none" and dist["method"] == "mse":
        raise ValueError("distill=mse trains a patch on hidden states alone, and patch=none leaves none to train: "
                         "use patch=linearpatch (or another patch), distill=offline_kl distill.train=last3 (the last "
                         "layers and the head, trained on logits), or distill=none")
    if variant == "none" and dist["method"] != "none" and trained(dist) not in TAIL_CHOICES:
        raise ValueError(f"distill={dist['method']} trains the patch, and patch=none leaves none to train: use "
                         f"patch=linearpatch (or another patch), distill.train=last3 (the last layers and the head), "
                         f"or distill=none")
    if variant == "replaceme" and dist["method"] != "none":
        raise ValueError("patch=replaceme folds its map into the model's weights and leaves no patch to train: "
                         "use distill=none")
    if p.get("indices") is not None and p["metric"] != "manual":
        raise ValueError(f"prune.indices={p['indices']} is read only by prune=manual; prune.metric={p['metric']} "
                         f"chooses the layers itself: use prune=manual prune.indices=[...], or drop prune.indices")
    if narrows(cfg):
        if variant != "none" or dist["method"] != "none":
            raise ValueError(f"prune.metric={p['metric']} narrows layers (heads, channels) and removes none, so there "
                             f"is no interface to patch or patch to train: use patch=none distill=none")
        if p["n"] == 0 and p.get("ratio") is None:
            raise ValueError(f"prune.n=0 with prune.ratio=null: prune.metric={p['metric']} would remove nothing; give "
                             f"prune.n (the budget in layers' worth of parameters) or prune.ratio")
    if p["n"] == 0 and (variant != "none" or dist["method"] != "none"):
        raise ValueError(f"prune.n=0 removes no layer, so patch={variant} / distill={dist['method']} would do "
                         f"nothing: use prune.n >= 1, or patch=none distill=none for the dense reference")
    if variant == "prunecomp" and (p["metric"] == "manual" or p.get("start") is not None):
        raise ValueError("patch=prunecomp chooses the layers itself, one per round, with prune.metric: use a "
                         "scoring metric (block_influence, cosine, angular, taylor, ppl, ...), not prune.metric="
                         "manual or prune.start")
    if p["metric"] == "evopress":
        if variant == "prunecomp":
            raise ValueError("prune.metric=evopress searches the whole set of removed layers; patch=prunecomp removes "
                             "them one round at a time: use another patch, or another metric with patch=prunecomp")
        if len(p["survivors"]) != len(p["tokens"]):
            raise ValueError(f"prune.survivors={p['survivors']} and prune.tokens={p['tokens']} must have one length: "
                             f"one entry per selection step")
        have = p["score_samples"] * (p.get("score_seqlen") or cfg["data"]["seqlen"])
        for name, tokens in (("initial_tokens", p["initial_tokens"]), ("tokens", max(p["tokens"]))):
            if tokens > have:
                raise ValueError(f"prune.{name} asks for {tokens} tokens, but the search draws from prune.score_samples"
                                 f" x (prune.score_seqlen or data.seqlen) = {have}: raise prune.score_samples or lower "
                                 f"prune.{name} (+experiment=evopress_cpu sizes them for a CPU)")
        if p["in_loop"] and not PATCHES[variant].from_statistics:
            cheap = [v for v, m in PATCHES.items() if m.from_statistics]
            raise ValueError(f"prune.in_loop=true scores every candidate with its patch, built from the calibration "
                             f"statistics alone; patch={variant} is not one: use patch= one of {cheap}, or "
                             f"prune.in_loop=false")
    if p["metric"] == "patched":
        if variant == "prunecomp":
            raise ValueError("prune.metric=patched scores whole blocks; patch=prunecomp removes layers one round at a "
                             "time: use prune=block_influence (Prune&Comp's) or another metric with patch=prunecomp")
        scoring_patch(cfg)
    if not cfg["model"].get("name_or_path"):
        raise ValueError("model.name_or_path is missing: give a hub id, a local folder or package:NAME")


def known_settings() -> dict[str, set]:
    """Every setting a method of the prune, patch and distill groups reads (the registries as they are now)."""
    return {"prune": {"metric", "n", "start", "indices", "patch"} | {k for m in METRICS.values() for k in m.reads},
            "patch": {"variant"} | set(OPTIONAL["patch"]) | {k for m in PATCHES.values() for k in m.reads},
            "distill": {"method"} | {k for rules in DISTILL.values() for k in rules}}


TOP = {"seed": Int(0), "resume": Flag(), "progress": Flag(), "results_dir": Path_(), "cache_dir": Path_()}
BOOTSTRAP = {"resamples": Int(1, "resamples"), "level": Fraction(), "seed": Int(0)}
MAX_CALIB_SAMPLES = 4096  # 32x the paper's 128: more is a typo, not a protocol (each sample is a forward pass)
MAX_RESAMPLES = 100_000


def validate(cfg: dict, num_layers: int | None = None, max_positions: int | None = None,
             hidden_size: int | None = None, vocab_size: int | None = None, model_type: str | None = None) -> None:
    """Checks that need no weights: the config alone, then (given them) the model's layer count, context,
    hidden size, vocabulary and family. Each setting by its rule (:func:`_rules`, the metric's, the patch's, the
    distillation's), then how the choices go together (:func:`validate_choices`)."""
    p, d, e, dist = cfg["prune"], cfg["data"], cfg["eval"], cfg["distill"]
    L = num_layers if num_layers is not None else math.inf
    bounds = {"layers": L - 1, "start": L - p["n"] if isinstance(p["n"], int) else math.inf,
              "context": max_positions or math.inf, "vocab": vocab_size or math.inf,
              "calib_samples": MAX_CALIB_SAMPLES, "resamples": MAX_RESAMPLES}
    for group, known in known_settings().items():  # a misspelt +key is an error, never a silent no-op
        unknown = sorted(set(cfg[group]) - known)
        if unknown:
            raise ValueError(f"{', '.join(f'{group}.{k}' for k in unknown)}: no {group} method reads "
                             f"{'this setting' if len(unknown) == 1 else 'these settings'} (misspelt?); "
                             f"{group} settings: {sorted(known)}")
    check(TOP, cfg, "", "every run", bounds)
    check(BOOTSTRAP, cfg.get("bootstrap") or {}, "bootstrap", "every run's intervals", bounds)
    if not isinstance(p.get("indices"), (list, type(None))):
        raise ValueError(f"prune.indices={p['indices']!r} must be a list of layer indices, e.g. prune.indices=[5]")
    if not isinstance(e.get("tasks"), (list, type(None))) or any(not isinstance(t, str) for t in e.get("tasks") or []):
        raise ValueError(f"eval.tasks={e.get('tasks')!r} must be a list of task names, e.g. eval.tasks=[piqa_local]")
    for group, rules in _rules().items():
        check(rules, cfg[group], group, "every run", bounds)
    for group, rules in OPTIONAL.items():
        check(rules, cfg[group], group, "", bounds, optional=True)
    check(METRICS[p["metric"]].reads, p, "prune", f"prune.metric={p['metric']}", bounds)
    check(PATCHES[cfg["patch"]["variant"]].reads, cfg["patch"], "patch", f"patch={cfg['patch']['variant']}", bounds)
    check(DISTILL[dist["method"]], dist, "distill", f"distill.method={dist['method']}", bounds)
    validate_choices(cfg, hidden_size)
    family = LAYOUTS.get(model_type)  # the family trait patch=replaceme refuses once the model is loaded
    if cfg["patch"]["variant"] == "replaceme" and family and family.post_branch_norms:
        raise ValueError(f"patch=replaceme folds its map into mlp.down_proj, whose output a {model_type} layer "
                         f"normalises (post_feedforward_layernorm) before adding it to the stream, so the map "
                         f"cannot be folded there: use patch=lstsq (a least-squares map over the block, kept as a module)")
    model = cfg["model"]
    if model.get("device_map") is None and (why := device_problem(model.get("device"))):
        raise ValueError(f"model.device={model.get('device')!r} {why}")
    if cfg.get("save_model") is not None:  # the folder, before a run that ends in writing it
        check_value(Path_(), cfg["save_model"], "save_model")
        if why := foreign_folder(cfg["save_model"]):
            raise ValueError(f"save_model={cfg['save_model']}: {why}")
    if cfg.get("save_gguf") is not None:
        if not isinstance(cfg["save_gguf"], str) or not cfg["save_gguf"].endswith(".gguf"):
            raise ValueError(f"save_gguf={cfg['save_gguf']!r} must be the path of a .gguf file to write, or null")
        check_value(Path_(), str(Path(cfg["save_gguf"]).expanduser().parent), "save_gguf's folder")
        why = gguf_problem(cfg, narrows(cfg))
        if why:
            raise ValueError(f"save_gguf={cfg['save_gguf']}: {why}")
    if narrows(cfg) and num_layers is not None:
        pruned_layers(num_layers, p["protect_first"], p["protect_last"])
    if p["metric"] == "manual":
        idx = p.get("indices") or []
        if len(set(idx)) != p["n"] or any(not isinstance(i, int) or not 0 <= i < L for i in idx):
            raise ValueError(f"prune.indices={idx} must hold prune.n={p['n']} distinct layers in [0, {L - 1}]")
    for name, ds in {"data": d, **{f"eval.datasets.{k}": v for k, v in (e.get("datasets") or {}).items()}}.items():
        if not isinstance(ds, dict) or ds.get("source") not in data_lib.SOURCES:
            raise ValueError(f"{name} must be a data config (as in conf/data/) whose source is one of "
                             f"{list(data_lib.SOURCES)}, not {ds!r}")
        check(dict.fromkeys(data_lib.SOURCE_SETTINGS[ds["source"]]), ds, name, f"data.source={ds['source']}")
        check_value(Int(2, "context"), ds.get("seqlen", d["seqlen"]), f"{name}.seqlen", bounds)  # data's, if unset
        if ds["source"] == "brown":
            data_lib.brown_files(ds.get("path"))
        data_lib.local_data_files(ds, name)
