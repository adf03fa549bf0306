"""What identifies a run: the settings of each config group that can change its results (torch-free, so that
tables can be built without importing torch)."""
from __future__ import annotations

SETTING_GROUPS = ("model", "data", "prune", "patch", "distill", "eval")  # config groups a run_id's hash covers

# the prune settings each metric reads, besides metric and n (what a run_id hashes: nothing it ignores), as each
# metric declares them in lp.selection.register; a metric not (yet) registered hashes every prune setting
USES: dict[str, set] = {}
DISTILL_USES: dict[str, set] = {}  # the distill settings each distill.method reads (lp.validation.DISTILL)
# how a run is computed, not what: never part of its identity (the attention kernel is named in the record's
# engine and keys the dense evaluation's cache: lp.workspace.engine_of)
EXECUTION = {"prefix_reuse", "zeroshot_batch_size", "token_budget", "attention"}


def used_prune_settings(prune: dict) -> dict:
    """The prune settings that the chosen metric reads."""
    keep = {"metric", "n"} | USES.get(prune.get("metric"), set(prune))
    return {k: v for k, v in prune.items() if k in keep}


def group_settings(cfg: dict, group: str) -> dict:
    """A config group's settings that can change results (what keys records and caches)."""
    if group == "prune":
        return used_prune_settings(cfg["prune"])
    if group == "distill":  # a setting the method does not read is not part of the run
        used = {"method"} | DISTILL_USES.get(cfg["distill"].get("method"), set(cfg["distill"]))
        return {k: v for k, v in cfg["distill"].items() if k in used}
    return {k: v for k, v in cfg[group].items() if k not in EXECUTION}
