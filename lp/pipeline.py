"""One experiment, end to end, in the stages of the method: calibrate -> select -> prune and patch ->
distill -> evaluate -> record.

:func:`run` takes a plain nested dict (what conf/ composes; no Hydra in here) and returns the record. Each
stage is a small function with plain inputs and outputs; what runs of one process share (the dense model,
the dense hidden states of the evaluation windows) lives in a :class:`Workspace`.
"""
from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from . import data as data_lib, prunecomp
from .calibration import BoundaryStats, collect_stats
from .data import RunData
from .distill import TeacherCache, distill_kl, distill_mse, trainable_parameters
from .evaluation import perplexity
from .export import prune_gguf
from .files import DamagedFile, cached_json, key_of, locked, read_json, set_aside, versions, write_json
from .models import Layout, count_parameters, model_config, resolve_source
from .patches import PATCHES, PatchContext, build_patch
from .pruning import interface_position, interfaces, patches_of, pruned, save_pruned
from .records import finite, make_record, outcomes_path, record_problem, rescue, save_outcomes
from .report.printout import summary
from .selection import METRICS, SelectionContext, patched_scores, select_layers
from .tasks import local_task_dir
from .tracking import make_tracker
from .validation import hadamard_of, narrows, scoring_patch, trained, validate
from .width import width_pruned
from .training import restored
from .workspace import (WORKSPACE, ZEROSHOT, Workspace, cached_scores, cached_search, calib_stats_path, data_key, dense_eval_path,
                        dense_eval_problem, eval_key, keep_zeroshot_prefix, model_key, prefix_path, run_id, teacher_path)
from .zeroshot import check_tasks, evaluate_tasks

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


# ------------------------------------------------------------------ stages
def calibrate(cfg: dict, model, data: RunData) -> BoundaryStats:
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
                token_budget=e["token_budget"], attention=e.get("attention", "sdpa"), include_path=local_task_dir() if tasks else None, seed=cfg["seed"],
                cache_dir=cfg["cache_dir"])


def evaluate(cfg: dict, model, tokenizer, windows: dict, prefixes: dict | None = None, label: str = "") -> dict:
    """Perplexity on every evaluation data set, and zero-shot accuracy on eval.tasks."""
    e, progress = cfg["eval"], cfg["progress"]
    prefixes = prefixes or {}
    d = cfg["distill"]
    after = (f" after distill={d['method']} at distill.lr={d['lr']} (a lower distill.lr may keep it finite)"
             if label == "pruned" and d["method"] != "none" else "")
    ppl = {name: finite(perplexity(model, w, e["batch_size"], progress, f"{label} perplexity ({name})",
                                    prefixes.get(name)), f"{label} perplexity on {name}{after}")
           for name, w in windows.items()}
    zs = _zeroshot_settings(cfg)
    results, outcomes = evaluate_tasks(model, tokenizer, zs.pop("tasks"), prefix=prefixes.get(ZEROSHOT), **zs)
    return {"ppl": ppl, "zeroshot": results, "outcomes": outcomes}


def evaluate_dense(cfg: dict, model, tokenizer, windows: dict, prefixes: dict | None = None) -> dict:
    """The dense model's evaluation, cached per (model, data, eval settings, engine, seed, versions). When it
    runs, it fills the zero-shot prefix states that ``prefixes`` holds (the pruned evaluation starts there)."""
    tasks = _zeroshot_settings(cfg)["tasks"]
    zs_prefix = {ZEROSHOT: prefixes[ZEROSHOT]} if ZEROSHOT in (prefixes or {}) else None
    return cached_json(dense_eval_path(cfg),
                       lambda: evaluate(cfg, model, tokenizer, windows, zs_prefix, label="dense"),
                       lambda entry: dense_eval_problem(entry, windows, tasks))


def select(cfg: dict, model, stats: BoundaryStats, data: RunData) -> tuple[list[int], dict, dict | None]:
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
        ctx.scores = cached_scores(cfg, lambda: patched_scores(ctx))
    if p["metric"] == "evopress" and ctx.n:  # a search is long: kept, and shared by runs that differ after it
        if p["in_loop"]:  # each candidate scored with the run's patch
            ctx.make_patch = patch_maker(cfg, model, stats, data, {})
        removed = cached_search(cfg, lambda: select_layers(p["metric"], ctx))
    else:
        removed = select_layers(p["metric"], ctx)
    if replaces and len(interfaces(removed)) != 1:
        raise ValueError(f"patch={cfg['patch']['variant']} replaces one contiguous block, but prune.metric="
                         f"{p['metric']} chose {removed}: use a contiguous metric (cosine, angular, last)")
    return removed, {}, ctx.scores


def _score_samples(cfg: dict, data: RunData) -> torch.Tensor:
    """What model-scoring metrics score on: calibration samples (ppl, sleb, taylor: their official protocol),
    or for ``patched`` held-out calibration windows that share no token with the statistics' samples."""
    p, d = cfg["prune"], cfg["data"]
    if p["metric"] != "patched":
        return data.samples(p.get("score_samples"), p.get("score_seqlen"))
    return data_lib.held_out_samples(data.stream(), p["score_samples"], p.get("score_seqlen") or d["seqlen"],
                                     cfg["seed"] + 2, (d["calib_samples"], d["seqlen"], cfg["seed"]), data.bos)


def patch_maker(cfg: dict, model, stats: BoundaryStats, data: RunData, fitted: dict):
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

    def __init__(self, cfg: dict, model, data: RunData, removed: list[int]):
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


def prepare_distill(cfg: dict, model, data: RunData, removed: list[int]):
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
    caches = {}
    for name, x in (("train", train), ("val", val)):
        if len(x):
            root = teacher_path(cfg, name)
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


def distill_stage(cfg: dict, model, removed: list[int], prepared, windows: dict, prefixes: dict, stack: ExitStack,
                  timings: dict, tracker) -> tuple[float | None, object]:
    """Training-free perplexity, then distillation of the patch (its trained parameters restored when the
    run's pruned context closes): (training-free perplexity, distillation result), or (None, None)."""
    if prepared is None:
        return None, None
    name, e = cfg["data"]["name"], cfg["eval"]
    ppl_free = finite(perplexity(model, windows[name], e["batch_size"], cfg["progress"],
                                  "training-free perplexity", prefixes.get(name)), "training-free perplexity")
    params = trainable_parameters(model, trained(cfg["distill"]))
    stack.enter_context(restored(params))
    with _timed(timings, "distill"):
        result = distill(cfg, model, removed, prepared,
                         on_step=lambda step, h: tracker.log({f"distill/{k}": v for k, v in h.items()}, step))
    result.trained_params = sum(p.numel() for p in params)
    return ppl_free, result


# ------------------------------------------------------------------ the run
def check_config(cfg: dict) -> None:
    """What the config can tell before the weights load: every setting (with the model's layer count and context
    length from its config file) and the task names (lm-eval's registry and lp's packaged tasks)."""
    validate(cfg, *model_config(cfg["model"])) if cfg["model"].get("name_or_path") else validate(cfg)
    if cfg["eval"]["tasks"]:
        check_tasks(cfg["eval"]["tasks"], local_task_dir())


def run(cfg: dict, group: str | None = None, workspace: Workspace | None = None) -> dict:
    ws = workspace or WORKSPACE
    check_config(cfg)
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
    data = RunData(cfg, tokenizer)
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
            rescue(record, dense["outcomes"], pruned_eval["outcomes"], record_path, e)
            raise
        keep_zeroshot_prefix(cfg, prefixes)
        if cfg.get("save_model"):
            save_pruned(model, tokenizer, cfg["save_model"], replace(spec, variant=cfg["patch"]["variant"],
                                                                     widths=width.shapes() if width else {}))
        if cfg.get("save_gguf"):
            write_gguf(cfg, removed, kinds)
    return record


def write_gguf(cfg: dict, removed: list[int], kinds: list | None) -> None:
    """save_gguf: the model's own GGUF file without the removed layers (lp.export; the config checked by
    validate); ``kinds``: the dense model's layer types."""
    m = cfg["model"]
    folder, name = resolve_source(m["name_or_path"], m.get("gguf_file"), m.get("parts"), m.get("sha256"), m.get("install", ""))
    log.info(f"save_gguf: wrote {prune_gguf(Path(folder) / name, cfg['save_gguf'], removed, kinds)}")
