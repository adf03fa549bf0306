"""Hydra entry point: one pruning experiment per composed config.

    python -m experiments.run                                   # defaults (conf/config.yaml)
    python -m experiments.run patch=diag prune.n=7
    python -m experiments.run -m patch=none,diag,linearpatch prune.n=3,5,7
"""
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lp.pipeline import run
from lp.settings import Path_, check_value

log = logging.getLogger("experiments.run")


def folder(value) -> str:
    """``${lp_folder:${results_dir}}`` in conf/config.yaml's hydra dirs: an empty results_dir is refused before
    Hydra makes any folder (it would make /hydra/<time> at the file system's root), as are a file and an
    unwritable folder (lp.settings.Path_, the rule of every folder setting)."""
    check_value(Path_(), None if value is None else str(value), "results_dir")
    return str(value)


OmegaConf.register_new_resolver("lp_folder", folder, replace=True)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    try:
        record = run(OmegaConf.to_container(cfg, resolve=True), group=group)
    except Exception:
        if group is not None:  # a sweep's job: its error in its own log (on SLURM, the job's log), not only the sweep's
            log.exception("this job failed")
        raise
    return record["ppl"]["pruned"]


if __name__ == "__main__":
    main()
