"""Experiment tracking: W&B (offline by default, no account needed) or nothing.

The tracker starts with the run, so each phase is logged as it ends (calibration, selection, the
distillation loss per step, evaluation); a run that raises is marked failed; a finished run gets its summary,
the accuracy table as a ``wandb.Table``, and the record and calibration statistics as artifacts.
"""
from __future__ import annotations

import os
from pathlib import Path


class NullTracker:
    def log(self, data: dict, step: int | None = None) -> None:
        pass

    def finish_run(self, record: dict, record_path: str | Path) -> None:
        pass

    def fail(self, error: BaseException) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, project: str, mode: str, dir: str, config: dict, name: str, group: str | None = None,
                 entity: str | None = None):
        import wandb

        mode = os.environ.get("WANDB_MODE", mode)  # WANDB_MODE wins, as W&B users expect
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={mode!r} is not one of ['offline', 'online', 'disabled']")
        os.makedirs(dir, exist_ok=True)
        self.wandb = wandb
        try:
            self.run = wandb.init(project=project, entity=entity, mode=mode, dir=dir, config=config, name=name,
                                  group=group, reinit="finish_previous", settings=wandb.Settings(silent=True))
        except (wandb.errors.UsageError, wandb.errors.CommError) as e:  # no account, or no server to reach
            raise RuntimeError(f"logger.mode={mode}: W&B could not start ({type(e).__name__}: {e}); log in (wandb "
                               f"login, or WANDB_API_KEY), or use logger=wandb_offline (the default: no account, "
                               f"no server) or logger=none") from e

    def log(self, data: dict, step: int | None = None) -> None:
        self.run.log(data, step=step)

    def finish_run(self, record: dict, record_path: str | Path) -> None:
        self.run.summary.update(summary(record))
        zs = record.get("zeroshot") or {}
        if zs.get("dense"):
            rows = [[t, d.get("acc"), d.get("acc_stderr"), zs["pruned"][t].get("acc"), zs["pruned"][t].get("acc_stderr"),
                     record["retention"]["per_task"][t]] for t, d in zs["dense"].items()]
            self.run.log({"accuracy": self.wandb.Table(
                columns=["task", "dense acc", "dense stderr", "pruned acc", "pruned stderr", "RP %"], data=rows)})
        art = self.wandb.Artifact(f"record-{self.run.id}", type="record")
        art.add_file(str(record_path))
        if record.get("calib_stats") and Path(record["calib_stats"]).is_file():
            art.add_file(record["calib_stats"])
        self.run.log_artifact(art)
        self.run.finish()

    def fail(self, error: BaseException) -> None:
        self.run.summary.update({"error": f"{type(error).__name__}: {error}"})
        self.run.finish(exit_code=1)


def summary(record: dict) -> dict:
    """The flat numbers of a record, as W&B summary keys."""
    rp = record.get("retention") or {}
    zs = record.get("zeroshot") or {}
    return {"ppl/dense": record["ppl"]["dense"], "ppl/pruned": record["ppl"]["pruned"],
            **{f"ppl/{k}/pruned": v["pruned"] for k, v in record["ppl"].get("datasets", {}).items()},
            **{f"acc/dense/{t}": v["acc"] for t, v in (zs.get("dense") or {}).items()},
            **{f"acc/pruned/{t}": v["acc"] for t, v in (zs.get("pruned") or {}).items()},
            **({"rp/avg": rp["rp"], "rp/stderr": rp.get("rp_stderr")} if rp else {}),
            "params/dense": record["params_dense"], "params/pruned": record["params_pruned"],
            "prune_ratio": record["prune_ratio"], "removed": record["removed"], "similarity": record["similarity"],
            **{f"time/{k}": v for k, v in record["timings"].items()}}


BACKENDS = ("none", "wandb")  # what logger.backend may be


def make_tracker(logger: dict, config: dict, name: str, group: str | None = None):
    """The tracker of a logger config (conf/logger/): wandb reads project, mode, dir and entity."""
    backend = logger["backend"]
    if backend == "none":
        return NullTracker()
    if backend == "wandb":
        return WandbTracker(logger["project"], logger["mode"], logger["dir"], config, name, group, logger["entity"])
    raise ValueError(f"logger.backend={backend!r} is not one of {list(BACKENDS)}")
