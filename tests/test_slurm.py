"""lp's sweeps through a real SLURM: a one-node cluster on this machine (tests/slurm/cluster.sh: munged,
slurmctld, slurmd over the loopback address), jobs submitted by Hydra's submitit launcher and run by slurmd;
a job cancelled while it runs, a job that fails alone, a job requeued mid-run.

Needs Debian's slurm-wlm and munge (`.ci/run` installs them). Without them these tests are skipped, unless
LP_REQUIRE_SLURM=1 (as in CI), where their absence fails."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lp.records import load_records
from tests.conftest import ROOT

CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
HAVE = all(shutil.which(t) for t in ("munged", "slurmctld", "slurmd", "sbatch"))
if not HAVE and os.environ.get("LP_REQUIRE_SLURM") == "1":
    raise RuntimeError("LP_REQUIRE_SLURM=1 but slurm-wlm / munge are not installed: apt-get install slurm-wlm munge")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAVE, reason="slurm-wlm and munge are not installed (apt-get install slurm-wlm munge)")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    try:
        out = subprocess.run(["bash", str(CLUSTER), "start", str(folder)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        yield env
    finally:  # the daemons stop even when a test failed
        subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], capture_output=True, timeout=60)


@pytest.fixture(autouse=True)
def empty_queue(cluster):
    """Each test starts with an empty queue: a job of the test before may still be listed (COMPLETING) after its
    sweep has returned, and would be taken for one of this test's jobs."""
    wait_until(lambda: not jobs(cluster), what="the queue of the test before to empty")


def sweep(tiny_dir, results, *overrides, launcher="submitit_slurm", env=None, wait=True):
    """The tiny model's sweep over patch=none,linearpatch, through SLURM (or locally: launcher=basic)."""
    cmd = [sys.executable, "-m", "experiments.run", "-m", f"hydra/launcher={launcher}",
           f"model.name_or_path={tiny_dir}", "model.gguf_file=null", "model.name=tiny", "logger=none",
           "data.calib_samples=4", "data.seqlen=32", "data.calib_batch_size=2", "eval.max_windows=3",
           "eval.batch_size=2", "eval.tasks=[]", f"results_dir={results}", "progress=false", "prune.n=2",
           *(["hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1"] if launcher != "basic" else []),
           *overrides]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def by_patch(results: Path) -> dict:
    return {r["patch"]: r for r in load_records(results / "records")}


def jobs(env) -> dict[str, str]:
    """SLURM job id -> state, of the jobs in the queue."""
    for _ in range(20):  # squeue fails now and then while slurmctld is busy: an empty answer is not an empty queue
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], env=env, capture_output=True, text=True)
        if out.returncode == 0:
            return dict(line.split() for line in out.stdout.splitlines() if line.strip())
        time.sleep(0.5)
    raise AssertionError(f"squeue failed: {out.stderr}")


def wait_until(condition, timeout=300, what="the condition", poll=0.5):
    end = time.time() + timeout
    while time.time() < end:
        got = condition()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_sweep_through_slurm_equals_the_same_sweep_run_locally(cluster, tiny_dir, tmp_path):
    local = sweep(tiny_dir, tmp_path / "local", "patch=none,linearpatch", launcher="basic")
    assert local.returncode == 0, local.stderr[-3000:]
    out = sweep(tiny_dir, tmp_path / "slurm", "patch=none,linearpatch", env=cluster)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = by_patch(tmp_path / "local"), by_patch(tmp_path / "slurm")
    assert set(a) == set(b) == {"none", "linearpatch"}
    for patch in a:
        assert b[patch]["run_id"] == a[patch]["run_id"] and b[patch]["ppl"] == a[patch]["ppl"]
    # the multirun folder holds each job's SLURM log (submitit) and Hydra's output folder
    [sweep_dir] = (tmp_path / "slurm" / "hydra" / "multirun").iterdir()
    logs = sorted((sweep_dir / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2 and all("record:" in p.read_text() for p in logs)
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == ["0", "1"]


def test_a_cancelled_job_is_redone_by_resume_and_the_finished_one_skipped(cluster, tiny_dir, tmp_path):
    results = tmp_path / "res"
    # job 1 is cancelled as soon as SLURM runs it (a run needs some 20 s here), whether job 0 runs beside it or
    # (one job at a time, as on a node of one core) before or after it; job 0 runs to its end
    proc = sweep(tiny_dir, results, "patch=linearpatch", "eval.max_windows=3,4", env=cluster, wait=False)
    running = wait_until(lambda: [j for j, s in jobs(cluster).items() if j.endswith("_1") and s == "RUNNING"],
                         what="job 1 to run", poll=0.1)
    subprocess.run(["scancel", running[0]], env=cluster, check=True)
    wait_until(lambda: not jobs(cluster), what="the queue to empty")
    # without SLURM accounting (slurmdbd; none here) submitit cannot see that a job was cancelled and the sweep's
    # process keeps waiting for it: stopped as a user would (on a cluster with accounting it ends by itself)
    proc.terminate()
    proc.communicate(timeout=60)
    [done] = load_records(results / "records")
    assert done["config"]["eval"]["max_windows"] == 3  # nothing half-written was read as a record
    first = Path(done["_path"]).stat().st_mtime_ns
    again = sweep(tiny_dir, results, "patch=linearpatch", "eval.max_windows=3,4", "resume=true", env=cluster)
    assert again.returncode == 0, again.stderr[-3000:]
    recs = {r["config"]["eval"]["max_windows"]: r for r in load_records(results / "records")}
    assert set(recs) == {3, 4} and Path(recs[3]["_path"]).stat().st_mtime_ns == first  # skipped, not redone
    [sweep_dir] = sorted((results / "hydra" / "multirun").iterdir())[-1:]
    assert any("is complete, skipped" in p.read_text() for p in (sweep_dir / ".submitit").rglob("*_log.*"))


def test_a_job_that_fails_fails_alone_with_its_error_in_its_log(cluster, tiny_dir, tmp_path):
    results = tmp_path / "res"
    out = sweep(tiny_dir, results, "patch=linearpatch", "prune.n=2,99", env=cluster)
    assert out.returncode != 0
    wait_until(lambda: not jobs(cluster), what="the queue to empty")
    [rec] = load_records(results / "records")
    assert rec["n"] == 2
    [sweep_dir] = (results / "hydra" / "multirun").iterdir()
    logs = {p.parent.name: p.read_text() for p in (sweep_dir / ".submitit").rglob("*_log.out")}
    failed = [name for name, text in logs.items() if "prune.n=99 is not valid" in text]
    assert len(logs) == 2 and len(failed) == 1 and "record:" not in logs[failed[0]]  # its error in its own log
    assert "prune.n=99 is not valid" in out.stderr


def test_a_requeued_job_resumes_from_its_caches(cluster, tiny_dir, tmp_path):
    """scontrol requeue (what preemption does) while the run evaluates: SLURM starts the job again, submitit
    runs the same call, and the run reuses the statistics it had already cached."""
    results = tmp_path / "res"
    proc = sweep(tiny_dir, results, "patch=linearpatch", "eval.max_windows=40", env=cluster, wait=False)
    stats = wait_until(lambda: list((results / "stats").glob("calib_*.pt")), what="the statistics file", poll=0.1)[0]
    [job] = wait_until(lambda: [j for j, s in jobs(cluster).items() if s == "RUNNING"], what="the job to run")
    # frozen (SIGSTOP) the moment its statistics are on disk, so that it is surely mid-run when requeued
    subprocess.run(["scontrol", "suspend", job], env=cluster, check=True)
    written = stats.stat().st_mtime_ns
    subprocess.run(["scontrol", "requeue", job], env=cluster, check=True)
    # SLURM holds a requeued job back (a suspended one by an admin hold) before it may start again: the test
    # lets it start now
    wait_until(lambda: jobs(cluster).get(job) == "PENDING", what="the job to be requeued")
    subprocess.run(["scontrol", "release", job], env=cluster, check=True)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster, check=True)
    proc.communicate(timeout=600)
    assert proc.returncode == 0
    [rec] = load_records(results / "records")
    assert stats.stat().st_mtime_ns == written  # not recomputed after the requeue
    [sweep_dir] = (results / "hydra" / "multirun").iterdir()
    log = "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob("*_log.*"))
    assert log.count("load done") >= 2 and rec["patch"] == "linearpatch"  # it ran twice, and finished
