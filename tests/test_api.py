"""lp from Python (lp/api.py): the same layers and numbers as the config run, on the default model."""
import copy

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import lp
from experiments.batch import CONF
from lp import data as data_lib
from lp import pipeline


def test_the_python_api_gives_the_config_runs_layers_and_perplexity(tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=[
            "data.calib_samples=8", "eval.tasks=[]", "eval.max_windows=3", "logger=none", "progress=false",
            f"results_dir={tmp_path}"]), resolve=True)
    record = pipeline.run(cfg)
    model, tok = pipeline.WORKSPACE.model(cfg["model"])  # the dense model, restored after the run
    d, e = cfg["data"], cfg["eval"]
    stats = lp.calibrate(model, tok, data_lib.corpus_text(d, "calib"), samples=d["calib_samples"], seqlen=d["seqlen"],
                         seed=cfg["seed"], batch_size=d["calib_batch_size"])
    removed = lp.choose_layers(stats, n=cfg["prune"]["n"], metric="cosine")
    assert removed == record["removed"]
    windows = lp.windows(tok, data_lib.corpus_text(d, "eval"), seqlen=d["seqlen"], max_windows=e["max_windows"])
    assert lp.perplexity(model, windows, progress=False) == pytest.approx(record["ppl"]["dense"], rel=1e-5)
    model = copy.deepcopy(model)  # the workspace's dense model stays whole for other tests
    spec = lp.prune(model, removed, stats, patch="linearpatch")
    assert lp.perplexity(model, windows, progress=False) == pytest.approx(record["ppl"]["pruned"], rel=1e-4)
    assert spec.removed == removed and len(spec.patches) == 1  # one patch, at the one interface


def test_public_names_are_listed_and_registries_name_the_valid_choices():
    assert {"calibrate", "choose_layers", "prune", "perplexity", "evaluate_tasks", "save_pruned", "METRICS",
            "PATCHES"} <= set(lp.__all__)
    assert {"cosine", "block_influence"} <= set(lp.METRICS) and "linearpatch" in lp.PATCHES
    with pytest.raises(AttributeError, match="public names"):
        lp.nothing_here


def test_bad_arguments_are_named_before_the_model_changes(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    text = data_lib.brown_split("eval")[:20_000]
    with pytest.raises(ValueError, match=r"data.calib_samples=0 is not valid: it must be an integer >= 1"):
        lp.calibrate(model, tok, text, samples=0, seqlen=32)
    with pytest.raises(ValueError, match=r"the calibration text has 0 tokens"):
        lp.calibrate(model, tok, "", samples=2, seqlen=32)
    with pytest.raises(ValueError, match=r"data.seqlen=0 is not valid: it must be an integer >= 2"):
        lp.windows(tok, text, seqlen=0)
    with pytest.raises(ValueError, match=r"eval.max_windows=0 is not valid"):
        lp.windows(tok, text, seqlen=32, max_windows=0)
    stats = lp.calibrate(model, tok, text, samples=2, seqlen=32)
    layers = [id(m) for m in model.model.layers]
    with pytest.raises(ValueError, match=r"layers to remove \[1, 9\] must be distinct indices in \[0, 5\]"):
        lp.prune(model, [1, 9], stats, patch="linearpatch")  # refused before a patch is built on layer 9
    with pytest.raises(ValueError, match=r"patch.hadamard='foo' is not one of \['paley', 'quarot'\]"):
        lp.prune(model, [1, 2], stats, patch="linearpatch", hadamard="foo")
    assert [id(m) for m in model.model.layers] == layers  # the model as it was
