"""Experiment tracking: W&B (offline by default, no account needed) or nothing."""
from __future__ import annotations

import os


class NullTracker:
    def log(self, data: dict, step: int | None = None) -> None:
        pass

    def summary(self, data: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, project: str, mode: str, dir: str, config: dict, name: str, group: str | None = None,
                 entity: str | None = None):
        import wandb

        mode = os.environ.get("WANDB_MODE", mode)  # WANDB_MODE wins, as W&B users expect
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={mode!r} is not one of ['offline', 'online', 'disabled']")
        os.makedirs(dir, exist_ok=True)
        self.run = wandb.init(project=project, entity=entity, mode=mode, dir=dir, config=config, name=name,
                              group=group, reinit="finish_previous", settings=wandb.Settings(silent=True))

    def log(self, data: dict, step: int | None = None) -> None:
        self.run.log(data, step=step)

    def summary(self, data: dict) -> None:
        self.run.summary.update(data)

    def finish(self) -> None:
        self.run.finish()


def make_tracker(logger: dict, config: dict, name: str, group: str | None = None):
    backend = logger.get("backend", "none")
    if backend == "none":
        return NullTracker()
    if backend == "wandb":
        return WandbTracker(logger.get("project", "lp"), logger.get("mode", "offline"),
                            logger.get("dir", "results/wandb"), config, name, group, logger.get("entity"))
    raise ValueError(f"logger.backend={backend!r} is not one of ['none', 'wandb']")
