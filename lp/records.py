"""Run records (the source of truth for tables), atomic writes, and the keyed on-disk caches shared by runs.

Every file lp writes goes through :func:`atomic_write` (a unique temporary name in the same folder, fsync,
rename): readers see the old file or the whole new one, and two processes writing the same file never
trip over each other's temporary. A cache entry is built under :func:`locked`, so two jobs of a multirun
that need the same entry build it once. Cache keys include :func:`versions`.
"""
from __future__ import annotations

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the usual permissions: the umask applies
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def locked(path: str | Path):
    """An inter-process lock for building the cache entry at ``path``."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


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


def is_complete(record: dict | None) -> bool:
    return bool(record) and record.get("status") == "complete" and record.get("version") == RECORD_VERSION


REQUIRED = ("run_id", "model", "data", "metric", "n", "patch", "distill", "eval", "seed", "removed", "ppl")


def load_records(root: str | Path, skipped: list | None = None) -> list[dict]:
    """Every complete record under ``root`` (any number of sweeps), each with the in-memory ``_path`` it was
    read from. Files that are not (damaged, of another format version, incomplete, missing a field) are left
    out and listed in ``skipped`` as (path, why)."""
    out = []
    for p in sorted(Path(root).rglob("*.json")):
        try:
            r = read_json(p)
        except DamagedFile as e:
            why = str(e)
        else:
            missing = [k for k in REQUIRED if k not in (r or {})]
            if not is_complete(r):
                why = f"status {r.get('status')!r}, version {r.get('version')!r} (reads version {RECORD_VERSION})"
            elif missing:
                why = f"missing fields {missing}"
            else:
                out.append({**r, "_path": str(p)})
                continue
        if skipped is not None:
            skipped.append((str(p), why))
    return out
