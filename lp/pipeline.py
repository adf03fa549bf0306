"""One experiment, end to end, in the stages of the method: calibrate -> select -> prune and patch ->
distill -> evaluate -> record.

:func:`run` takes a plain nested dict (what conf/ composes; no Hydra in here) and returns the record. Each
stage is a small function with plain inputs and outputs; what runs of one process share (the dense model,
the dense hidden states of the evaluation windows) lives in a :class:`Workspace`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import data as data_lib
from .calibration import STATS_FORMAT, BoundaryStats, collect_stats
from .engine import ENGINE_VERSION, ENGINES, PrefixStates
from .distill import TAIL_CHOICES, TRAIN_CHOICES, TeacherCache, distill_kl, distill_mse, trainable_parameters
from .evaluation import Prefix, perplexity, prefix_reuse_applies
from .hadamard import CONSTRUCTIONS, OFFICIAL, is_supported
from .intervals import rp_interval
from .models import Layout, count_parameters, load_model, local_content, model_config, resolve_source
from . import prunecomp
from .modules import MODEL_PRECISION, PRECISIONS
from .patches import PATCHES, PatchContext, build_patch
from .pruning import interface_position, interfaces, patches_of, pruned, save_pruned
from .records import (DamagedFile, OUTCOMES_FORMAT, RECORD_VERSION, cached_json, key_of, locked, outcomes_path, read_json,
                      record_problem,
                      save_outcomes, set_aside,
                      versions, write_json)
from .keys import DISTILL_USES, SETTING_GROUPS, group_settings
from .selection import METRICS, SelectionContext, patched_scores, select_layers
from .settings import Flag, Fraction, Int, Limit, Number, OneOf, Path_, check, check_value
from .tracking import BACKENDS, make_tracker
from .export import gguf_problem, prune_gguf
from .width import WidthPlan, pruned_layers, width_pruned
from .zeroshot import RP_METRICS, evaluate_tasks, local_task_dir, retention

log = logging.getLogger(__name__)

DISTILL_METHODS = ["none", "offline_kl", "mse"]
ZEROSHOT = "\0zeroshot"  # eval_prefixes' entry for the zero-shot batches (no data set is so named)
PREFIX_DISK_BUDGET = 2**30  # zero-shot prefix states are saved when they fit (the main job's: ~100 MB; a LLaMA-3-8B
#                            suite's are tens of GB: it keeps the in-process reuse of a sweep only)
PROBE_SAMPLES = 4  # calibration samples on which each patch is compared with no patch


# ------------------------------------------------------------------ validation (before any weights load)
# What each setting may be (lp.settings); the values, defaults included, are in conf/<group>/*.yaml, and a
# metric's or a patch's own settings come with its registration. Bounds that rules name are the model's:
# "layers" its last layer index, "start" the last start of an n-layer block, "context" its context length.
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
            "logger": {"backend": OneOf(BACKENDS)}}


OPTIONAL = {  # settings that mean something when left out, said where they are read
    "patch": {"precision": OneOf(PRECISIONS), "hadamard": OneOf(tuple(sorted(CONSTRUCTIONS)))},
    "eval": {"limit": Limit(), "num_fewshot": Int(0, none_ok=True), "zeroshot_batch_size": Int(1, none_ok=True)},
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
    if variant == "none" and dist["method"] != "none" and _trained(dist) not in TAIL_CHOICES:
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
             hidden_size: int | None = None, vocab_size: int | None = None) -> None:
    """Checks that need no weights: the config alone, then (given them) the model's layer count, context,
    hidden size and vocabulary. Each setting by its rule (:func:`_rules`, the metric's, the patch's, the
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
    if cfg.get("save_gguf") is not None:
        if not isinstance(cfg["save_gguf"], str) or not cfg["save_gguf"].endswith(".gguf"):
            raise ValueError(f"save_gguf={cfg['save_gguf']!r} must be the path of a .gguf file to write, or null")
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


# ------------------------------------------------------------------ what runs of one process share
@dataclass
class Workspace:
    """The dense model (loaded once per process) and the dense hidden states entering the first removed layer
    of the evaluation windows (:class:`Prefix`), kept within ``prefix_budget`` bytes, least recently used
    dropped first. At LLaMA-3-8B scale one prefix of WikiText-2 is ~2.5 GB of bf16 hidden states; the zero-shot
    states of the whole local suite at the 1.5B model's width ~7 GB. The budget: LP_PREFIX_BUDGET_GIB (default 4)."""

    prefix_budget: int = field(default_factory=lambda: int(float(os.environ.get("LP_PREFIX_BUDGET_GIB", "4")) * 2**30))
    _model: tuple = ()
    _model_key: str | None = None
    _prefixes: dict = field(default_factory=dict)

    def model(self, m: dict):
        key = key_of(m, local_content(m))
        if key != self._model_key:
            self._model, self._prefixes = (), {}
            self._model = load_model(m["name_or_path"], m.get("gguf_file"), m["dtype"],
                                     m["device"], m.get("device_map"), parts=m.get("parts"),
                                     sha256=m.get("sha256"), install=m.get("install") or "")
            self._model_key = key
        return self._model

    def prefix(self, model, windows: torch.Tensor, layer: int, batch_size: int, key: str,
               path: Path | None = None) -> Prefix | None:
        """The prefix of ``windows`` at ``layer``: kept in memory, else read from ``path`` (written by an earlier
        process; a damaged file is set aside), else computed (and written there when it fits PREFIX_DISK_BUDGET)."""
        if layer == 0:
            return None
        k = (key, layer)
        if k not in self._prefixes:
            if not prefix_reuse_applies(model):  # e.g. embeddings that enter layer 0 scaled: the plain path
                return None
            if path is not None and path.is_file():
                try:
                    self._prefixes[k] = Prefix.load(path, windows, layer, Layout(model).hidden_size)
                except DamagedFile as err:
                    set_aside(path, str(err))
            if k not in self._prefixes:
                self._prefixes[k] = Prefix.compute(model, windows, layer, batch_size)
                if path is not None and self._prefixes[k].nbytes <= PREFIX_DISK_BUDGET:
                    self._prefixes[k].save(path)
        return self._used(k)

    def zeroshot_prefix(self, layer: int, key: str, hidden_size: int, path: Path | None = None) -> PrefixStates | None:
        """The dense states entering ``layer`` of the zero-shot batches of evaluation ``key`` (lp.engine), filled
        by whichever evaluation computes them first; while empty, those ``path`` holds (written by an
        earlier process, :func:`keep_zeroshot_prefix`; a damaged file is set aside)."""
        if layer == 0:
            return None
        k = (key, "zeroshot", layer)
        if k not in self._prefixes:
            self._prefixes[k] = PrefixStates(layer, self.prefix_budget)
        states = self._prefixes[k]
        if not states.states and path is not None and path.is_file():
            try:
                states.load(path, hidden_size)
            except DamagedFile as err:
                set_aside(path, str(err))
        return self._used(k)

    def _used(self, k):
        """The entry ``k``, now the most recently used; the least recently used dropped past the budget."""
        self._prefixes[k] = self._prefixes.pop(k)
        while sum(p.nbytes for p in self._prefixes.values()) > self.prefix_budget and len(self._prefixes) > 1:
            self._prefixes.pop(next(iter(self._prefixes)))
        return self._prefixes.get(k)


WORKSPACE = Workspace()


# ------------------------------------------------------------------ keys
def model_key(cfg: dict) -> dict:
    """What identifies the model: its settings, and for a local path the SHA-256 of its files."""
    m = cfg["model"]
    key = {k: m.get(k) for k in ("name_or_path", "gguf_file", "dtype", "sha256", "parts")}
    content = local_content(m)
    return {**key, "content_sha256": content} if content else key


def data_key(cfg: dict) -> dict:
    return {**cfg["data"], **data_lib.content_key(cfg["data"])}


def eval_key(cfg: dict) -> dict:
    """eval's settings, with the SHA-256 of the local files that eval.datasets read, as data_key does for data."""
    out = group_settings(cfg, "eval")
    content = {name: data_lib.content_key(ds) for name, ds in (cfg["eval"].get("datasets") or {}).items()}
    if any(content.values()):
        out["datasets_content"] = content
    return out


def hadamard_of(cfg: dict) -> str:
    """The Hadamard basis of the run's rotated statistics: patch.hadamard, or for patches without the setting
    the official code's (``quarot``, LinearPatch's default), so that a sweep over patches calibrates once."""
    return cfg["patch"].get("hadamard", OFFICIAL)


def calib_stats_path(cfg: dict) -> Path:
    """Calibration statistics of (model, data, seed, Hadamard basis, what they hold, versions): small (a few
    (L+1) x d tensors), kept beside the records so that figures never need the model again."""
    key = key_of(model_key(cfg), data_key(cfg), cfg["seed"], {"hadamard": hadamard_of(cfg), "format": STATS_FORMAT},
                 versions())
    return Path(cfg["results_dir"]) / "stats" / f"calib_{key}.pt"


def run_id(cfg: dict) -> str:
    p = cfg["prune"]
    block = f"-s{p['start']}" if p.get("start") is not None else ""
    readable = (f"{cfg['model']['name']}__{cfg['data']['name']}__{p['metric']}-n{p['n']}{block}__"
                f"{cfg['patch']['variant']}__{cfg['distill']['method']}__{cfg['eval']['name']}__seed{cfg['seed']}")
    settings = [eval_key(cfg) if g == "eval" else group_settings(cfg, g) for g in SETTING_GROUPS]
    content = local_content(cfg["model"])
    if content:  # a local model: its files' content, so that a file changed in place is another run
        settings[0] = {**settings[0], "content_sha256": content}
    return f"{readable}__{key_of(*settings, data_key(cfg), cfg['seed'])}"


@contextmanager
def _timed(timings: dict, name: str):
    """Time a phase into ``timings`` (a phase timed in two parts adds them) and say when it starts and ends (a
    long run is never silent)."""
    log.info(f"{name} ...")
    t = time.perf_counter()
    yield
    took = time.perf_counter() - t
    timings[name] = round(timings.get(name, 0.0) + took, 3)
    log.info(f"{name} done in {took:.1f} s")


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}: the model's outputs are not finite (damaged weights, or an overflow "
                         f"in its dtype); nothing recorded")
    return value


# ------------------------------------------------------------------ stages
class Data:
    """Token windows of one run: calibration samples (drawn lazily: not needed when statistics are cached)
    and the evaluation windows of every perplexity data set."""

    def __init__(self, cfg: dict, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.bos = data_lib.bos_id(tokenizer, cfg["data"]["bos"])
        self._stream = None

    def stream(self) -> torch.Tensor:
        if self._stream is None:
            self._stream = data_lib.token_stream(self.tokenizer, data_lib.corpus_text(self.cfg["data"], "calib"),
                                                 self.cfg["cache_dir"])
        return self._stream

    def samples(self, n: int | None = None, seqlen: int | None = None, seed: int | None = None) -> torch.Tensor:
        d = self.cfg["data"]
        try:
            return data_lib.calibration_samples(self.stream(), n or d["calib_samples"], seqlen or d["seqlen"],
                                                self.cfg["seed"] if seed is None else seed, self.bos)
        except ValueError as err:  # a text too short for one window: name the file it came from
            raise ValueError(f"data ({data_lib.describe_source(d, 'calib')}): {err}; use a longer text or a "
                             f"smaller data.seqlen") from err

    def eval_windows(self) -> dict[str, torch.Tensor]:
        """Perplexity windows of the data config's evaluation split and of each of eval.datasets."""
        d, e = self.cfg["data"], self.cfg["eval"]
        out = {}
        for name, ds in {d["name"]: d, **(e.get("datasets") or {})}.items():
            seqlen = ds.get("seqlen", d["seqlen"])
            try:
                if ds.get("eval_windows") == "random_documents":  # the official LinearPatch C4 protocol
                    docs = data_lib.hf_documents(ds["hf_path"], ds["splits"]["eval"], ds.get("hf_name"),
                                                 ds["text_field"], ds.get("data_files"),
                                                 (ds.get("max_rows") or {}).get("eval"))
                    out[name] = data_lib.random_document_windows(self.tokenizer, docs, e.get("max_windows") or 256,
                                                                 seqlen, 0, self.bos)
                    continue
                text = data_lib.corpus_text(ds, "eval")
            except (RuntimeError, FileNotFoundError) as err:
                where = "data" if ds is d else f"eval.datasets.{name}"
                raise type(err)(f"{where}: {err} (valid: a data set you can reach; eval=ppl, eval=quick and "
                                f"eval=local evaluate data's own split only)") from err
            try:
                out[name] = data_lib.eval_windows(data_lib.token_stream(self.tokenizer, text, self.cfg["cache_dir"]), seqlen,
                                                  e.get("max_windows"), self.bos)
            except ValueError as err:  # a text too short for one window: name the file it came from
                where = "data" if ds is d else f"eval.datasets.{name}"
                raise ValueError(f"{where} ({data_lib.describe_source(ds, 'eval')}): {err}; use a longer text or "
                                 f"a smaller data.seqlen") from err
        return out


def calibrate(cfg: dict, model, data: Data) -> BoundaryStats:
    """Statistics of every layer boundary, from the cache when present (a damaged entry is set aside)."""
    path = calib_stats_path(cfg)
    layout = Layout(model)
    with locked(path):
        if path.is_file():
            try:
                return BoundaryStats.load(path, layout.num_layers, layout.hidden_size)
            except DamagedFile as e:
                set_aside(path, str(e))
        stats = collect_stats(model, data.samples(), cfg["data"]["calib_batch_size"],
                              progress=cfg["progress"], hadamard_construction=hadamard_of(cfg))
        stats.save(path, {"model": model_key(cfg), "data": data_key(cfg), "seed": cfg["seed"],
                          "hadamard": hadamard_of(cfg), **versions()})
    return stats


def _zeroshot_settings(cfg: dict) -> dict:
    e = cfg["eval"]
    tasks = list(e.get("tasks") or [])
    return dict(tasks=tasks, limit=e.get("limit"), num_fewshot=e.get("num_fewshot"),
                batch_size=e.get("zeroshot_batch_size") or e["batch_size"], engine=e["engine"],
                token_budget=e["token_budget"], include_path=local_task_dir() if tasks else None, seed=cfg["seed"],
                cache_dir=cfg["cache_dir"])


def engine_of(cfg: dict) -> dict | None:
    """The engine that scores the zero-shot tasks, with its version (None without tasks)."""
    e = cfg["eval"]
    if not e.get("tasks"):
        return None
    return {"name": e["engine"], "version": ENGINE_VERSION if e["engine"] == "lp" else versions()["lm_eval"]}


def evaluate(cfg: dict, model, tokenizer, windows: dict, prefixes: dict | None = None, label: str = "") -> dict:
    """Perplexity on every evaluation data set, and zero-shot accuracy on eval.tasks."""
    e, progress = cfg["eval"], cfg["progress"]
    prefixes = prefixes or {}
    ppl = {name: _finite(perplexity(model, w, e["batch_size"], progress, f"{label} perplexity ({name})",
                                    prefixes.get(name)), f"{label} perplexity on {name}")
           for name, w in windows.items()}
    zs = _zeroshot_settings(cfg)
    results, outcomes = evaluate_tasks(model, tokenizer, zs.pop("tasks"), prefix=prefixes.get(ZEROSHOT), **zs)
    return {"ppl": ppl, "zeroshot": results, "outcomes": outcomes}


def evaluate_dense(cfg: dict, model, tokenizer, windows: dict, prefixes: dict | None = None) -> dict:
    """The dense model's evaluation, cached per (model, data, eval settings, engine, seed, versions). When it
    runs, it fills the zero-shot prefix states that ``prefixes`` holds (the pruned evaluation starts there)."""
    key = key_of(model_key(cfg), data_key(cfg), eval_key(cfg), engine_of(cfg), cfg["seed"], versions())
    tasks = _zeroshot_settings(cfg)["tasks"]
    zs_prefix = {ZEROSHOT: prefixes[ZEROSHOT]} if ZEROSHOT in (prefixes or {}) else None
    return cached_json(Path(cfg["cache_dir"]) / "dense" / f"{key}.json",
                       lambda: evaluate(cfg, model, tokenizer, windows, zs_prefix, label="dense"),
                       lambda entry: _dense_problem(entry, windows, tasks))


def _dense_problem(dense: dict, windows: dict, tasks: list[str]) -> str | None:
    """Why a dense-evaluation cache entry cannot be used (None if it can): what evaluate() writes, for these
    evaluation data sets and tasks."""
    ppl, zs, out = dense.get("ppl"), dense.get("zeroshot"), dense.get("outcomes")
    if not isinstance(ppl, dict) or not all(isinstance(ppl.get(k), (int, float)) for k in windows):
        return f"not a dense evaluation: 'ppl' should hold a number for each of {sorted(windows)}"
    if not isinstance(zs, dict) or set(zs) != set(tasks) or not all(isinstance(v, dict) for v in zs.values()):
        return f"not a dense evaluation: 'zeroshot' should hold the results of tasks {tasks}"
    if not isinstance(out, dict) or set(out) != set(tasks):
        return "no per-document outcomes for its tasks (made by an older lp)"
    return None


def select(cfg: dict, model, stats: BoundaryStats, data: Data) -> tuple[list[int], dict, dict | None]:
    """The layers to remove, what the selection fitted for the patch, and the score of every candidate
    (``prune=patched``; else None). ``patch=streamline_layer`` replaces n+1 contiguous layers by one trained
    layer, as LLM-Streamline's official code does, so that n layers are removed net; ``patch=prunecomp``
    removes them one at a time, compensating each (lp.prunecomp)."""
    p = cfg["prune"]
    scored = METRICS[p["metric"]].runs_model
    replaces = PATCHES[cfg["patch"]["variant"]].replaces_block
    ctx = SelectionContext(stats=stats, n=p["n"] + replaces, start=p.get("start"), indices=p.get("indices"), seed=cfg["seed"],
                           model=model if scored else None, settings=p, samples=_score_samples(cfg, data) if scored else None,
                           batch_size=cfg["data"]["calib_batch_size"])
    if narrows(cfg):  # width pruning (LLM-Pruner): no layer goes, every layer narrows
        return [], {"width": METRICS[p["metric"]].width(ctx)}, None
    if cfg["patch"]["variant"] == "prunecomp":
        pick = lambda m, st: select_layers(p["metric"], replace(ctx, stats=st, n=1, model=m if scored else None))[0]  # noqa: E731
        removed, scales = prunecomp.select(model, data.samples(), p["n"], pick, ctx.batch_size, cfg["progress"])
        return removed, {"prunecomp": scales}, None
    if p["metric"] == "patched" and ctx.n:
        scoring = {**cfg, "patch": {**cfg["patch"], "variant": scoring_patch(cfg)}}
        ctx.make_patch = patch_maker(scoring, model, stats, data, {})
        ctx.scores = _cached_scores(cfg, lambda: patched_scores(ctx))
    removed = select_layers(p["metric"], ctx)
    if replaces and len(interfaces(removed)) != 1:
        raise ValueError(f"patch={cfg['patch']['variant']} replaces one contiguous block, but prune.metric="
                         f"{p['metric']} chose {removed}: use a contiguous metric (cosine, angular, last)")
    return removed, {}, ctx.scores


def scoring_patch(cfg: dict) -> str:
    """The training-free patch that ``prune=patched`` scores each block with: prune.patch, or the run's."""
    variant = cfg["prune"].get("patch") or cfg["patch"]["variant"]
    cheap = [v for v, m in PATCHES.items() if m.from_statistics]
    if variant not in cheap:
        raise ValueError(f"prune.metric=patched scores blocks with a patch built from the calibration statistics "
                         f"alone; patch={variant} is not one: set ++prune.patch to one of {cheap}")
    return variant


def _score_samples(cfg: dict, data: Data) -> torch.Tensor:
    """What model-scoring metrics score on: calibration samples (ppl, sleb, taylor: their official protocol),
    or for ``patched`` held-out calibration windows that share no token with the statistics' samples."""
    p, d = cfg["prune"], cfg["data"]
    if p["metric"] != "patched":
        return data.samples(p.get("score_samples"), p.get("score_seqlen"))
    return data_lib.held_out_samples(data.stream(), p["score_samples"], p.get("score_seqlen") or d["seqlen"],
                                     cfg["seed"] + 2, (d["calib_samples"], d["seqlen"], cfg["seed"]), data.bos)


def _cached_scores(cfg: dict, compute) -> dict[int, float]:
    """Candidate scores of ``prune=patched``, cached on everything that changes them: the model, data, seed,
    the prune and patch settings, the statistics they are built from, versions."""
    key = key_of(model_key(cfg), data_key(cfg), cfg["seed"], {**group_settings(cfg, "prune"), "patch": None},
                 {"variant": scoring_patch(cfg), "hadamard": hadamard_of(cfg),
                  "precision": cfg["patch"].get("precision", MODEL_PRECISION)}, calib_stats_path(cfg).name, versions())
    entry = cached_json(Path(cfg["cache_dir"]) / "selection" / f"{key}.json",
                        lambda: {"scores": {str(s): v if math.isfinite(v) else None for s, v in compute().items()}},
                        _score_table_problem)  # JSON holds no inf / nan: a non-finite score is kept as null
    return {int(s): math.nan if v is None else float(v) for s, v in entry["scores"].items()}


def _score_table_problem(entry: dict) -> str | None:
    scores = entry.get("scores")
    if not isinstance(scores, dict) or not scores or not all(
            k.lstrip("-").isdigit() and (v is None or isinstance(v, (int, float))) for k, v in scores.items()):
        return "not a score table: 'scores' should map block starts to numbers"
    return None


def patch_maker(cfg: dict, model, stats: BoundaryStats, data: Data, fitted: dict):
    """make_patch for :func:`lp.pruning.pruned`: the configured patch of each interface."""
    variant = cfg["patch"]["variant"]
    fits = PATCHES[variant].needs_hidden_states
    ctx = PatchContext(stats, settings=cfg["patch"], fitted=fitted, seed=cfg["seed"],
                       model=model if fits else None, samples=data.samples(cfg["patch"].get("fit_samples")) if fits else None,
                       batch_size=cfg["data"]["calib_batch_size"])
    return lambda s, e: build_patch(variant, ctx, s, e)


def first_changed(cfg: dict, removed: list[int]) -> int:
    """The first layer that pruning changes: the first removed one, or layer s-1 itself when the patch folds
    into it (replaceme). The layers before it, and their outputs, are the dense model's."""
    if narrows(cfg):  # the layers before the first narrowed one are dense
        return cfg["prune"]["protect_first"]
    return max(min(removed, default=0) - PATCHES[cfg["patch"]["variant"]].changes_earlier_layer, 0)


def eval_prefixes(cfg: dict, ws: Workspace, model, windows: dict, removed: list[int]) -> dict:
    """The dense hidden states entering the first layer that pruning changes, per evaluation data set (the
    layers before it need not run again), and under "zeroshot" the states of lp's engine's batches."""
    e = cfg["eval"]
    if not e["prefix_reuse"]:
        return {}
    first = first_changed(cfg, removed)
    ekey = key_of(model_key(cfg), data_key(cfg), eval_key(cfg))
    out = {name: ws.prefix(model, w, first, e["batch_size"], f"{ekey}/{name}", prefix_path(cfg, first, name))
           for name, w in windows.items()}
    if e.get("tasks") and e["engine"] == "lp":
        out[ZEROSHOT] = ws.zeroshot_prefix(first, ekey, Layout(model).hidden_size, prefix_path(cfg, first, "zeroshot"))
    return out


def prefix_path(cfg: dict, layer: int, what: str) -> Path:
    """Where the dense states entering ``layer`` are kept between processes, for the perplexity windows of
    evaluation data set ``what`` or for the zero-shot batches (``"zeroshot"``): keyed on what they are
    computed from (the model, where it runs, the data, the evaluation and its engine, the layer, versions)."""
    m = cfg["model"]
    key = key_of(model_key(cfg), {"device": m.get("device"), "device_map": m.get("device_map")}, data_key(cfg),
                 eval_key(cfg), engine_of(cfg) if what == "zeroshot" else None, layer, what, versions())
    return Path(cfg["cache_dir"]) / "prefix" / f"{key}.pt"


def keep_zeroshot_prefix(cfg: dict, prefixes: dict) -> None:
    """Save the zero-shot prefix states a run computed (the dense or the pruned evaluation fills them) when they
    fit PREFIX_DISK_BUDGET, so that the next process's pruned evaluation starts there too."""
    states = prefixes.get(ZEROSHOT)
    if states is None or len(states.states) <= states.loaded or states.nbytes > PREFIX_DISK_BUDGET:
        return
    try:
        states.save(prefix_path(cfg, states.layer, "zeroshot"))
    except OSError as err:  # a cache that cannot be written costs the next process time, never this run's record
        log.warning(f"the zero-shot prefix states were not kept: {err}")
        return
    states.loaded = len(states.states)


class PatchCheck:
    """The patch against no patch on held calibration samples: a patch can hurt (README). ``none`` is
    measured on the pruned, unpatched model before patching, ``patched`` after."""

    def __init__(self, cfg: dict, model, data: Data, removed: list[int]):
        self.cfg, self.result = cfg, {}
        if cfg["patch"]["variant"] != "none":
            self.probe = data.samples(PROBE_SAMPLES)
            with pruned(model, removed, lambda *_: None):
                self.result["none"] = self._ppl(model)

    def _ppl(self, model) -> float:
        return perplexity(model, self.probe, self.cfg["data"]["calib_batch_size"], progress=False)

    def patched(self, model) -> dict | None:
        if not self.result:
            return None
        self.result["patched"] = self._ppl(model)
        if self.result["patched"] > self.result["none"]:
            log.warning(f"patch={self.cfg['patch']['variant']} raises calibration perplexity over no patch "
                        f"({self.result['none']:.3f} -> {self.result['patched']:.3f} on {PROBE_SAMPLES} samples)")
        return self.result


def prepare_distill(cfg: dict, model, data: Data, removed: list[int]):
    """On the dense model, before pruning: the teacher cache (offline_kl) or the dense hidden-state pairs
    (mse). Distillation samples are drawn from the calibration split with their own seed."""
    dist = cfg["distill"]
    if dist["method"] == "none":
        return None
    n_train, n_val = dist["samples"], dist["val_samples"] or 0
    drawn = data.samples(n_train + n_val, dist["seqlen"], cfg["seed"] + 1)
    train, val = drawn[:n_train], drawn[n_train:]
    if dist["method"] == "mse":
        ctx = PatchContext(None, model=model, samples=train, batch_size=dist["batch_size"])
        return {interface_position(removed, e): list(ctx.pairs(s, e)) for s, e in interfaces(removed)}
    key = key_of(model_key(cfg), data_key(cfg), {k: dist[k] for k in ("samples", "val_samples", "seqlen", "topk",
                                                                         "batch_size")}, cfg["seed"], versions())
    caches = {}
    for name, x in (("train", train), ("val", val)):
        if len(x):
            root = Path(cfg["cache_dir"]) / "teacher" / key / name
            with locked(root):
                cache = TeacherCache(root, len(x), dist["seqlen"], dist["topk"], dist["batch_size"])
                caches[name] = (cache.build(model, x, cfg["progress"]), x)
    return caches


def _trained(dist: dict) -> str:
    """What distillation trains (lp.distill.TRAIN_CHOICES): distill.train for offline_kl; mse trains the
    patches alone and has no such setting."""
    return dist["train"] if dist["method"] == "offline_kl" else "patch"


def distill(cfg: dict, model, removed: list[int], prepared, on_step=None):
    dist = cfg["distill"]
    common = dict(lr=float(dist["lr"]), weight_decay=float(dist["weight_decay"]), epochs=dist["epochs"],
                  progress=cfg["progress"])
    if dist["method"] == "mse":
        return distill_mse(model, prepared.__getitem__, **common)
    train_cache, train = prepared["train"]
    val_cache, val = prepared.get("val", (None, None))
    return distill_kl(model, train_cache, train, val_cache, val, min_lr_factor=dist["min_lr_factor"],
                      train=_trained(dist), early_stop=dist["early_stop"],
                      autocast_dtype=dist["autocast"], on_step=on_step, **common)


@contextmanager
def _restored(params):
    """Put ``params`` back to their current values on exit (distillation may train shared norm weights)."""
    saved = [(p, p.detach().clone()) for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)


def distill_stage(cfg: dict, model, removed: list[int], prepared, windows: dict, prefixes: dict, stack: ExitStack,
                  timings: dict, tracker) -> tuple[float | None, object]:
    """Training-free perplexity, then distillation of the patch (its trained parameters restored when the
    run's pruned context closes): (training-free perplexity, distillation result), or (None, None)."""
    if prepared is None:
        return None, None
    name, e = cfg["data"]["name"], cfg["eval"]
    ppl_free = _finite(perplexity(model, windows[name], e["batch_size"], cfg["progress"],
                                  "training-free perplexity", prefixes.get(name)), "training-free perplexity")
    trained = trainable_parameters(model, _trained(cfg["distill"]))
    stack.enter_context(_restored(trained))
    with _timed(timings, "distill"):
        result = distill(cfg, model, removed, prepared,
                         on_step=lambda step, h: tracker.log({f"distill/{k}": v for k, v in h.items()}, step))
    result.trained_params = sum(p.numel() for p in trained)
    return ppl_free, result


# ------------------------------------------------------------------ the run
def run(cfg: dict, group: str | None = None, workspace: Workspace | None = None) -> dict:
    ws = workspace or WORKSPACE
    # what the config can tell, with the model's layer count and context length from its config file: all
    # before the weights load
    validate(cfg, *model_config(cfg["model"])) if cfg["model"].get("name_or_path") else validate(cfg)
    device = cfg["model"].get("device")
    if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():  # before the load
        raise ValueError(f"model.device={device}: torch sees no CUDA device here (torch {torch.__version__}); use "
                         f"model.device=cpu, or a CUDA build of torch on a GPU machine")
    rid = run_id(cfg)
    record_path = Path(cfg["results_dir"]) / "records" / f"{rid}.json"
    if cfg.get("resume"):
        try:
            old = read_json(record_path)
        except DamagedFile as e:  # a damaged record is redone; any other error is not resume's to hide
            log.warning(f"resume: {e}; the run is redone")
            old = None
        why = record_problem(old, record_path) if old is not None else "no record"
        if old is not None and why is not None:
            log.warning(f"resume: {record_path} is not a complete record ({why}); the run is redone")
        if why is None and not cfg.get("save_model"):
            log.info(f"resume: {record_path} is complete, skipped")
            if cfg.get("save_gguf"):  # the record names the removed layers: the file needs no model
                write_gguf(cfg, old["removed"], model_config(cfg["model"], "layer_types"))
            return old
        if why is None:  # the record is done but the model was asked for: rebuilt from the caches
            log.info(f"resume: {record_path} is complete, but save_model={cfg['save_model']} asks for the model: "
                     f"rebuilding it (calibration and the dense evaluation come from their caches)")
    tracker = make_tracker(cfg["logger"], cfg, rid, group)
    try:
        record = _run(cfg, ws, rid, group, tracker, record_path)
        tracker.finish_run(record, record_path)
    except BaseException as err:
        tracker.fail(err)
        raise
    _summary(record, record_path)
    return record


def _run(cfg: dict, ws: Workspace, rid: str, group: str | None, tracker, record_path: Path) -> dict:
    timings: dict = {}
    torch.manual_seed(cfg["seed"])
    with _timed(timings, "load"):
        model, tokenizer = ws.model(cfg["model"])
    if not cfg["model"].get("name_or_path"):  # checked against the model's layer count before it loaded otherwise
        validate(cfg, Layout(model).num_layers)
    data = Data(cfg, tokenizer)
    with _timed(timings, "calibration"):
        stats = calibrate(cfg, model, data)
    tracker.log({"time/calibration": timings["calibration"]})
    with _timed(timings, "eval_windows"):
        windows = data.eval_windows()
    with _timed(timings, "selection"):
        removed, fitted, scores = select(cfg, model, stats, data)
    tracker.log({"removed": str(removed), "time/selection": timings["selection"]})
    with _timed(timings, "eval_prefixes"):  # the dense hidden states entering the first changed layer
        prefixes = eval_prefixes(cfg, ws, model, windows, removed)
    with _timed(timings, "dense_eval"):  # fills the zero-shot prefix states when it runs
        dense = evaluate_dense(cfg, model, tokenizer, windows, prefixes)
    out = {"removed": removed, "fitted": fitted, "selection_scores": scores, "num_layers": Layout(model).num_layers,
           "params_dense": count_parameters(model)}
    kinds = list(getattr(model.config, "layer_types", None) or [])  # the dense model's, for save_gguf
    with _timed(timings, "teacher"):
        prepared = prepare_distill(cfg, model, data, removed)
    with _timed(timings, "patch_check"):
        check = PatchCheck(cfg, model, data, removed)
    with ExitStack() as stack:
        with _timed(timings, "patch"):
            width = stack.enter_context(width_pruned(model, fitted["width"])) if "width" in fitted else None
            spec = stack.enter_context(pruned(model, removed, patch_maker(cfg, model, stats, data, fitted)))
        with _timed(timings, "patch_check"):  # its second part: the patched model on the same samples
            out["patch_check"] = check.patched(model)
        out.update(params_pruned=count_parameters(model), maps=spec.maps,
                   patch_params=sum(count_parameters(p) for p in patches_of(model).values()))
        out["ppl_free"], out["distilled"] = distill_stage(cfg, model, removed, prepared, windows, prefixes, stack,
                                                          timings, tracker)
        with _timed(timings, "pruned_eval"):
            pruned_eval = evaluate(cfg, model, tokenizer, windows, prefixes, label="pruned")
        record = make_record(cfg, rid, group, data, stats, windows, timings, dense, pruned_eval, **out)
        try:
            if pruned_eval["outcomes"]:  # the side file first: a complete record always has its outcomes
                save_outcomes(outcomes_path(record_path), dense["outcomes"], pruned_eval["outcomes"])
            write_json(record_path, record)  # the record first: a failed save below loses no evaluation
        except OSError as e:
            _rescue(record, dense["outcomes"], pruned_eval["outcomes"], record_path, e)
            raise
        keep_zeroshot_prefix(cfg, prefixes)
        if cfg.get("save_model"):
            save_pruned(model, tokenizer, cfg["save_model"], replace(spec, variant=cfg["patch"]["variant"],
                                                                     widths=width.shapes() if width else {}))
        if cfg.get("save_gguf"):
            write_gguf(cfg, removed, kinds)
    return record


def _rescue(record: dict, dense_outcomes: dict, pruned_outcomes: dict, record_path: Path, err: OSError) -> None:
    """A finished run whose record could not be written (a full disk): the record and its outcomes, as the
    files would have held them, go to the log in full and to the first writable of the system's temporary
    folder and the home folder; the error names where, so that nothing finished is lost."""
    import tempfile

    blob = json.dumps({"record": record, "outcomes": {"format": OUTCOMES_FORMAT, "dense": dense_outcomes,
                                                     "pruned": pruned_outcomes}}, default=str, separators=(",", ":"))
    log.error(f"could not write {record_path} ({err}); the finished record and its outcomes follow in full "
              f"(JSON: {{'record': ..., 'outcomes': ...}}), one line:\n{blob}")
    for folder in (Path(tempfile.gettempdir()), Path.home()):
        path = folder / "lp-rescued" / record_path.name
        try:
            if pruned_outcomes:
                save_outcomes(outcomes_path(path), dense_outcomes, pruned_outcomes)
            write_json(path, record)
        except OSError:
            continue
        log.error(f"the finished record and its outcomes were written to {path.parent}: move {path.name} (and "
                  f"{outcomes_path(path).name}) into {record_path.parent} once there is space")
        return
    log.error("no folder could take the finished record: it is in the log above")


def write_gguf(cfg: dict, removed: list[int], kinds: list | None) -> None:
    """save_gguf: the model's own GGUF file without the removed layers (lp.export; the config checked by
    validate); ``kinds``: the dense model's layer types."""
    m = cfg["model"]
    folder, name = resolve_source(m["name_or_path"], m.get("gguf_file"), m.get("parts"), m.get("sha256"), m.get("install", ""))
    log.info(f"save_gguf: wrote {prune_gguf(Path(folder) / name, cfg['save_gguf'], removed, kinds)}")


def make_record(cfg: dict, rid: str, group: str | None, data: Data, stats: BoundaryStats, windows: dict, timings: dict,
                dense: dict, pruned_eval: dict, *, removed: list[int], fitted: dict, selection_scores: dict | None,
                num_layers: int,
                params_dense: int, params_pruned: int, patch_params: int, patch_check: dict | None, maps: dict,
                ppl_free: float | None, distilled) -> dict:
    main = cfg["data"]["name"]
    zs_dense, zs_pruned = dense["zeroshot"], pruned_eval["zeroshot"]
    joins = interfaces(removed)
    return {
        "version": RECORD_VERSION, "status": "complete", "run_id": rid, "group": group,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": cfg["model"]["name"], "data": main, "metric": cfg["prune"]["metric"], "n": cfg["prune"]["n"],
        "patch": cfg["patch"]["variant"], "distill": cfg["distill"]["method"], "eval": cfg["eval"]["name"],
        "seed": cfg["seed"], "bos": data.bos is not None,
        "num_layers": num_layers, "removed": removed, "interfaces": [list(j) for j in joins],
        "similarity": [_finite(round(stats.cos[s, t].item(), 6), f"cosine similarity of boundaries {s} and {t}")
                       for s, t in joins],
        "params_dense": params_dense, "params_pruned": params_pruned, "patch_params": patch_params,
        "prune_ratio": round(1 - params_pruned / params_dense, 6),
        "fitted": {k: d.record() if isinstance(d, WidthPlan) else {str(i): v for i, v in d.items()}
                   for k, d in fitted.items()} or None,
        "selection_scores": {str(i): v if math.isfinite(v) else None for i, v in selection_scores.items()}
                            if selection_scores else None,
        "folded_maps": maps or None, "patch_check": patch_check,
        "ppl": {"dense": dense["ppl"][main], "pruned": pruned_eval["ppl"][main],
                **({"training_free": ppl_free} if ppl_free is not None else {}),
                "datasets": {k: {"dense": dense["ppl"][k], "pruned": v} for k, v in pruned_eval["ppl"].items()}},
        "distill_result": {"steps": distilled.steps, "loss": [h["loss"] for h in distilled.history],
                           "val": distilled.val, "stopped": distilled.stopped,
                           "trained_params": distilled.trained_params} if distilled else None,
        "zeroshot": {"dense": zs_dense, "pruned": zs_pruned,
                     "lm_eval": versions()["lm_eval"] if zs_dense else None, "engine": engine_of(cfg)},
        "retention": _retention(cfg, dense, pruned_eval),
        "outcomes": outcomes_path(f"{rid}.json").name if pruned_eval["outcomes"] else None,
        "eval_tokens": windows[main].numel(), "calib_tokens": stats.tokens,
        "calib_stats": str(calib_stats_path(cfg)), "versions": versions(), "timings": timings, "config": cfg,
    }


def _retention(cfg: dict, dense: dict, pruned_eval: dict) -> dict:
    """RP with its standard error and its paired bootstrap interval (``ci``, settings ``bootstrap.*``)."""
    metric = cfg["eval"]["rp_metric"]
    out = retention(dense["zeroshot"], pruned_eval["zeroshot"], metric)
    if out:
        b = cfg.get("bootstrap") or {}
        ci = rp_interval(dense["outcomes"], pruned_eval["outcomes"], metric, b["resamples"],
                         b["seed"], b["level"])
        out["rp_ci"] = {k: v for k, v in ci.items() if k != "rp"}
    return out


def _summary(record: dict, path: Path) -> None:
    """The short end-of-run summary, on stdout (the rest goes to the log)."""
    ppl = record["ppl"]
    width = (record.get("fitted") or {}).get("width")
    layers = sorted(int(i) for i in width["layers"]) if width else []
    what = (f"narrowed layers {layers[0]}-{layers[-1]} by {width['ratio']:.2%}" if layers else
            f"removed {record['removed']}")
    print(f"[lp] {record['run_id']}\n     {what}  ppl dense {ppl['dense']:.2f}  "
          f"pruned {ppl['pruned']:.2f}  params {record['params_dense']:,} -> {record['params_pruned']:,}")
    if record["retention"]:
        print(format_table(record["zeroshot"]["dense"], record["zeroshot"]["pruned"], record["retention"]))
    print(f"     record: {path}")


def format_table(dense: dict, pruned: dict, rp: dict) -> str:
    m = rp["metric"]
    rows = [f"     {'task':<22}{'dense':>8}{'pruned':>8}{'RP %':>8}"]
    for t in dense:
        flag = "  (dense at chance)" if t in rp.get("at_chance", []) else ""
        task_rp = rp["per_task"][t]  # None where the dense model got none right
        rows.append(f"     {t:<22}{dense[t][m]:>8.4f}{pruned[t][m]:>8.4f}"
                    f"{'-' if task_rp is None else f'{task_rp:.2f}':>8}{flag}")
    err = f" ± {rp['rp_stderr']:.2f}" if "rp_stderr" in rp else ""
    if (rp.get("rp_ci") or {}).get("ci"):
        ci = rp["rp_ci"]
        err = f"  [{ci['ci'][0]:.2f}, {ci['ci'][1]:.2f}] ({100 * ci['level']:.0f}% paired bootstrap)"
    rows.append(f"     {'average (' + m + ')':<22}{rp['avg_dense']:>8.4f}{rp['avg_pruned']:>8.4f}{rp['rp']:>8.2f}{err}")
    if rp.get("at_chance"):
        rows.append(f"     RP rests on tasks where the dense model is at chance: {rp['at_chance']}")
    return "\n".join(rows)
