"""lp: layer pruning, LinearPatch and baselines (see README.md). From Python (lp/api.py):

    stats = lp.calibrate(model, tokenizer, texts); removed = lp.choose_layers(stats, n=7, metric="cosine")
    spec = lp.prune(model, removed, stats, patch="linearpatch"); lp.perplexity(model, lp.windows(tokenizer, text))

The names below load on first use, so that ``import lp`` (and torch-free modules such as lp.settings) stay light.
"""
from importlib import import_module

_WHERE = {  # public name -> module
    **dict.fromkeys(("calibrate", "calibration_windows", "windows", "choose_layers", "prune"), "api"),
    "METRICS": "selection", "PATCHES": "patches", "perplexity": "evaluation", "pruned": "pruning",
    "save_pruned": "pruning", "load_pruned": "pruning", "prune_gguf": "export", "evaluate_tasks": "zeroshot",
    "retention": "zeroshot", "local_task_dir": "tasks", "load_model": "models", "run": "pipeline",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'lp' has no attribute {name!r}; public names: {__all__}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
