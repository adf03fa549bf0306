"""Run records (the source of truth for tables) and the keyed on-disk caches shared by runs."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

RECORD_VERSION = 1


def key_of(*parts) -> str:
    """A short stable hash of JSON-able parts (config sub-trees): equal inputs, equal key."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def write_json(path: str | Path, data: dict) -> None:
    """Atomic write: readers see the old file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def read_json(path: str | Path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_complete(record: dict | None) -> bool:
    return bool(record) and record.get("status") == "complete" and record.get("version") == RECORD_VERSION


def load_records(root: str | Path) -> list[dict]:
    """Every complete record under ``root`` (any number of sweeps)."""
    return [r for p in sorted(Path(root).rglob("*.json")) if is_complete(r := read_json(p))]
