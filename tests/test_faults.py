"""Faults and bad input, round 4: each class of failure a user (or a crashed job) meets, refused or named."""
import gzip
import json
import math
import os
from pathlib import Path

import pytest
import torch

from lp import pipeline
from lp.pruning import PATCH_FILE, SPEC_FILE, load_pruned, pruned, save_pruned
from lp.files import DamagedFile, write_json
from lp.records import load_outcomes, load_records, outcomes_path, save_outcomes
from lp.report.tables import frame, paired
from tests.conftest import cfg_for, record


# ------------------------------------------------------------------ 1. saves: complete and of one run, or refused
def _patched_save(model, path, scale):
    from lp.modules import LinearPatch

    d = model.config.hidden_size
    with pruned(model, [2, 3], lambda s, e: LinearPatch(scale * torch.eye(d))) as spec:
        save_pruned(model, None, path, spec)


def test_an_interrupted_save_leaves_the_earlier_save_whole(llama, tmp_path, monkeypatch):
    from lp import pruning

    out = tmp_path / "D"
    _patched_save(llama, out, 2.0)
    real = pruning._write_pruned

    def dies(model, tok, path, spec, fold):  # the new weights are written, then the process is stopped
        real(model, tok, path, spec, fold)
        (path / SPEC_FILE).unlink()
        raise KeyboardInterrupt
    monkeypatch.setattr(pruning, "_write_pruned", dies)
    with pytest.raises(KeyboardInterrupt):
        _patched_save(llama, out, 3.0)
    model, _, _ = load_pruned(out)  # the first save, whole: its patch, its weights
    assert torch.equal(list(pruning.patches_of(model).values())[0].weight, 2.0 * torch.eye(24))
    assert [p.name for p in tmp_path.iterdir()] == ["D"]  # nothing left beside it


@pytest.mark.parametrize("then", ["load", "save"])
def test_a_save_killed_between_its_renames_gives_the_earlier_model_back(llama, tmp_path, then):
    """Killed after the old folder moved aside and before the new one moved in (issue #42): the next load
    restores the earlier model; the next save replaces it and leaves nothing beside it."""
    from lp import pruning

    out = tmp_path / "D"
    _patched_save(llama, out, 2.0)
    out.replace(tmp_path / ".D.old-999999999")  # what the killed save left: no folder D, the earlier one aside
    if then == "load":
        model, _, _ = load_pruned(out)
        assert torch.equal(list(pruning.patches_of(model).values())[0].weight, 2.0 * torch.eye(24))
    else:
        _patched_save(llama, out, 3.0)
        model, _, _ = load_pruned(out)
        assert torch.equal(list(pruning.patches_of(model).values())[0].weight, 3.0 * torch.eye(24))
    assert [p.name for p in tmp_path.iterdir()] == ["D"]


def test_a_users_file_in_a_saved_folder_is_never_deleted(llama, tmp_path):
    out = tmp_path / "D"
    _patched_save(llama, out, 2.0)
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"holds files that this save would not write \(\['notes.txt'\]\)"):
        _patched_save(llama, out, 3.0)
    assert (out / "notes.txt").read_text() == "keep me" and load_pruned(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D"]


def test_a_killed_saves_leftovers_are_removed_and_other_folders_refused(llama, tmp_path):
    out = tmp_path / "D"
    stale = tmp_path / ".D.saving-999999999"  # a save killed by SIGTERM: no process of that id is alive
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    _patched_save(llama, out, 2.0)
    assert not stale.exists() and (out / SPEC_FILE).is_file()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine: a folder of other files"):
        _patched_save(llama, other, 2.0)
    assert (other / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("damage,message", [
    ("nan", "non-finite values"), ("shape", r"weight shape \(12, 12\)"), ("garbage", "could not be read")])
def test_load_pruned_refuses_damaged_patches(llama, tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "D"
    _patched_save(llama, out, 2.0)
    weights = load_file(str(out / PATCH_FILE))
    key = next(iter(weights))
    if damage == "nan":
        weights[key][0, 0] = math.nan
    elif damage == "shape":
        weights[key] = torch.eye(12)
    if damage == "garbage":
        (out / PATCH_FILE).write_bytes(b"\x00" * 64)
    else:
        save_file(weights, str(out / PATCH_FILE))
    with pytest.raises(ValueError, match=message):
        load_pruned(out)


# ------------------------------------------------------------------ 2-4. records and their outcomes
def _run_with_outcomes(tmp_path, name="a", acc=(1, 0, 1, 1)):
    rec = record(3, "linearpatch", 20.0, "2026-01-01", acc={"t": sum(acc) / len(acc)}, dense_acc={"t": 0.75})
    rec["run_id"] = name
    for side, a in (("dense", (1, 1, 1, 0)), ("pruned", acc)):
        rec["zeroshot"][side]["t"] = {"acc": sum(a) / len(a), "samples": len(a)}
    path = tmp_path / "records" / f"{name}.json"
    rec["outcomes"] = outcomes_path(path).name
    outcomes = {s: {"t": {"ids": [0, 1, 2, 3], "acc": list(a), "acc_norm": None}}
                for s, a in (("dense", (1, 1, 1, 0)), ("pruned", acc))}
    save_outcomes(outcomes_path(path), outcomes["dense"], outcomes["pruned"])
    write_json(path, rec)
    return path, rec, outcomes


def _rewrite(path, outcomes):
    outcomes_path(path).write_bytes(gzip.compress(json.dumps({"format": 1, **outcomes}).encode()))


@pytest.mark.parametrize("damage", ["cut_short", "lengths", "not_01", "nan", "other_task", "flipped", "missing",
                                    "duplicate_id", "same_ids", "other_ids", "no_common_id"])
def test_damaged_outcomes_are_named_and_never_used(tmp_path, damage):
    path, rec, out = _run_with_outcomes(tmp_path)
    t = out["pruned"]["t"]
    if damage == "cut_short":
        outcomes_path(path).write_bytes(outcomes_path(path).read_bytes()[:20])
    elif damage == "missing":
        outcomes_path(path).unlink()
    else:
        if damage == "lengths":
            t["acc"] = t["acc"][:3]
        elif damage == "not_01":
            t["acc"] = [1, 0, 2, 1]
        elif damage == "nan":
            t["acc"] = [1, 0, float("nan"), 1]
        elif damage == "other_task":
            out["pruned"] = {"u": t}
        elif damage == "flipped":  # well-formed, but not what the record says the run scored
            t["acc"] = [0, 0, 0, 1]
        elif damage == "duplicate_id":  # pairing would resample one document twice (issue #42's probes)
            t["ids"] = [0, 1, 1, 3]
        elif damage == "same_ids":
            t["ids"] = [2, 2, 2, 2]
        elif damage == "other_ids":  # half the pruned documents are not the dense ones
            t["ids"] = [0, 1, 7, 8]
        elif damage == "no_common_id":
            t["ids"] = [10, 11, 12, 13]
        _rewrite(path, out)
    with pytest.raises(DamagedFile, match=outcomes_path(path).name):
        load_outcomes(path, rec)
    skipped = []
    recs = load_records(tmp_path / "records", skipped)
    assert len(recs) == 1 and recs[0]["_outcomes"] is None  # the row stays, without the outcomes
    assert [os.path.basename(p) for p, _ in skipped] == [outcomes_path(path).name]
    assert paired(frame(recs))[["rp_lo", "rp_hi"]].isna().all(axis=None)  # no interval from them


@pytest.mark.parametrize("bad", ["nan_ppl", "no_ppl", "inf_rp", "wrong_type", "outcomes", "acc_above_1",
                                 "string_stderr", "negative_samples", "duplicate_ids"])
def test_bad_records_are_named_skipped_and_redone_on_resume(tmp_path, bad):
    path, rec, out = _run_with_outcomes(tmp_path)
    good, _, _ = _run_with_outcomes(tmp_path, "b")
    if bad in ("outcomes", "duplicate_ids"):
        out["pruned"]["t"]["acc" if bad == "outcomes" else "ids"] = [1, 1] if bad == "outcomes" else [0, 0, 2, 3]
        _rewrite(path, out)
    else:
        if bad == "nan_ppl":
            rec["ppl"]["pruned"] = float("nan")
        elif bad == "no_ppl":
            del rec["ppl"]
        elif bad == "inf_rp":
            rec["retention"]["rp"] = float("inf")
        elif bad == "acc_above_1":  # shown as 500.00 and bold before
            rec["zeroshot"]["pruned"]["t"]["acc"] = 5
        elif bad == "string_stderr":  # a pandas traceback naming no file before
            rec["retention"]["rp_stderr"] = "x"
        elif bad == "negative_samples":
            rec["zeroshot"]["dense"]["t"]["samples"] = -4
        else:
            rec["n"] = "three"
        path.write_text(json.dumps(rec))  # json writes NaN / Infinity, as a crashed or foreign writer may
    skipped = []
    recs = load_records(tmp_path / "records", skipped)
    assert f"records/{path.stem}." in str(skipped) and any(r["run_id"] == "b" for r in recs)
    if bad not in ("outcomes", "duplicate_ids"):
        assert all(r["run_id"] == "b" for r in recs)
        df = frame(recs)
        assert not df.isin([math.inf]).any(axis=None)
    from lp.records import record_problem

    assert record_problem(json.loads(path.read_text()), path) is not None  # what resume asks: redo it
    assert record_problem(json.loads(good.read_text()), good) is None


def test_resume_redoes_a_run_whose_record_is_damaged(tiny_dir, tmp_path, caplog):
    cfg = cfg_for(tiny_dir, tmp_path, "prune.n=2")
    first = pipeline.run(cfg)
    path = tmp_path / "records" / f"{first['run_id']}.json"
    damaged = {**first, "ppl": {**first["ppl"], "pruned": float("nan")}}
    path.write_text(json.dumps(damaged))
    with caplog.at_level("WARNING"):
        again = pipeline.run({**cfg, "resume": True})
    assert "the run is redone" in caplog.text and again["ppl"] == first["ppl"]
    assert json.loads(path.read_text())["ppl"]["pruned"] == first["ppl"]["pruned"]


# ------------------------------------------------------------------ 6-7. settings, before the weights load
@pytest.mark.parametrize("override,message", [
    ("bootstrap.level=2", r"bootstrap.level=2 is not valid"),
    ("bootstrap.resamples=0", r"bootstrap.resamples=0 is not valid"),
    ("distill=offline_kl", r"patch=none leaves none to train"),
    ("distill.topk=100000", None),
    ("eval.tasks=piqa_local", r"eval.tasks='piqa_local' must be a list"),
    ("eval.tasks=[piqa_local,no_such_task]", r"eval.tasks: \['no_such_task'\] are not lm-eval tasks; valid"),
    ("eval.tasks=[piqa_local,piqa_local]", r"eval.tasks names \['piqa_local'\] more than once"),
    ("+prune.startt=3", r"prune.startt: no prune method reads this setting"),
    ("results_dir=''", r"results_dir='' is not valid"),
    ("data.calib_samples=100000", r"data.calib_samples=100000 is not valid"),
    ("resume=yes", r"resume='yes' is not valid: it must be true or false"),
    ("prune.indices=5", r"prune.indices=5 must be a list"),
    ("model.device=tpu", r"model.device='tpu' is not valid: it must be a torch device"),
    ("model.dtype=float7", r"model.dtype='float7' is not one of \['float32', 'bfloat16', 'float16', 'auto'\]"),
    ("save_model=TMP/afile", r"save_model='.*afile' is not valid: .*afile is a file"),
    ("save_model=TMP/mine", r"save_model=.*mine: a folder of other files is there"),
    ("save_gguf=TMP/afile/x.gguf", r"save_gguf's folder='.*afile' is not valid: .*afile is a file"),
])
def test_what_the_config_can_tell_is_refused_before_the_weights_load(tiny_dir, tmp_path, monkeypatch, override,
                                                                      message):
    from lp import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    extra = ["patch=none"] if override.startswith("distill=") else []
    if override == "distill.topk=100000":  # the tiny model's vocabulary is 400
        extra, message = ["patch=linearpatch", "distill=offline_kl"], r"distill.topk=100000 is not valid: .* \[1, "
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    cfg = cfg_for(tiny_dir, tmp_path, *extra, override.replace("TMP", str(tmp_path)))
    with pytest.raises(ValueError, match=message):
        pipeline.run(cfg, workspace=pipeline.Workspace())


def test_unused_distill_settings_do_not_change_the_run(tiny_dir, tmp_path):
    plain = cfg_for(tiny_dir, tmp_path, "prune.n=2")
    extra = {**plain, "distill": {**plain["distill"], "lr": 0.5}}  # distill=none reads no lr
    assert pipeline.run_id(plain) == pipeline.run_id(extra)


# ------------------------------------------------------------------ 8. errors that say what is wrong
def test_model_file_errors_name_the_file(tmp_path):
    from lp.models import model_config

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError, match=r"is a file, not a folder: .*model.gguf_file='m.gguf'"):
        model_config({"name_or_path": str(gguf)})
    with pytest.raises(ValueError, match=r"m.gguf could not be read|header of .*m.gguf"):
        model_config({"name_or_path": str(tmp_path), "gguf_file": "m.gguf"})


def test_unwritable_cache_is_named_with_its_path(tmp_path):
    from lp.files import atomic_write

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: a full disk stands in
            def full(tmp):
                raise OSError(28, "No space left on device")
            with pytest.raises(OSError, match=r"could not write .*x.pt .*disk full"):
                atomic_write(tmp_path / "x.pt", full)
            assert not list(tmp_path.glob(".x.pt*"))
        else:
            with pytest.raises(OSError, match=r"could not write .*ro/x.pt"):
                atomic_write(ro / "x.pt", lambda tmp: tmp.write_text("1"))
    finally:
        ro.chmod(0o700)


def test_a_full_disk_inside_torch_save_names_the_file(tmp_path, monkeypatch):
    from lp.files import atomic_write

    def full(obj, f, *a, **k):  # what torch.save raises when the disk fills under it
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"could not write .*calib_x.pt .*disk full"):
        atomic_write(tmp_path / "stats" / "calib_x.pt", lambda tmp: torch.save({}, tmp))
    assert not list((tmp_path / "stats").glob(".calib_x*"))  # no temporary left


def test_model_device_cuda_without_cuda_is_refused_before_the_load(tiny_dir, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    from lp import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    with pytest.raises(ValueError, match="model.device=cuda: torch sees no CUDA device"):
        pipeline.run(cfg_for(tiny_dir, tmp_path, "model.device=cuda"), workspace=pipeline.Workspace())


def test_a_batch_line_with_an_unclosed_quote_names_file_and_line(tmp_path):
    from experiments.batch import runs_of

    f = tmp_path / "runs.txt"
    f.write_text("prune.n=3\n# a comment\nprune.n=5 'patch=diag\n")
    with pytest.raises(ValueError, match=r"runs.txt, line 3: .*quotation"):
        runs_of(f)


def test_a_full_disk_at_the_record_loses_no_finished_run(tiny_dir, tmp_path, monkeypatch, caplog):
    """The disk fills as the record is written (issue #42): the run fails, and its finished record is in the
    log in full and in a rescue folder that the message names, identical to what the record file would hold."""
    import logging
    import tempfile

    from lp import files, records

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    results = tmp_path / "results"
    real = files.atomic_write

    def full_under_results(path, write):
        if str(path).startswith(str(results / "records")):
            raise files._unwritable(path, OSError(28, "No space left on device"))
        return real(path, write)

    for module in (files, records):  # the record (write_json) and its outcomes side file
        monkeypatch.setattr(module, "atomic_write", full_under_results)
    cfg = cfg_for(tiny_dir, results, "prune.n=2", "eval.tasks=[piqa_local]", "eval.limit=4")
    with caplog.at_level(logging.ERROR, logger="lp"), pytest.raises(OSError, match="could not write"):
        pipeline.run(cfg, workspace=pipeline.Workspace())
    assert not list((results / "records").glob("*.json"))
    rescued = list((tmp_path / "tmp" / "lp-rescued").glob("*.json"))
    assert len(rescued) == 1 and str(rescued[0].parent) in caplog.text
    rec = json.loads(rescued[0].read_text())
    line = next(x for m in caplog.messages for x in m.splitlines() if x.startswith('{"record"'))
    assert json.loads(line)["record"] == rec and rec["status"] == "complete"
    assert load_outcomes(rescued[0], rec)["pruned"]["piqa_local"]["ids"] == [0, 1, 2, 3]


def test_an_empty_results_dir_makes_no_folder_anywhere(tmp_path):
    """Hydra's run folder is ${results_dir}/hydra/...: an empty results_dir is refused before Hydra makes it
    (it made /hydra/<time> at the file system's root before, issue #42)."""
    import subprocess
    import sys

    root_hydra = Path("/hydra")
    before = root_hydra.exists()
    out = subprocess.run([sys.executable, "-m", "experiments.run", "results_dir=''"], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "results_dir='' is not valid: it must be a folder path" in out.stderr
    assert list(tmp_path.iterdir()) == [] and root_hydra.exists() == before


def test_a_results_dir_that_is_a_file_is_named_before_hydra_writes(tmp_path):
    from experiments.run import folder

    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"results_dir='.*afile/runs' is not valid: .*afile is a file"):
        folder(str(tmp_path / "afile" / "runs"))
    assert folder(str(tmp_path / "new" / "runs")) == str(tmp_path / "new" / "runs")  # a folder to make is fine
    assert not (tmp_path / "new").exists()


def test_a_model_folder_without_its_tokenizer_is_named(tiny_dir, tmp_path):
    """transformers said 'You need to have sentencepiece or tiktoken installed' (issue #42)."""
    import shutil

    from lp.models import load_model

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"the folder has no tokenizer \(none of \['tokenizer.json'"):
        load_model(str(folder))


def test_lp_loads_its_own_patched_folder_without_asking_to_run_remote_code(tiny_dir, tmp_path, monkeypatch):
    """A saved LinearPatch folder (with its tokenizer) asked 'Do you wish to run the custom code? [y/N]' in a
    terminal (issue #42): lp wrote that code and loads the folder itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto import configuration_auto, tokenization_auto

    from lp.modules import LinearPatch

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    d = model.config.hidden_size
    with pruned(model, [2, 3], lambda s, e: LinearPatch(2.0 * torch.eye(d))) as spec:
        save_pruned(model, tok, tmp_path / "D", spec)

    def asks(*a, **k):
        raise AssertionError("asked whether to run remote code")
    for mod in (tokenization_auto, configuration_auto):
        monkeypatch.setattr(mod, "resolve_trust_remote_code", asks)
    _, loaded_tok, _ = load_pruned(tmp_path / "D")
    assert loaded_tok("the jury").input_ids == tok("the jury").input_ids
