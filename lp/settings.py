"""What each setting may be: the rules that validation reads. The values themselves, defaults included, live
once in the YAML files of conf/ (the library's functions take them as explicit arguments); a metric or a patch
declares the settings it reads with their rules where it is registered (lp.selection.register,
lp.patches.register). Torch-free, like lp.keys.

A rule checks one value and says what would be valid; ``hi`` may name a bound that only the model knows
(``layers``: its last layer index, ``start``: the last start of an n-layer block, ``context``: its context
length), given to :func:`check` as ``bounds``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Int:
    lo: int
    hi: str | None = None  # the name of a bound in check()'s ``bounds``; None: no upper bound
    none_ok: bool = False

    def problem(self, value, bounds: dict):
        if value is None and self.none_ok:
            return None
        hi = bounds.get(self.hi, math.inf) if self.hi else math.inf
        if not isinstance(value, int) or isinstance(value, bool) or not self.lo <= value <= hi:
            valid = f"an integer in [{self.lo}, {hi}]" if hi != math.inf else f"an integer >= {self.lo}"
            return f"is not valid: it must be {valid}{' or null' if self.none_ok else ''}"
        return None


@dataclass(frozen=True)
class Ints:
    """A non-empty list of integers >= ``lo`` (a schedule: survivors, token budgets per step)."""

    lo: int

    def problem(self, value, bounds: dict):
        ok = isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= self.lo for v in value)
        return None if ok else f"is not valid: it must be a non-empty list of integers >= {self.lo}, e.g. [2, 1]"


@dataclass(frozen=True)
class Number:
    positive: bool = True  # > 0; else >= 0
    none_ok: bool = False

    def problem(self, value, bounds: dict):
        if value is None and self.none_ok:
            return None
        try:
            x = float(value)
            ok = not isinstance(value, bool) and math.isfinite(x) and (x > 0 if self.positive else x >= 0)
        except (TypeError, ValueError):
            ok = False
        return None if ok else f"is not valid: it must be a number {'>' if self.positive else '>='} 0{' or null' if self.none_ok else ''}"


@dataclass(frozen=True)
class OneOf:
    choices: tuple

    def problem(self, value, bounds: dict):
        return None if value in self.choices else f"is not one of {list(self.choices)}"


@dataclass(frozen=True)
class Flag:
    def problem(self, value, bounds: dict):
        return None if isinstance(value, bool) else "is not valid: it must be true or false"


@dataclass(frozen=True)
class Fraction:
    """A number in (0, 1): a confidence level, a pruning ratio."""

    none_ok: bool = False

    def problem(self, value, bounds: dict):
        if value is None and self.none_ok:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1
        return None if ok else f"is not valid: it must be a number in (0, 1), e.g. 0.95{' or null' if self.none_ok else ''}"


@dataclass(frozen=True)
class Path_:
    """A folder lp writes into: a non-empty path whose part that exists already is a writable folder."""

    def problem(self, value, bounds: dict):
        if not isinstance(value, str) or value.strip() == "":
            return "is not valid: it must be a folder path (runs, results, /scratch/lp, ...), not empty"
        path = Path(value).expanduser()
        there = next(p for p in (path, *path.parents) if p.exists())
        if not there.is_dir() or not os.access(there, os.W_OK | os.X_OK):
            return (f"is not valid: {there} is {'a file' if not there.is_dir() else 'not writable'}; it must be a "
                    f"folder lp can write into (or make)")
        return None


@dataclass(frozen=True)
class Limit:
    """lm-eval's limit: null (whole splits), documents per task, or a fraction of each task."""

    def problem(self, value, bounds: dict):
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1
                             or isinstance(value, float) and 0 < value < 1):
            return None
        return "is not valid: it must be null (whole splits), an integer >= 1 (documents per task) or a fraction in (0, 1)"


def read(settings: dict | None, group: str, name: str):
    """The setting ``name`` of a config group given to a library function (a metric's or a patch's): its
    value is the caller's (the pipeline gives the composed conf/<group>/ file); missing is an error."""
    if name not in (settings or {}):
        raise ValueError(f"{group}.{name} is not set: the {group} method reads it (pass it in its settings)")
    return settings[name]


def check_value(rule, value, name: str, bounds: dict | None = None) -> None:
    """``value`` of the setting ``name`` is valid by ``rule`` (None: any value), or a ValueError says what is."""
    why = rule.problem(value, bounds or {}) if rule is not None else None
    if why:
        raise ValueError(f"{name}={value!r} {why}")


def check(rules: dict, settings: dict, group: str, reader: str, bounds: dict | None = None,
          optional: bool = False) -> None:
    """Every setting that ``rules`` names is in ``settings`` (the config group ``group``) and valid by its rule
    (a rule of None: checked where it is read); ``reader`` says who reads them. ``optional``: a setting left
    out is not an error (it has a meaning when absent, stated where it is read)."""
    for name, rule in rules.items():
        if name not in settings:
            if optional:
                continue
            raise ValueError(f"{group + '.' if group else ''}{name} is not set: {reader} reads it (the YAML files of conf/{group}/ "
                             f"set it; give +{group}.{name}=... in a config of your own)")
        check_value(rule, settings[name], f"{group}.{name}" if group else name, bounds)
