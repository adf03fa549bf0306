"""One experiment, end to end: load, calibrate, select, prune, patch, evaluate, record.

Takes a plain nested dict (what conf/ composes; no Hydra in here), returns the result record.
"""
from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import data as data_lib
from .calibration import BoundaryStats, collect_stats
from .distill import TeacherCache, distill_kl, distill_mse, trainable_parameters
from .evaluation import Prefix, perplexity
from .models import Layout, count_parameters, load_model
from .patches import NEEDS_HIDDEN_STATES, PATCHES, PRECISIONS, PatchContext, build_patch
from .pruning import interface_position, interfaces, patches_of, pruned, save_pruned
from .records import RECORD_VERSION, is_complete, key_of, read_json, write_json
from .selection import METRICS, MODEL_METRICS, SelectionContext, select_layers
from .tracking import make_tracker
from .zeroshot import evaluate_tasks, local_task_dir, retention

DISTILL_METHODS = ["none", "offline_kl", "mse"]
SETTING_GROUPS = ("model", "data", "prune", "patch", "distill", "eval")  # config groups a run_id's hash covers
_LOADED: dict = {}  # one dense model kept in memory, so the runs of a sweep load it once
_PREFIXES: dict = {}  # dense hidden states entering layer s of the eval windows, per (eval key/data set, s)
MAX_PREFIXES = 4


def validate(cfg: dict) -> None:
    """Checks that need no model: fail before any work is done."""
    n = cfg["prune"]["n"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"prune.n={n!r} must be a non-negative integer (number of layers to remove)")
    if cfg["prune"]["metric"] not in METRICS:
        raise ValueError(f"prune.metric={cfg['prune']['metric']!r} is not one of {sorted(METRICS)}")
    if cfg["patch"]["variant"] not in PATCHES:
        raise ValueError(f"patch.variant={cfg['patch']['variant']!r} is not one of {sorted(PATCHES)}")
    if cfg["patch"].get("precision", "model") not in PRECISIONS:
        raise ValueError(f"patch.precision={cfg['patch']['precision']!r} is not one of {list(PRECISIONS)}")
    if cfg["distill"]["method"] not in DISTILL_METHODS:
        raise ValueError(f"distill.method={cfg['distill']['method']!r} is not one of {DISTILL_METHODS}")
    if cfg["distill"]["method"] == "mse" and cfg["patch"]["variant"] == "streamline_layer":
        raise ValueError("distill=mse trains patches on hidden states alone; patch=streamline_layer is a decoder "
                         "layer already trained so: use distill=none or distill=offline_kl")
    if not cfg["model"].get("name_or_path"):
        raise ValueError("model.name_or_path is missing: give a hub id, a local folder or package:NAME")
    for name, ds in (cfg["eval"].get("datasets") or {}).items():
        if not isinstance(ds, dict) or ds.get("source") not in data_lib.SOURCES:
            raise ValueError(f"eval.datasets.{name} must be a data config (as in conf/data/) whose source is "
                             f"one of {list(data_lib.SOURCES)}, not {ds!r}")


def group_settings(cfg: dict, group: str) -> dict:
    """A config group's settings that can change results (what keys records and caches)."""
    return {k: v for k, v in cfg[group].items() if k not in ("prefix_reuse",)}


def calib_stats_path(cfg: dict) -> Path:
    """Calibration statistics of (model, data, seed): small (a few (L+1) x d tensors), kept beside the
    records so that figures never need the model again."""
    model_key = {k: cfg["model"].get(k) for k in ("name_or_path", "gguf_file", "dtype")}
    return Path(cfg["results_dir"]) / "stats" / f"calib_{key_of(model_key, cfg['data'], cfg['seed'])}.pt"


def run_id(cfg: dict) -> str:
    p = cfg["prune"]
    block = f"-s{p['start']}" if p.get("start") is not None else ""
    readable = (f"{cfg['model']['name']}__{cfg['data']['name']}__{p['metric']}-n{p['n']}{block}__"
                f"{cfg['patch']['variant']}__{cfg['distill']['method']}__{cfg['eval']['name']}__seed{cfg['seed']}")
    return f"{readable}__{key_of(*(group_settings(cfg, g) for g in SETTING_GROUPS), cfg['seed'])}"


def _model(cfg_model: dict):
    key = key_of(cfg_model)
    if key not in _LOADED:
        _LOADED.clear()
        _PREFIXES.clear()
        m = cfg_model
        _LOADED[key] = load_model(m["name_or_path"], m.get("gguf_file"), m.get("dtype", "auto"),
                                  m.get("device", "cpu"), m.get("device_map"))
    return _LOADED[key]


@contextmanager
def _timed(timings: dict, name: str):
    t = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t, 3)


def run(cfg: dict, group: str | None = None) -> dict:
    validate(cfg)
    results = Path(cfg["results_dir"])
    cache = Path(cfg["cache_dir"])
    rid = run_id(cfg)
    record_path = results / "records" / f"{rid}.json"
    if cfg.get("resume") and is_complete(old := read_json(record_path)):
        print(f"[lp] resume: {record_path} is complete, skipped")
        return old

    timings: dict = {}
    progress = cfg.get("progress", True)
    torch.manual_seed(cfg["seed"])
    with _timed(timings, "load"):
        model, tokenizer = _model(cfg["model"])
    layout = Layout(model)
    L = layout.num_layers
    n = cfg["prune"]["n"]
    if n >= L:
        raise ValueError(f"prune.n={n} must be smaller than the model's {L} layers (valid: 0..{L - 1})")

    d, m = cfg["data"], cfg["model"]
    model_key = {k: m.get(k) for k in ("name_or_path", "gguf_file", "dtype")}
    calib_path = calib_stats_path(cfg)
    _stream: list = []

    def stream() -> torch.Tensor:  # tokenised only when needed (not when the statistics are cached)
        if not _stream:
            _stream.append(data_lib.tokenize(tokenizer, data_lib.corpus_text(d, "calib")))
        return _stream[0]

    def samples() -> torch.Tensor:
        return data_lib.calibration_samples(stream(), d["calib_samples"], d["seqlen"], cfg["seed"])

    with _timed(timings, "calibration"):
        stats = BoundaryStats.load(calib_path) if calib_path.is_file() else None
        if stats is None or stats.token_absmax is None:  # absent, or written by an older lp
            stats = collect_stats(model, samples(), d.get("calib_batch_size", 1), progress=progress)
            stats.save(calib_path)

    e = cfg["eval"]
    eval_key = key_of(model_key, d, group_settings(cfg, "eval"))
    # perplexity on the data config's evaluation split, and on each of eval.datasets (the paper's table:
    # WikiText-2, C4, PTB), keyed by data set name; the first is the record's main ``ppl``
    sets = {d["name"]: d, **(e.get("datasets") or {})}
    windows_of = {}
    for name, ds in sets.items():
        try:
            text = data_lib.corpus_text(ds, "eval")
        except (RuntimeError, FileNotFoundError) as err:
            where = "data" if ds is d else f"eval.datasets.{name}"
            raise type(err)(f"{where}: {err} (valid: a data set you can reach; eval=ppl or eval=quick "
                            f"evaluate data's own split only)") from err
        windows_of[name] = data_lib.eval_windows(data_lib.tokenize(tokenizer, text), ds.get("seqlen", d["seqlen"]),
                                                 e.get("max_windows"))
    windows = windows_of[d["name"]]
    dense_path = cache / "dense" / f"{eval_key}.json"
    tasks = list(e.get("tasks") or [])
    zs = dict(limit=e.get("limit"), num_fewshot=e.get("num_fewshot"), batch_size=e.get("batch_size", 1),
              include_path=local_task_dir(cache) if tasks else None, seed=cfg["seed"])
    with _timed(timings, "dense_eval"):
        dense = read_json(dense_path)
        if dense is None or set(dense) != {"ppl", "ppl_datasets", "zeroshot"}:  # absent, or from an older lp
            by_data = {name: perplexity(model, w, e.get("batch_size", 1), progress, f"dense perplexity ({name})")
                       for name, w in windows_of.items()}
            dense = {"ppl": by_data[d["name"]], "ppl_datasets": by_data,
                     "zeroshot": evaluate_tasks(model, tokenizer, tasks, **zs)}
            write_json(dense_path, dense)

    p = cfg["prune"]
    scored = p["metric"] in MODEL_METRICS
    ctx = SelectionContext(stats=stats, n=n, start=p.get("start"), indices=p.get("indices"), seed=cfg["seed"],
                           model=model if scored else None,
                           samples=samples()[: p.get("score_samples")] if scored else None,
                           batch_size=d.get("calib_batch_size", 1))
    with _timed(timings, "selection"):
        removed = select_layers(cfg["prune"]["metric"], ctx)
    prefixes = {name: _prefix(model, w, min(removed, default=0), e, f"{eval_key}/{name}")
                if e.get("prefix_reuse", True) else None for name, w in windows_of.items()}
    prefix = prefixes[d["name"]]
    variant = cfg["patch"]["variant"]
    fits = variant in NEEDS_HIDDEN_STATES
    pctx = PatchContext(stats, settings={**cfg["patch"], "seed": cfg["seed"]}, model=model if fits else None,
                        samples=samples()[: cfg["patch"].get("fit_samples")] if fits else None,
                        batch_size=d.get("calib_batch_size", 1))
    params_dense = count_parameters(model)
    dist = cfg["distill"]
    with _timed(timings, "teacher"):
        teacher_key = key_of(model_key, d, {k: dist.get(k) for k in ("samples", "val_samples", "seqlen", "topk",
                                                                     "batch_size")}, cfg["seed"])
        prepared = _prepare_distill(dist, model, stream, removed, cache / "teacher", teacher_key, cfg["seed"],
                                    progress)
    distilled = None
    with ExitStack() as stack:
        with _timed(timings, "patch"):
            spec = stack.enter_context(pruned(model, removed, lambda s, e_: build_patch(variant, pctx, s, e_)))
        params_pruned = count_parameters(model)
        patch_params = sum(count_parameters(m) for m in patches_of(model).values())
        if prepared is not None:
            ppl_free = perplexity(model, windows, e.get("batch_size", 1), progress, "training-free perplexity", prefix)
            stack.enter_context(_restored(trainable_parameters(model, dist.get("train", "patch"))))
            with _timed(timings, "distill"):
                distilled = _distill(dist, model, removed, prepared, progress)
        with _timed(timings, "pruned_eval"):
            ppl_by_data = {name: perplexity(model, w, e.get("batch_size", 1), progress,
                                            f"pruned perplexity ({name})", prefixes[name])
                           for name, w in windows_of.items()}
            ppl_pruned = ppl_by_data[d["name"]]
            acc_pruned = evaluate_tasks(model, tokenizer, tasks, **zs)
        if cfg.get("save_model"):
            save_pruned(model, tokenizer, cfg["save_model"], spec)

    joins = interfaces(removed)
    record = {
        "version": RECORD_VERSION,
        "status": "complete",
        "run_id": rid,
        "group": group,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": m["name"], "data": d["name"], "metric": cfg["prune"]["metric"], "n": n,
        "patch": variant, "distill": cfg["distill"]["method"], "eval": e["name"], "seed": cfg["seed"],
        "num_layers": L,
        "removed": removed,
        "interfaces": [list(j) for j in joins],
        "similarity": [round(stats.cos[s, t].item(), 6) for s, t in joins],
        "params_dense": params_dense,
        "params_pruned": params_pruned,
        "patch_params": patch_params,
        "prune_ratio": round(1 - params_pruned / params_dense, 6),
        "ppl": {"dense": dense["ppl"], "pruned": ppl_pruned,
                **({"training_free": ppl_free} if distilled else {}),
                "datasets": {name: {"dense": dense["ppl_datasets"][name], "pruned": v}
                             for name, v in ppl_by_data.items()}},
        "distill_result": {"steps": distilled.steps, "loss": [h["loss"] for h in distilled.history],
                           "val": distilled.val, "stopped": distilled.stopped} if distilled else None,
        "zeroshot": {"dense": dense["zeroshot"], "pruned": acc_pruned},
        "retention": retention(dense["zeroshot"], acc_pruned),
        "eval_tokens": windows.numel(),
        "calib_tokens": stats.tokens,
        "calib_stats": str(calib_path),
        "timings": timings,
        "config": cfg,
    }
    write_json(record_path, record)

    tracker = make_tracker(cfg["logger"], cfg, rid, group)
    for step, h in enumerate(distilled.history if distilled else [], start=1):  # the loss curve
        tracker.log({f"distill/{k}": v for k, v in h.items()}, step)
    rp = record["retention"]
    flat = {"ppl/dense": dense["ppl"], "ppl/pruned": ppl_pruned, "params/dense": params_dense,
            **{f"ppl/{name}/pruned": v for name, v in ppl_by_data.items()},
            **{f"acc/dense/{t}": v for t, v in dense["zeroshot"].items()},
            **{f"acc/pruned/{t}": v for t, v in acc_pruned.items()},
            **({f"rp/{t}": v for t, v in rp["per_task"].items()} | {"rp/avg": rp["rp"]} if rp else {}),
            "params/pruned": params_pruned, "prune_ratio": record["prune_ratio"],
            **{f"time/{k}": v for k, v in timings.items()}}
    tracker.summary({**flat, "removed": removed, "similarity": record["similarity"]})
    tracker.finish()
    print(f"[lp] {rid}\n     removed {removed}  ppl dense {dense['ppl']:.3f}  pruned {ppl_pruned:.3f}  "
          f"params {params_dense:,} -> {params_pruned:,}")
    if rp:
        print(format_table(dense["zeroshot"], acc_pruned, rp))
    print(f"     record: {record_path}")
    return record


def _prefix(model, windows, layer: int, e: dict, key: str) -> Prefix | None:
    """The dense model's hidden states entering ``layer`` for the eval windows, computed once per sweep."""
    if layer == 0:
        return None
    if (key, layer) not in _PREFIXES:
        try:
            prefix = Prefix(model, windows, layer, e.get("batch_size", 1))
        except ValueError:  # a model family whose embeddings enter layer 0 transformed: plain path
            return None
        if len(_PREFIXES) >= MAX_PREFIXES:
            _PREFIXES.pop(next(iter(_PREFIXES)))
        _PREFIXES[(key, layer)] = prefix
    return _PREFIXES[(key, layer)]


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


def _prepare_distill(dist: dict, model, stream, removed, root: Path, key: str, seed: int, progress: bool):
    """On the dense model, before pruning: the teacher cache (offline_kl) or the dense hidden-state pairs
    (mse). Distillation samples are drawn from the calibration split with their own seed."""
    method = dist["method"]
    if method == "none":
        return None
    n_train, n_val = dist["samples"], dist.get("val_samples") or 0
    drawn = data_lib.calibration_samples(stream(), n_train + n_val, dist["seqlen"], seed + 1)
    train, val = drawn[:n_train], drawn[n_train:]
    if method == "mse":
        ctx = PatchContext(None, model=model, samples=train, batch_size=dist["batch_size"])
        return {interface_position(removed, e): list(ctx.pairs(s, e)) for s, e in interfaces(removed)}
    caches = {}
    for name, x in (("train", train), ("val", val)):
        if len(x):
            caches[name] = (TeacherCache(root / key / name, len(x), dist["seqlen"], dist["topk"],
                                         dist["batch_size"]).build(model, x, progress), x)
    return caches


def _distill(dist: dict, model, removed, prepared, progress: bool):
    common = dict(lr=float(dist["lr"]), weight_decay=float(dist["weight_decay"]), epochs=dist["epochs"],
                  progress=progress)
    if dist["method"] == "mse":
        return distill_mse(model, prepared.__getitem__, **common)
    train_cache, train = prepared["train"]
    val_cache, val = prepared.get("val", (None, None))
    return distill_kl(model, train_cache, train, val_cache, val, min_lr_factor=dist["min_lr_factor"],
                      train=dist.get("train", "patch"), early_stop=dist.get("early_stop"),
                      autocast_dtype=dist.get("autocast"), **common)


def format_table(dense: dict, pruned: dict, rp: dict) -> str:
    rows = [f"     {'task':<16}{'dense':>8}{'pruned':>8}{'RP %':>8}"]
    rows += [f"     {t:<16}{dense[t]:>8.4f}{pruned[t]:>8.4f}{rp['per_task'][t]:>8.2f}" for t in dense]
    rows.append(f"     {'average':<16}{rp['avg_dense']:>8.4f}{rp['avg_pruned']:>8.4f}{rp['rp']:>8.2f}")
    return "\n".join(rows)
