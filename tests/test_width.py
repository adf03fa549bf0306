"""LLM-Pruner's block-wise width pruning (lp.width): what it keeps, what the narrowed model computes, its
parameter budget, and the run from the config (record, save, reload)."""
import copy
import json

import pytest
import torch

from lp import pipeline
from lp.data import RunData
from lp.evaluation import perplexity
from lp.models import Layout, count_parameters
from lp.pruning import load_pruned
from lp.width import plan, pruned_counts, ratio_for, unit_of, width_pruned

from tests.conftest import cfg_for


def gqa_model(model_type: str, seed: int = 0):
    """6 layers, 4 key/value heads of 4 dims, 2 query heads each (GQA), 64 MLP channels; Qwen2 has q/k/v biases."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=4, vocab_size=128,
                                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else None
    return model


@pytest.fixture
def tokens():
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))


def by_hand(model, tokens, layer):
    """The official param_first Taylor importance, written out unit by unit: |w * dL/dw| summed over every
    weight row / column of the coupled group (q, k, v rows and o columns of a key/value head's query heads;
    gate and up rows and the down column of a channel), from one loss on all samples."""
    model = copy.deepcopy(model).requires_grad_(True)
    model(input_ids=tokens, labels=tokens).loss.backward()
    a, f = model.model.layers[layer].self_attn, model.model.layers[layer].mlp
    s = {n: (m.weight * m.weight.grad).abs().detach() for n, m in
         {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj, "g": f.gate_proj, "u": f.up_proj,
          "d": f.down_proj}.items()}
    heads = []
    for h in range(4):
        kv, q = slice(4 * h, 4 * h + 4), slice(8 * h, 8 * h + 8)  # query heads 2h and 2h+1
        heads.append(float(s["k"][kv].sum() + s["v"][kv].sum() + s["q"][q].sum() + s["o"][:, q].sum()))
    channels = [float(s["g"][c].sum() + s["u"][c].sum() + s["d"][:, c].sum()) for c in range(64)]
    return heads, channels


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_llm_pruner_keeps_the_units_of_highest_taylor_importance(model_type, tokens):
    model = gqa_model(model_type)
    p = plan(model, tokens, n=0, ratio=0.5, protect_first=1, protect_last=1, batch_size=3)  # batches of 3 + 1
    assert sorted(p.heads) == [1, 2, 3, 4]  # layer 0 and the last one keep their width
    for layer in p.heads:
        heads, channels = by_hand(model, tokens, layer)
        top_heads = sorted(sorted(range(4), key=lambda h: -heads[h])[:2])  # (16 - int(16 * 0.5)) // 4 = 2 go
        top_channels = sorted(sorted(range(64), key=lambda c: -channels[c])[:32])
        assert p.heads[layer] == top_heads and p.channels[layer] == top_channels


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_narrowed_model_computes_the_dense_model_with_those_units_zeroed(model_type, tokens):
    model = gqa_model(model_type)
    p = plan(model, tokens, n=0, ratio=0.5, protect_first=1, protect_last=1)
    zeroed = copy.deepcopy(model)
    for layer, kept in p.heads.items():
        a, f = zeroed.model.layers[layer].self_attn, zeroed.model.layers[layer].mlp
        with torch.no_grad():
            for h in set(range(4)) - set(kept):
                for lin in (a.k_proj, a.v_proj):
                    lin.weight[4 * h: 4 * h + 4] = 0
                    if lin.bias is not None:
                        lin.bias[4 * h: 4 * h + 4] = 0
                a.o_proj.weight[:, 8 * h: 8 * h + 8] = 0
            for c in set(range(64)) - set(p.channels[layer]):
                f.gate_proj.weight[c] = 0
                f.up_proj.weight[c] = 0
    dense = model(tokens).logits
    with width_pruned(model, p):
        narrowed = model(tokens).logits
        assert model.model.layers[1].mlp.down_proj.weight.shape == (32, 32)
        assert model.model.layers[1].self_attn.q_proj.weight.shape == (16, 32)  # 2 kv heads x 2 query heads x 4
    torch.testing.assert_close(narrowed, zeroed(tokens).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(narrowed, dense, atol=1e-3)
    assert torch.equal(model(tokens).logits, dense)  # restored exactly


@pytest.mark.parametrize("n", [1, 2])
def test_ratio_from_n_is_the_largest_within_n_layers_of_parameters(n, tokens):
    model = gqa_model("llama")
    per_layer = sum(q.numel() for q in model.model.layers[0].parameters())
    p = plan(model, tokens, n=n, ratio=None, protect_first=1, protect_last=1)
    dense = count_parameters(model)
    with width_pruned(model, p):
        removed = dense - count_parameters(model)
    units = [unit_of(Layout(model), i) for i in p.heads]
    removed_at = lambda r: sum(h * u.head_params + c * u.channel_params  # noqa: E731
                               for u in units for h, c in [pruned_counts(u, r)])
    assert removed == removed_at(p.ratio)  # the unit accounting is the model's own parameter count
    assert 0 < removed <= n * per_layer and p.ratio == ratio_for(units, n * per_layer)
    step = p.ratio + 1e-4  # the next ratio tried removes more than the budget, or would empty a layer
    assert removed_at(step) > n * per_layer or any(pruned_counts(u, step)[1] >= u.channels for u in units)


def test_llm_pruner_runs_from_the_config_and_its_saved_model_reloads(tiny_dir, tmp_path, capsys):
    save = tmp_path / "narrow"
    cfg = cfg_for(tiny_dir, tmp_path, "prune=llm_pruner", "prune.n=1", "patch=none", "prune.protect_first=1",
                  "prune.protect_last=1", "prune.score_samples=3", "prune.score_seqlen=16", f"save_model={save}")
    rec = pipeline.run(cfg)
    assert rec["removed"] == [] and rec["metric"] == "llm_pruner"
    assert f"narrowed layers 1-4 by {rec['fitted']['width']['ratio']:.2%}" in capsys.readouterr().out
    layer_params = (rec["params_dense"] - rec["params_pruned"])
    assert 0 < layer_params and rec["fitted"]["width"]["ratio"] > 0
    assert sorted(rec["fitted"]["width"]["layers"]) == ["1", "2", "3", "4"]
    model, tokenizer, spec = load_pruned(save)
    assert count_parameters(model) == rec["params_pruned"] and spec.widths["1"]["channels"] < 48
    windows = RunData(cfg, tokenizer).eval_windows()[cfg["data"]["name"]]
    assert perplexity(model, windows, 2, progress=False) == pytest.approx(rec["ppl"]["pruned"], rel=1e-4)
    assert json.loads((save / "config.json").read_text())["model_type"].startswith("lp-patched-")  # stock loading refuses


def test_width_pruning_finds_the_projections_where_the_family_says(monkeypatch, tokens):
    """lp.width reads each layer's projections through Layout (``Family.projections``), never by LLaMA's names:
    a family that names the query map elsewhere is refused with that name, and the table's modules are the
    layer's own."""
    import dataclasses

    from lp import models

    model = gqa_model("llama")
    layer = model.model.layers[2]
    where = Layout(model).projections(2)
    assert where["q"] == (layer.self_attn, "q_proj") and where["down"] == (layer.mlp, "down_proj")
    other = dict(models.LAYOUTS["llama"].projections, q="self_attn.query")
    monkeypatch.setitem(models.LAYOUTS, "llama", dataclasses.replace(models.LAYOUTS["llama"],
                                                                      projections=tuple(other.items())))
    with pytest.raises(ValueError, match=r"lacks \['self_attn.query'\]"):
        plan(model, tokens, n=0, ratio=0.5, protect_first=1, protect_last=1)
