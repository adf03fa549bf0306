"""GGUF out (lp.export): the pruned GGUF file as llama.cpp and transformers' GGUF reader would read it."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lp.export import gguf_problem, prune_gguf

gguf = pytest.importorskip("gguf")


def _tiny_gguf(path, layers=4):
    """A 4-block 'llama' file with a per-layer metadata array, a string array and quantised block tensors."""
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_block_count(layers)
    w.add_key_value("llama.attention.head_count_kv", list(range(10, 10 + layers)), gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.UINT32)
    w.add_key_value("general.tags", ["a", "b", "c", "d"], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    w.add_chat_template("{{ messages }}")
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((8, 32)).astype(np.float32))
    for i in range(layers):
        q = gguf.quants.quantize(rng.standard_normal((4, 32)).astype(np.float32) + i, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.ffn_up.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.full(32, i, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_pruned_gguf_keeps_the_other_layers_bytes_and_cuts_per_layer_metadata(tmp_path):
    _tiny_gguf(tmp_path / "src.gguf")
    out = prune_gguf(tmp_path / "src.gguf", tmp_path / "out.gguf", [1, 2])
    src, got = gguf.GGUFReader(tmp_path / "src.gguf"), gguf.GGUFReader(out)
    assert got.fields["llama.block_count"].contents() == 2
    assert got.fields["llama.attention.head_count_kv"].contents() == [10, 13]  # layers 0 and 3
    assert got.fields["general.tags"].contents() == ["a", "b", "c", "d"]  # not per-layer: kept whole
    assert got.fields["tokenizer.chat_template"].contents() == "{{ messages }}"
    old = {t.name: t for t in src.tensors}
    new = {t.name: t for t in got.tensors}
    assert sorted(new) == ["blk.0.attn_norm.weight", "blk.0.ffn_up.weight", "blk.1.attn_norm.weight",
                           "blk.1.ffn_up.weight", "token_embd.weight"]
    for name, was in [("blk.0.ffn_up.weight", "blk.0.ffn_up.weight"), ("blk.1.ffn_up.weight", "blk.3.ffn_up.weight"),
                      ("blk.1.attn_norm.weight", "blk.3.attn_norm.weight")]:
        assert new[name].tensor_type == old[was].tensor_type  # the original quantisation, no round trip
        assert bytes(new[name].data) == bytes(old[was].data)
    assert json.loads(got.fields["lp.pruned"].contents()) == {"source": "src.gguf", "removed": [1, 2]}
    prune_gguf(tmp_path / "src.gguf", out, [0])  # lp's own file: replaced
    assert gguf.GGUFReader(out).fields["llama.block_count"].contents() == 3
    (tmp_path / "notes.gguf").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"save_gguf=.*notes.gguf: a file lp did not write is there"):
        prune_gguf(tmp_path / "src.gguf", tmp_path / "notes.gguf", [1])
    assert (tmp_path / "notes.gguf").read_text() == "my notes"
    with pytest.raises(ValueError, match=r"distinct indices in \[0, 3\]"):
        prune_gguf(tmp_path / "src.gguf", tmp_path / "bad.gguf", [4])
    assert not list(tmp_path.glob(".*writing*")) and not (tmp_path / "bad.gguf").exists()


@pytest.mark.parametrize("change,match", [
    ({"model": {"gguf_file": None}}, "model.gguf_file is null"),
    ({"patch": {"variant": "linearpatch"}}, "patch=linearpatch adds to the kept layers"),
    ({"patch": {"variant": "prunecomp"}}, "which would need re-quantising"),
    ({"distill": {"method": "offline_kl"}}, "trains weights"),
    ({"save_gguf": "notes.gguf"}, "a file lp did not write is there"),
    ({"save_gguf": "."}, "a folder is there"),
])
def test_what_cannot_be_written_as_gguf_is_said_from_the_config(change, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.gguf").write_text("my notes")
    cfg = {"model": {"gguf_file": "m.gguf"}, "patch": {"variant": "none"}, "distill": {"method": "none"},
           "prune": {"metric": "cosine"}, "save_gguf": "pruned.gguf"}
    assert gguf_problem(cfg, narrows=False) is None
    assert "own widths" in gguf_problem({**cfg, "prune": {"metric": "llm_pruner"}}, narrows=True)
    assert match in gguf_problem({**cfg, **change}, narrows=False)


@pytest.mark.slow
def test_save_gguf_of_the_default_model_loads_in_stock_transformers_with_lps_logits(tmp_path):
    """A run with save_gguf=: the file, read by transformers' GGUF reader in a process where lp cannot be
    imported, gives the logits of lp's pruned model from the same file (its de-quantised weights)."""
    from lp import pipeline
    from lp.pruning import pruned
    from tests.conftest import CONF
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=[
            "patch=none", "prune.n=5", "data.calib_samples=4", "data.seqlen=64", "eval=ppl", "eval.max_windows=2",
            "logger=none", "progress=false", f"results_dir={tmp_path}", f"save_gguf={tmp_path / 'p.gguf'}"]), resolve=True)
    rec = pipeline.run(cfg)
    model, tok = pipeline.WORKSPACE.model(cfg["model"])
    x = tok("The jury said that the city", return_tensors="pt").input_ids
    with torch.no_grad(), pruned(model, rec["removed"], lambda s, e: None):
        want = model(input_ids=x).logits
    torch.save({"x": x, "want": want}, tmp_path / "io.pt")
    code = f"""
import sys
sys.modules["lp"] = None  # lp cannot be imported here
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, gguf_file="p.gguf", dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained({str(tmp_path)!r}, gguf_file="p.gguf")
io = torch.load({str(tmp_path / "io.pt")!r})
with torch.no_grad():
    got = m(input_ids=io["x"]).logits
print("maxdiff", (got - io["want"]).abs().max().item(), "layers", m.config.num_hidden_layers,
      "same_tokens", tok("The jury said that the city", return_tensors="pt").input_ids.tolist() == io["x"].tolist())
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    words = res.stdout.split()
    assert float(words[words.index("maxdiff") + 1]) < 1e-5
    assert words[words.index("layers") + 1] == "25" and words[words.index("same_tokens") + 1] == "True"


def test_a_file_whose_layers_would_change_kind_is_refused(tmp_path):
    """Gemma 3's pattern (five sliding-window layers, then a full-attention one) is set by position when a GGUF
    file is read: removing layers that shift a full-attention layer to a sliding position is refused."""
    from lp.export import layer_kind_problem

    kinds = (["sliding_attention"] * 5 + ["full_attention"]) * 3  # 18 layers, as Gemma-3-270M
    assert layer_kind_problem(kinds, [12, 13, 14, 15, 16, 17]) is None  # a whole period at the end
    assert layer_kind_problem(["full_attention"] * 18, [3, 4]) is None  # one kind: nothing moves
    why = layer_kind_problem(kinds, [14, 15, 16])
    assert "without layers [14, 15, 16] the kept layers at new positions [14] would change kind" in why
    _tiny_gguf(tmp_path / "src.gguf")
    with pytest.raises(ValueError, match=r"would change kind"):
        prune_gguf(tmp_path / "src.gguf", tmp_path / "out.gguf", [1], kinds=["a", "b", "a", "b"])
    assert not (tmp_path / "out.gguf").exists()
