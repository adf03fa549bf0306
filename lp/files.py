"""Files lp writes and the keyed on-disk caches shared by runs: general helpers, no knowledge of records.

Every file lp writes goes through :func:`atomic_write` (a unique temporary name in the same folder, fsync,
rename): readers see the old file or the whole new one, and two processes writing the same file never
trip over each other's temporary. A cache entry is built under :func:`locked`, so two jobs of a multirun
that need the same entry build it once. Cache keys include :func:`versions`; a file that exists but cannot be
read is :class:`DamagedFile` naming it, and a damaged cache entry is set aside (:func:`set_aside`) and rebuilt.
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


def check_finite(obj, where: str = "") -> None:
    """A ValueError naming where a non-finite number sits in ``obj`` (nested dicts and lists), if one does."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite value {obj} at {where or 'top level'}: refusing to record it")
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite(v, f"{where}[{i}]")


def write_json(path: str | Path, data: dict) -> None:
    """Atomic write of strict JSON: a non-finite number anywhere is an error naming where it is."""
    check_finite(data)
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
