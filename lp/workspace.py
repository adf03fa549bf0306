"""What runs of one process share, and where every artefact of a run is kept, keyed on what it depends on.

:class:`Workspace`: the dense model (loaded once per process) and the dense hidden states entering the first
changed layer (perplexity windows and zero-shot batches). The keys (:func:`model_key`, :func:`data_key`,
:func:`eval_key`, :func:`run_id`) and the one place each cache file is named (:func:`calib_stats_path`,
:func:`prefix_path`, :func:`dense_eval_path`, :func:`teacher_path`, :func:`scores_path`). Other caches: lp.data (corpus token streams), lp.harness (lm-eval requests and token ids),
lp.tasks (the local task folder), lp.distill (teacher logits).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import data as data_lib
from .calibration import STATS_FORMAT
from .engine import ENGINE_VERSION, PrefixStates
from .evaluation import Prefix, prefix_budget, prefix_reuse_applies
from .keys import SETTING_GROUPS, group_settings
from .models import Layout, load_model, local_content
from .files import DamagedFile, cached_json, key_of, set_aside, versions
from .modules import MODEL_PRECISION
from .validation import hadamard_of, scoring_patch

log = logging.getLogger(__name__)

ZEROSHOT = "\0zeroshot"  # eval_prefixes' entry for the zero-shot batches (no data set is so named)
PREFIX_DISK_BUDGET = 2**30  # zero-shot prefix states are saved when they fit (the main job's: ~100 MB; a LLaMA-3-8B
#                            suite's are tens of GB: it keeps the in-process reuse of a sweep only)


@dataclass
class Workspace:
    """The dense model (loaded once per process) and the dense hidden states entering the first removed layer
    of the evaluation windows (:class:`Prefix`), kept within ``prefix_budget`` bytes, least recently used
    dropped first. At LLaMA-3-8B scale one prefix of WikiText-2 is ~2.5 GB of bf16 hidden states; the zero-shot
    states of the whole local suite at the 1.5B model's width ~7 GB. The budget: LP_PREFIX_BUDGET_GIB (default 4)."""

    prefix_budget: int = field(default_factory=prefix_budget)
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


def engine_of(cfg: dict) -> dict | None:
    """The engine that scores the zero-shot tasks, with its version (None without tasks)."""
    e = cfg["eval"]
    if not e.get("tasks"):
        return None
    out = {"name": e["engine"], "version": ENGINE_VERSION if e["engine"] == "lp" else versions()["lm_eval"]}
    if e["engine"] == "lp" and e.get("attention", "sdpa") != "sdpa":  # the default unnamed: earlier caches stay valid
        out["attention"] = e["attention"]
    return out


def dense_eval_path(cfg: dict) -> Path:
    """The dense model's evaluation (perplexities, zero-shot results, per-document outcomes): keyed on the model,
    data, evaluation settings and engine, seed, versions."""
    key = key_of(model_key(cfg), data_key(cfg), eval_key(cfg), engine_of(cfg), cfg["seed"], versions())
    return Path(cfg["cache_dir"]) / "dense" / f"{key}.json"


def teacher_path(cfg: dict, split: str) -> Path:
    """The teacher's top-k logits for distillation's ``split`` ("train" or "val"), keyed on the model, data, the
    distillation samples' settings, seed, versions."""
    dist = cfg["distill"]
    key = key_of(model_key(cfg), data_key(cfg), {k: dist[k] for k in ("samples", "val_samples", "seqlen", "topk",
                                                                         "batch_size")}, cfg["seed"], versions())
    return Path(cfg["cache_dir"]) / "teacher" / key / split


def scores_path(cfg: dict) -> Path:
    """Candidate scores of ``prune=patched``, keyed on everything that changes them: the model, data, seed, the
    prune settings, the scoring patch and its settings, the statistics they are built from, versions."""
    key = key_of(model_key(cfg), data_key(cfg), cfg["seed"], {**group_settings(cfg, "prune"), "patch": None},
                 {"variant": scoring_patch(cfg), "hadamard": hadamard_of(cfg),
                  "precision": cfg["patch"].get("precision", MODEL_PRECISION)}, calib_stats_path(cfg).name, versions())
    return Path(cfg["cache_dir"]) / "selection" / f"{key}.json"


def search_path(cfg: dict) -> Path:
    """The layers a search metric (``prune=evopress``) chose, keyed on everything that changes them: the model,
    data, seed, the prune settings, and (only when the search scores the patched model, ``prune.in_loop``) the
    patch, its settings and the statistics it is built from, versions. Runs that differ only after the search
    (another patch on the same layers, another evaluation) share it."""
    patch = ({"variant": cfg["patch"]["variant"], "hadamard": hadamard_of(cfg), "settings": group_settings(cfg, "patch"),
              "stats": calib_stats_path(cfg).name} if cfg["prune"].get("in_loop") else None)
    key = key_of(model_key(cfg), data_key(cfg), cfg["seed"], {**group_settings(cfg, "prune"), "patch": patch}, versions())
    return Path(cfg["cache_dir"]) / "search" / f"{key}.json"


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


def dense_eval_problem(dense: dict, windows: dict, tasks: list[str]) -> str | None:
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


def cached_scores(cfg: dict, compute) -> dict[int, float]:
    """Candidate scores of ``prune=patched``, cached on everything that changes them: the model, data, seed,
    the prune and patch settings, the statistics they are built from, versions."""
    entry = cached_json(scores_path(cfg),
                        lambda: {"scores": {str(s): v if math.isfinite(v) else None for s, v in compute().items()}},
                        _score_table_problem)  # JSON holds no inf / nan: a non-finite score is kept as null
    return {int(s): math.nan if v is None else float(v) for s, v in entry["scores"].items()}


def _score_table_problem(entry: dict) -> str | None:
    scores = entry.get("scores")
    if not isinstance(scores, dict) or not scores or not all(
            k.lstrip("-").isdigit() and (v is None or isinstance(v, (int, float))) for k, v in scores.items()):
        return "not a score table: 'scores' should map block starts to numbers"
    return None


def cached_search(cfg: dict, compute) -> list[int]:
    """The layers ``compute()`` (a search) chooses, from :func:`search_path` when a run already searched."""
    n = cfg["prune"]["n"]

    def problem(entry: dict) -> str | None:
        removed = entry.get("removed")
        ok = isinstance(removed, list) and len(set(removed)) == n and all(isinstance(i, int) for i in removed)
        return None if ok else f"not a search result: 'removed' should list {n} distinct layers"

    return cached_json(search_path(cfg), lambda: {"removed": compute()}, problem)["removed"]
