"""The rules that define Prune&Comp, ReplaceMe and LLM-Streamline, checked against by-hand versions of their official code."""
import copy

import pytest
import torch

from lp.calibration import collect_stats
from lp.models import Layout, count_parameters
from lp.patches import PatchContext, build_patch
from lp.pruning import load_pruned, patches_of, pruned, save_pruned
from lp.selection import SelectionContext, select_layers
from tests.conftest import conf_settings, tiny_model


def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _layer_io(model, ids):
    """Per decoder layer, (input, output) of its forward, as hooks on the layers see them."""
    got = {}
    layers = Layout(model).layers
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, (a[0], o[0] if isinstance(o, tuple) else o)))
             for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return [got[i] for i in range(len(layers))]


def official_prunecomp(model, ids, n, order=None):
    """Prune&Comp as CosSim_BI.py does it, on a copy: per round, Block Influence of every layer of the current
    model, remove the lowest, scale = channel mean of the per-sample channel ratio of the inputs of layers
    i+1 and i, folded into the embeddings and the o_proj / down_proj of every layer before i."""
    m = copy.deepcopy(model)
    kept, scales = list(range(Layout(m).num_layers)), {}
    for _ in range(n):
        io = _layer_io(m, ids)
        bi = [1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).mean().item() for x, y in io]
        i = min(range(len(bi)), key=bi.__getitem__) if order is None else order[len(scales)]
        nxt = io[i + 1][0] if i + 1 < len(io) else io[i][1]
        scale = (nxt.abs().mean(1) / io[i][0].abs().mean(1)).mean(0).mean().item()
        lay = Layout(m)
        lay.layers = torch.nn.ModuleList([layer for j, layer in enumerate(lay.layers) if j != i])
        with torch.no_grad():
            lay.base.embed_tokens.weight *= scale
            for layer in list(lay.layers)[:i]:
                layer.self_attn.o_proj.weight *= scale
                layer.mlp.down_proj.weight *= scale
        for j, layer in enumerate(lay.layers):
            layer.self_attn.layer_idx = j
        m.config.num_hidden_layers = len(lay.layers)
        scales[kept.pop(i)] = scale
    return m, scales


@pytest.mark.parametrize("order", [None, [2, 3, 3]])  # Block Influence's choice; or dense layers 2, 4, 5 in turn
def test_prunecomp_is_iterative_and_equals_the_official_fold(ids, tmp_path, order):
    from transformers import AutoModelForCausalLM

    from lp import prunecomp

    model = tiny_model("llama", layers=8)
    bi = lambda m, st: select_layers("block_influence", SelectionContext(stats=st, n=1))[0]  # noqa: E731
    removed, scales = prunecomp.select(model, ids, 3, bi if order is None else lambda m, st: order[3 - len(
        Layout(m).layers) + 5])
    reference, expected_scales = official_prunecomp(model, ids, 3, order)
    # the same layers in the same order, each round's scalar measured on the pruned, compensated model
    assert list(scales) == list(expected_scales) and scales == pytest.approx(expected_scales, rel=1e-4)
    if order:  # layer 4's scalar is measured on the model without layer 2: not the dense model's ratio
        assert removed == [2, 4, 5] and abs(prunecomp.channel_ratio(model, ids, 4) - scales[4]) > 1e-3
    ctx = PatchContext(None, fitted={"prunecomp": scales})
    with pruned(model, removed, lambda s, e: build_patch("prunecomp", ctx, s, e)) as spec:
        got = logits(model, ids)
        torch.testing.assert_close(got, logits(reference, ids), rtol=1e-3, atol=1e-3)
        save_pruned(model, None, tmp_path, spec)  # folded: a plain model
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), got, rtol=1e-4, atol=1e-4)


def test_prunecomp_without_its_rounds_is_refused(llama, ids):
    stats = collect_stats(llama, ids, progress=False)
    with pytest.raises(ValueError, match="lp.prunecomp"):
        build_patch("prunecomp", stats, 1, 3)


def test_replaceme_adds_no_parameter_and_folds_its_least_squares_map(llama, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    s, e = 2, 4
    dense = logits(llama, ids)
    # the estimator by hand: M = mlp output of layer s-1, target = x_e - (x_s - M)
    io, mlp_out = _layer_io(llama, ids), {}
    hook = Layout(llama).layers[s - 1].mlp.register_forward_hook(lambda m, a, o: mlp_out.__setitem__("M", o))
    with torch.no_grad():
        llama(input_ids=ids, use_cache=False)
    hook.remove()
    d = io[0][0].shape[-1]
    M = mlp_out["M"].reshape(-1, d).double()
    target = io[e][0].reshape(-1, d).double() - io[s][0].reshape(-1, d).double() + M
    T = torch.linalg.lstsq(M, target).solution
    ctx = PatchContext(collect_stats(llama, ids, progress=False), {"ridge": 0.0}, llama, ids)
    plain = count_parameters(llama) - sum(count_parameters(layer) for layer in list(Layout(llama).layers)[s:e])
    with pruned(llama, list(range(s, e)), lambda a, b: build_patch("replaceme", ctx, a, b)) as spec:
        assert count_parameters(llama) == plain and patches_of(llama) == {} and spec.maps == {str(s - 1): "replaceme"}
        got = logits(llama, ids)
        save_pruned(llama, None, tmp_path, spec)
    # the same pruned model with the map applied by a hook on layer s-1's MLP output
    with pruned(llama, list(range(s, e)), lambda *_: None):
        hook = Layout(llama).layers[s - 1].mlp.register_forward_hook(lambda m, a, o: (o.double() @ T).float())
        by_hand = logits(llama, ids)
        hook.remove()
    torch.testing.assert_close(got, by_hand, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(llama, ids), dense, rtol=0, atol=0)  # the dense model is back
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), got, rtol=1e-5, atol=1e-5)
    model, _, spec2 = load_pruned(tmp_path)
    assert spec2.maps == {str(s - 1): "replaceme"}
    torch.testing.assert_close(logits(model, ids), got, rtol=1e-5, atol=1e-5)


def test_replaceme_needs_a_layer_before_the_block_and_an_unnormed_mlp(llama, ids):
    ctx = PatchContext(collect_stats(llama, ids, progress=False), {}, llama, ids)
    with pytest.raises(ValueError, match="layer 0"):
        build_patch("replaceme", ctx, 0, 2)
    gemma = tiny_model("gemma2")
    with pytest.raises(ValueError, match="down_proj"):
        build_patch("replaceme", PatchContext(collect_stats(gemma, ids, progress=False), {}, gemma, ids), 2, 4)


def official_streamline(model, ids, n):
    """LLM-Streamline's official rule, by hand: get_cosine.py (lines 44-60) scores every start j by the mean
    over samples of trace(0.5 + 0.5 cos(h_j, h_{j+k})) / T, the token-wise cosine of HF's hidden_states j and
    j+k, with k = n + 1 (train_mseloss.py line 120); layer j is replaced by a copy of itself and layers
    j+1 .. j+n are dropped (train_mseloss.py lines 16-17, train_lightweightnetwork.py lines 147-179)."""
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    k, L = n + 1, len(hs) - 1
    score = []
    for j in range(L - k + 1):
        per_sample = []
        for v1, v2 in zip(hs[j], hs[j + k]):
            cos = (v1 @ v2.T) / (v1.norm(dim=1)[:, None] * v2.norm(dim=1))
            per_sample.append(((0.5 + 0.5 * cos).trace() / cos.shape[0]).item())
        score.append(sum(per_sample) / len(per_sample))
    j = max(range(len(score)), key=score.__getitem__)
    reference = copy.deepcopy(model)
    lay = Layout(reference)
    lay.layers = torch.nn.ModuleList([layer for i, layer in enumerate(lay.layers) if not j < i <= j + n])
    for i, layer in enumerate(lay.layers):
        layer.self_attn.layer_idx = i
    reference.config.num_hidden_layers = len(lay.layers)
    return j, k, L, reference


@pytest.mark.parametrize("seed, n", [(0, 2), (1, 3)])  # the official block: inside the model; the last one
def test_streamline_layer_is_the_official_block_and_initialisation(ids, seed, n, caplog):
    import dataclasses

    model = tiny_model("llama", layers=8)
    with torch.no_grad():  # a final norm that weighs channels, as trained ones do: the normed output differs
        model.model.norm.weight.copy_(torch.rand(24, generator=torch.Generator().manual_seed(seed)) * 2)
    j, k, L, reference = official_streamline(model, ids, n)
    stats = collect_stats(model, ids, progress=False)
    removed = select_layers("cosine", SelectionContext(stats, n + 1, settings=conf_settings("prune", "cosine")))  # what the pipeline asks for this patch
    assert removed == list(range(j, j + k)) and (j + k == L) == (seed == 1)
    if j + k < L:  # scored against the norm's input (statistics of an older lp), the last block would win
        older = select_layers("cosine", SelectionContext(dataclasses.replace(stats, cos_normed=None), n + 1, settings=conf_settings("prune", "cosine")))
        assert older == list(range(L - k, L)) != removed and "without cos_normed" in caplog.text
    ctx = PatchContext(stats, conf_settings("patch", "streamline_layer", epochs=0), model=model, samples=ids, batch_size=2)  # untrained: its initialisation
    with pruned(model, removed, lambda s, e: build_patch("streamline_layer", ctx, s, e)):
        torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
