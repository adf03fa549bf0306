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
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import data as data_lib
from .calibration import BoundaryStats, collect_stats
from .distill import TeacherCache, distill_kl, distill_mse, trainable_parameters
from .evaluation import perplexity
from .intervals import rp_interval
from .models import Layout, count_parameters, model_config, resolve_source
from . import prunecomp
from .modules import MODEL_PRECISION
from .patches import PATCHES, PatchContext, build_patch
from .pruning import interface_position, interfaces, patches_of, pruned, save_pruned
from .records import (DamagedFile, OUTCOMES_FORMAT, RECORD_VERSION, cached_json, key_of, locked, outcomes_path, read_json,
                      record_problem, save_outcomes, set_aside, versions, write_json)
from .keys import group_settings
from .report.printout import summary
from .selection import METRICS, SelectionContext, patched_scores, select_layers
from .tracking import make_tracker
from .export import prune_gguf
from .validation import hadamard_of, narrows, scoring_patch, trained, validate
from .width import WidthPlan, width_pruned
from .workspace import (WORKSPACE, ZEROSHOT, Workspace, calib_stats_path, data_key, engine_of, eval_key,
                        keep_zeroshot_prefix, model_key, prefix_path, run_id)
from .zeroshot import evaluate_tasks, local_task_dir, retention

log = logging.getLogger(__name__)

PROBE_SAMPLES = 4  # calibration samples on which each patch is compared with no patch


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


def distill(cfg: dict, model, removed: list[int], prepared, on_step=None):
    dist = cfg["distill"]
    common = dict(lr=float(dist["lr"]), weight_decay=float(dist["weight_decay"]), epochs=dist["epochs"],
                  progress=cfg["progress"])
    if dist["method"] == "mse":
        return distill_mse(model, prepared.__getitem__, **common)
    train_cache, train = prepared["train"]
    val_cache, val = prepared.get("val", (None, None))
    return distill_kl(model, train_cache, train, val_cache, val, min_lr_factor=dist["min_lr_factor"],
                      train=trained(dist), early_stop=dist["early_stop"],
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
    params = trainable_parameters(model, trained(cfg["distill"]))
    stack.enter_context(_restored(params))
    with _timed(timings, "distill"):
        result = distill(cfg, model, removed, prepared,
                         on_step=lambda step, h: tracker.log({f"distill/{k}": v for k, v in h.items()}, step))
    result.trained_params = sum(p.numel() for p in params)
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
    summary(record, record_path)
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


