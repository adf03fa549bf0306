"""No silent wrong numbers, no lost work: records, caches, damaged files, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lp import records
from lp.calibration import BoundaryStats, collect_stats
from lp.files import DamagedFile, read_json, write_json
from lp.records import load_records
from tests.conftest import record


def test_non_finite_numbers_are_never_recorded(tmp_path):
    with pytest.raises(ValueError, match=r"ppl.pruned"):
        write_json(tmp_path / "r.json", {"ppl": {"dense": 1.0, "pruned": float("nan")}})
    assert not (tmp_path / "r.json").exists()


def test_damaged_json_is_named_and_aggregate_lists_what_it_skipped(tmp_path):
    (tmp_path / "half.json").write_text('{"status": "compl')
    (tmp_path / "old.json").write_text(json.dumps({"status": "complete", "version": 1}))
    ok = record(3, "linearpatch", 20.0, "2026-01-01")
    (tmp_path / "nofield.json").write_text(json.dumps({k: v for k, v in ok.items() if k != "removed"}))
    write_json(tmp_path / "good.json", ok)
    with pytest.raises(DamagedFile, match="half.json"):
        read_json(tmp_path / "half.json")
    skipped = []
    assert len(load_records(tmp_path, skipped)) == 1
    why = dict((Path(p).name, w) for p, w in skipped)
    assert set(why) == {"half.json", "old.json", "nofield.json"}
    assert "not JSON" in why["half.json"] and "required" in why["old.json"] and "'removed' is a required" in why["nofield.json"]


def test_damaged_statistics_file_is_named(tmp_path, llama, ids):
    path = tmp_path / "calib.pt"
    collect_stats(llama, ids, progress=False).save(path)
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(DamagedFile, match=str(path)):
        BoundaryStats.load(path)


def test_statistics_files_keep_their_hadamard_basis(tmp_path, llama, ids):
    from dataclasses import asdict

    stats = collect_stats(llama, ids, progress=False, hadamard_construction="paley")
    stats.save(tmp_path / "new.pt")
    assert BoundaryStats.load(tmp_path / "new.pt").hadamard == "paley"
    state = {k: v for k, v in asdict(stats).items() if k != "hadamard"}  # files of lp before the field:
    torch.save({**state, "meta": {"hadamard": "quarot"}}, tmp_path / "meta.pt")  # the basis in their meta,
    torch.save({**state, "meta": {}}, tmp_path / "old.pt")  # or none (made before the choice: lp's Paley)
    assert BoundaryStats.load(tmp_path / "meta.pt").hadamard == "quarot"
    assert BoundaryStats.load(tmp_path / "old.pt").hadamard == "paley"


def test_non_finite_statistics_stop_the_run_naming_the_boundaries(llama, ids):
    with torch.no_grad():
        llama.model.layers[3].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not finite at boundaries \[4, 5, 6\]"):
        collect_stats(llama, ids, progress=False)


_WRITER = """
import sys
from lp.files import write_json, atomic_write
import torch
for i in range(150):
    write_json(sys.argv[1] + "/same.json", {"writer": sys.argv[2], "i": i, "pad": "x" * 20000})
    atomic_write(sys.argv[1] + "/same.pt", lambda tmp: torch.save({"i": torch.arange(5000)}, tmp))
"""


def test_two_processes_writing_one_cache_entry_never_tear_it(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(_WRITER)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(k)], cwd=root, env=env,
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    torn = 0
    while any(p.poll() is None for p in procs):
        try:
            read_json(tmp_path / "same.json")
        except DamagedFile:
            torn += 1
    errors = [p.stderr.read() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert torn == 0
    assert read_json(tmp_path / "same.json")["i"] == 149
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_keys_carry_versions_and_the_fewshot_seed(tmp_path, monkeypatch):
    from lp import workspace
    from lp.workspace import calib_stats_path, run_id
    from tests.conftest import cfg_for

    cfg = cfg_for("unused", tmp_path)
    a = calib_stats_path(cfg)
    monkeypatch.setattr(workspace, "versions", lambda: {**records.versions(), "transformers": "0.0"})
    assert calib_stats_path(cfg) != a  # another transformers, another entry
    monkeypatch.undo()
    # settings the chosen metric ignores do not change the run id; the seed does
    other = json.loads(json.dumps(cfg))
    other["prune"]["score_samples"] = 99
    assert run_id(other) == run_id(cfg)
    other["seed"] = 1
    assert run_id(other) != run_id(cfg)


def test_package_lookup_never_runs_the_packages_code(tmp_path):
    """model.name_or_path=package:NAME.sub finds the folder without importing NAME: a planted __init__.py in
    the working directory never runs, and a missing sub-folder is 'not installed'."""
    import subprocess
    import sys

    planted = tmp_path / "plantedpkg"
    planted.mkdir()
    (planted / "__init__.py").write_text("open('RAN', 'w').write('code ran')\n")
    root = Path(__file__).resolve().parents[1]
    code = ("from lp.models import resolve_source\n"
            "try:\n    resolve_source('package:plantedpkg.sub')\nexcept FileNotFoundError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert "is not installed" in out.stdout and not (tmp_path / "RAN").exists(), out.stderr


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_write_gives_the_usual_permissions_and_leaves_the_umask_alone(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        records.atomic_write(tmp_path / "a.json", lambda tmp: tmp.write_text("{}"))
        assert os.umask(umask) == umask  # nothing in lp changed the process umask
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left


def test_the_default_run_writes_only_into_git_ignored_folders():
    """The README's main job leaves the checkout clean: its records, statistics, caches and Hydra logs land in
    an ignored folder (results_dir=results writes the committed records only when asked)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tests.conftest import CONF, ROOT

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", return_hydra_config=True), resolve=False)
    rd = cfg["results_dir"]
    written = [f"{rd}/records/x.json", f"{rd}/records/x.outcomes.json.gz", f"{rd}/stats/calib_x.pt",
               f"{rd}/cache/dense/x.json", f"{rd}/hydra/2026-01-01/.hydra/config.yaml"]
    assert cfg["cache_dir"] == "${results_dir}/cache"  # caches, and the Hydra logs, sit under results_dir
    assert all(cfg["hydra"][k]["dir"].startswith("${lp_folder:${results_dir}}/") for k in ("run", "sweep"))
    out = subprocess.run(["git", "check-ignore", *written], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == written
