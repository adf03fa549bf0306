"""Run records (the source of truth for tables) and their per-document outcomes: the schema, how a record is
made from a finished run, read back, checked, and rescued when it cannot be written. General file helpers
(atomic writes, locks, keyed caches) are lp.files.
"""
from __future__ import annotations

import gzip
import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path

from .files import DamagedFile, atomic_write, check_finite, read_json, versions, write_json

log = logging.getLogger(__name__)

RECORD_VERSION = 2  # 2: zeroshot results per task with stderr, n-shot, versions; run_id hashes used settings
OUTCOMES_FORMAT = 1  # of a record's per-document outcomes (its side file)


# ------------------------------------------------------------------ per-document outcomes (a record's side file)
def outcomes_path(record_path: str | Path) -> Path:
    """The side file of a record: ``<run_id>.outcomes.json.gz`` beside ``<run_id>.json``."""
    p = Path(record_path)
    return p.with_name(p.name[: -len(".json")] + ".outcomes.json.gz")


def save_outcomes(path: str | Path, dense: dict, pruned: dict) -> None:
    blob = gzip.compress(json.dumps({"format": OUTCOMES_FORMAT, "dense": dense, "pruned": pruned},
                                    separators=(",", ":")).encode(), mtime=0)  # mtime=0: same bytes for same data
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))


def load_outcomes(record_path: str | Path, record: dict | None = None) -> dict | None:
    """{"dense": ..., "pruned": ...} of a record, or None when it has no side file and the record names none
    (older records). A side file that cannot be read, that the record names but is missing, or (given the
    ``record``) that does not match it (:func:`check_outcomes`) is :class:`lp.files.DamagedFile` naming it:
    never silently an interval-free row, never an interval from wrong outcomes."""
    p = outcomes_path(record_path)
    if not p.is_file():
        if record is not None and record.get("outcomes"):
            raise DamagedFile(f"{p} is missing (the record names it)")
        return None
    try:
        data = json.loads(gzip.decompress(p.read_bytes()))
        if data.get("format") != OUTCOMES_FORMAT or not {"dense", "pruned"} <= set(data):
            raise ValueError(f"format {data.get('format')!r}, keys {sorted(data)}")
        if record is not None:
            check_outcomes(data, record)
    except (OSError, EOFError, ValueError, AttributeError, TypeError) as e:
        raise DamagedFile(f"{p} is damaged ({e})") from e
    return data


def check_outcomes(data: dict, record: dict) -> None:
    """The outcomes are the record's and can be paired: the same tasks, per task unique ids (the same set for
    the dense and the pruned model) and 0/1 lists of one length, as many documents as the record says, and (for
    a single task) the mean of acc equal to the record's acc. A ValueError says what does not hold."""
    zs = record.get("zeroshot") or {}
    ids_of = {}
    for side in ("dense", "pruned"):
        results, got = zs.get(side) or {}, data[side]
        if not isinstance(got, dict) or set(got) != set(results):
            raise ValueError(f"{side}: tasks {sorted(got) if isinstance(got, dict) else got} are not the record's "
                             f"{sorted(results)}")
        for t, o in got.items():
            ids = o.get("ids") if isinstance(o, dict) else None
            if not isinstance(ids, list) or not ids:
                raise ValueError(f"{side}/{t}: no document ids")
            if any(not isinstance(i, (int, str)) or isinstance(i, bool) for i in ids):
                raise ValueError(f"{side}/{t}: document ids are not integers or names")
            if len(set(ids)) != len(ids):  # pairing resamples documents: each must appear once
                raise ValueError(f"{side}/{t}: {len(ids) - len(set(ids))} duplicated document ids")
            if side == "pruned" and set(ids) != ids_of.get(t):
                raise ValueError(f"{side}/{t}: the document ids are not the dense model's "
                                 f"({len(set(ids) - ids_of.get(t, set()))} not among them)")
            ids_of[t] = set(ids)
            for m in ("acc", "acc_norm"):
                v = o.get(m)
                if v is None and m == "acc_norm":
                    continue
                if not isinstance(v, list) or len(v) != len(ids):
                    raise ValueError(f"{side}/{t}: {m} has {len(v) if isinstance(v, list) else v!r} values for "
                                     f"{len(ids)} documents")
                if any(x not in (0, 1) or isinstance(x, float) for x in v):
                    raise ValueError(f"{side}/{t}: {m} holds values other than 0 and 1")
            res = results[t] if isinstance(results[t], dict) else {"acc": results[t]}
            n = res.get("samples")
            if isinstance(n, int) and n != len(ids):
                raise ValueError(f"{side}/{t}: {len(ids)} documents, the record says {n}")
            if isinstance(n, int) and not any("/" in str(i) for i in ids) and \
                    abs(sum(o["acc"]) / len(ids) - res["acc"]) > 1e-6:
                raise ValueError(f"{side}/{t}: mean acc {sum(o['acc']) / len(ids):.6f} is not the record's "
                                 f"{res['acc']:.6f}")


_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_SHARE = {"type": "number", "minimum": 0, "maximum": 1}  # an accuracy
_TASK_RESULT = {"anyOf": [_SHARE, {"type": "object", "required": ["acc"], "properties": {
    "acc": _SHARE, "acc_norm": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    **{k: {"type": ["number", "null"], "minimum": 0} for k in ("acc_stderr", "acc_norm_stderr")},
    "samples": {"type": ["integer", "null"], "minimum": 0}}}]}
RECORD_SCHEMA = {  # what the tables, figures and resume read of a record (jsonschema)
    "type": "object",
    "required": ["version", "status", "run_id", "model", "data", "metric", "n", "patch", "distill", "eval", "seed",
                 "removed", "ppl", "params_pruned", "created"],
    "properties": {
        "version": {"const": RECORD_VERSION}, "status": {"const": "complete"},
        **{k: {"type": "string", "minLength": 1} for k in ("run_id", "model", "data", "metric", "patch", "distill",
                                                           "eval", "created")},
        "n": {"type": "integer", "minimum": 0}, "seed": {"type": "integer", "minimum": 0},
        "removed": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "params_pruned": {"type": "integer", "minimum": 1}, "params_dense": {"type": "integer", "minimum": 1},
        "num_layers": {"type": "integer", "minimum": 1},
        "distill_result": {"type": ["object", "null"], "properties": {"trained_params": {"type": "integer", "minimum": 0}}},
        "ppl": {"type": "object", "required": ["dense", "pruned"], "properties": {
            "dense": {**_NUM, "exclusiveMinimum": 0}, "pruned": {**_NUM, "exclusiveMinimum": 0},
            "datasets": {"type": "object", "additionalProperties": {
                "type": "object", "required": ["dense", "pruned"],
                "properties": {"dense": _NUM, "pruned": _NUM}}}}},
        "retention": {"type": ["object", "null"], "properties": {
            "rp": {**_NUM, "minimum": 0}, "avg_dense": _SHARE, "avg_pruned": _SHARE,
            "rp_stderr": {**_NUM_OR_NULL, "minimum": 0}, "rp_above_chance": {**_NUM_OR_NULL, "minimum": 0},
            "per_task": {"type": "object", "additionalProperties": _NUM_OR_NULL}}},
        "zeroshot": {"type": ["object", "null"], "properties": {
            "dense": {"type": "object", "additionalProperties": _TASK_RESULT},
            "pruned": {"type": "object", "additionalProperties": _TASK_RESULT}}},
        "outcomes": {"type": ["string", "null"]},
        "config": {"type": "object"},
    },
}


def record_problem(record, path: str | Path | None = None) -> str | None:
    """Why ``record`` (read from ``path``) is not a complete, usable record, or None: the schema, a non-finite
    number anywhere, and (with ``path``) the per-document outcomes it names (lp.intervals.check_outcomes)."""
    import jsonschema

    if not isinstance(record, dict):
        return "not a JSON object"
    err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(RECORD_SCHEMA).iter_errors(record))
    if err is not None:
        where = "/".join(map(str, err.absolute_path)) or "the record"
        return f"{where}: {err.message}"
    try:
        check_finite(record)
    except ValueError as e:
        return str(e)
    if path is not None and record.get("outcomes"):
        try:
            load_outcomes(path, record)
        except DamagedFile as e:
            return str(e)
    return None


def load_records(root: str | Path, skipped: list | None = None) -> list[dict]:
    """Every complete record under ``root`` (any number of sweeps), each with the in-memory ``_path`` it was
    read from and its validated per-document outcomes ``_outcomes`` (None if it has none). Files that are not
    valid records (:func:`record_problem`) are left out; a record whose outcomes file is damaged or does not
    match it keeps its row without outcomes. Both are listed in ``skipped`` as (path, why)."""
    out = []
    for p in sorted(Path(root).rglob("*.json")):
        try:
            r = read_json(p)
            why = record_problem(r)
        except DamagedFile as e:
            why = str(e)
        if why is None:
            try:
                outcomes = load_outcomes(p, r) if r.get("outcomes") else None
            except DamagedFile as e:
                outcomes = None
                if skipped is not None:
                    skipped.append((str(outcomes_path(p)), f"{e}; the run's row has no intervals"))
            out.append({**r, "_path": str(p), "_outcomes": outcomes})
            continue
        if skipped is not None:
            skipped.append((str(p), why))
    return out


# ------------------------------------------------------------------ a finished run's record
def finite(value: float, what: str) -> float:
    """``value``, or a ValueError naming ``what`` is not finite: nothing non-finite is ever recorded."""
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}: the model's outputs are not finite (damaged weights, or an overflow "
                         f"in its dtype); nothing recorded")
    return value


def make_record(cfg: dict, rid: str, group: str | None, data, stats, windows: dict, timings: dict,
                dense: dict, pruned_eval: dict, *, removed: list[int], fitted: dict, selection_scores: dict | None,
                num_layers: int,
                params_dense: int, params_pruned: int, patch_params: int, patch_check: dict | None, maps: dict,
                ppl_free: float | None, distilled) -> dict:
    """The record of a finished run (schema RECORD_VERSION): what ran, what was removed and fitted, the dense
    and pruned evaluations, retention with its interval, timings and versions. ``data``: the run's
    lp.data.RunData; ``stats``: its lp.calibration.BoundaryStats."""
    from .pruning import interfaces
    from .workspace import calib_stats_path, engine_of

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
        "similarity": [finite(round(stats.cos[s, t].item(), 6), f"cosine similarity of boundaries {s} and {t}")
                       for s, t in joins],
        "params_dense": params_dense, "params_pruned": params_pruned, "patch_params": patch_params,
        "prune_ratio": round(1 - params_pruned / params_dense, 6),
        "fitted": {k: d.record() if hasattr(d, "record") else {str(i): v for i, v in d.items()}
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
    from .intervals import rp_interval
    from .zeroshot import retention

    metric = cfg["eval"]["rp_metric"]
    out = retention(dense["zeroshot"], pruned_eval["zeroshot"], metric)
    if out:
        b = cfg.get("bootstrap") or {}
        ci = rp_interval(dense["outcomes"], pruned_eval["outcomes"], metric, b["resamples"],
                         b["seed"], b["level"])
        out["rp_ci"] = {k: v for k, v in ci.items() if k != "rp"}
    return out


def rescue(record: dict, dense_outcomes: dict, pruned_outcomes: dict, record_path: Path, err: OSError) -> None:
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
