"""Run records (the source of truth for tables), atomic writes, and the keyed on-disk caches shared by runs.

Every file lp writes goes through :func:`atomic_write` (a unique temporary name in the same folder, fsync,
rename): readers see the old file or the whole new one, and two processes writing the same file never
trip over each other's temporary. A cache entry is built under :func:`locked`, so two jobs of a multirun
that need the same entry build it once. Cache keys include :func:`versions`.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

RECORD_VERSION = 2  # 2: zeroshot results per task with stderr, n-shot, versions; run_id hashes used settings
CACHE_FORMAT = 2  # of calibration statistics, dense evaluations and teacher caches
OUTCOMES_FORMAT = 1  # of a record's per-document outcomes (its side file)


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**24), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict:
    """What the content of a cache entry depends on besides its settings."""
    import torch
    import transformers

    try:
        import lm_eval

        lm_eval_version = lm_eval.__version__
    except ImportError:
        lm_eval_version = None
    return {"cache_format": CACHE_FORMAT, "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__, "lm_eval": lm_eval_version}


def key_of(*parts) -> str:
    """A short stable hash of JSON-able parts (config sub-trees): equal inputs, equal key."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes the content to a temporary file that then replaces ``path`` atomically."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the usual permissions: the umask applies
    except OSError as e:
        raise _unwritable(path, e) from e
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) or isinstance(e.__cause__ or e.__context__, OSError) or (
                isinstance(e, RuntimeError) and any(w in str(e) for w in _TORCH_WRITE_FAILED)):
            raise _unwritable(path, e) from e
        raise


_TORCH_WRITE_FAILED = ("PytorchStreamWriter", "file write failed", "unexpected pos")  # torch.save on a full disk


def _unwritable(path: Path, e: BaseException) -> OSError:
    return OSError(getattr(e, "errno", None) or getattr(e.__cause__, "errno", None),
                   f"could not write {path} ({type(e).__name__}: {e}): is the disk full or the folder read-only? "
                   f"Free space, or set results_dir / cache_dir to a writable folder; nothing finished was lost")


@contextmanager
def locked(path: str | Path):
    """An inter-process lock for building the cache entry at ``path``."""
    from filelock import FileLock

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError as e:
        raise _unwritable(Path(str(path) + ".lock"), e) from e
    try:
        yield
    finally:
        lock.release()


def _finite(obj, where: str = "") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite value {obj} at {where or 'top level'}: refusing to record it")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")


def write_json(path: str | Path, data: dict) -> None:
    """Atomic write of strict JSON: a non-finite number anywhere is an error naming where it is."""
    _finite(data)
    text = json.dumps(data, indent=2, default=str, allow_nan=False)
    atomic_write(path, lambda tmp: tmp.write_text(text))


class DamagedFile(ValueError):
    """A file that exists but cannot be read."""


def read_json(path: str | Path) -> dict | None:
    """The JSON object in ``path``; None if there is no file; :class:`DamagedFile` naming it if it is not JSON."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{path} is damaged (not JSON: {e})") from e
    if not isinstance(data, dict):
        raise DamagedFile(f"{path} is damaged (not a JSON object)")
    return data


def read_torch(path: str | Path):
    """What ``torch.save`` wrote to ``path`` (tensors and plain containers only: ``weights_only``);
    :class:`DamagedFile` naming it if it cannot be read (a truncated zip, a pickle error)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DamagedFile(f"{path} is damaged ({type(e).__name__}: {e})") from e


def set_aside(path: Path, why: str) -> None:
    """Move a damaged cache entry out of the way (``*.bad``) so that it is recomputed, and say so."""
    bad = path.with_name(path.name + ".bad")
    os.replace(path, bad)
    log.warning(f"cache entry {path} could not be read ({why}); moved to {bad} and recomputed")


def read_cache_json(path: Path) -> dict | None:
    """A JSON cache entry, or None if absent or damaged (then set aside)."""
    try:
        return read_json(path)
    except DamagedFile as e:
        set_aside(path, str(e))
        return None


def cached_json(path: Path, compute: Callable[[], dict], problem: Callable[[dict], str | None] = lambda e: None) -> dict:
    """The JSON cache entry at ``path``, built once under its lock: ``compute()`` when it is absent, damaged,
    or ``problem(entry)`` says why it cannot be used (then it is set aside and named)."""
    with locked(path):
        entry = read_cache_json(path)
        why = problem(entry) if entry is not None else None
        if why:
            set_aside(path, why)
            entry = None
        if entry is None:
            entry = compute()
            write_json(path, entry)
    return entry


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
    ``record``) that does not match it (:func:`check_outcomes`) is :class:`lp.records.DamagedFile` naming it:
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
        _finite(record)
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
