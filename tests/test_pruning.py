import pytest
import torch
from torch import nn

from lp.calibration import BoundaryStats, collect_stats
from lp.models import LAYOUTS, Layout
from lp.modules import LinearPatch, Patched
from lp.patches import PatchContext, build_patch
from lp.pruning import (interface_position, load_pruned, patches_of, prune_and_patch, pruned, remove_layers,
                        save_pruned)
from tests.conftest import conf_settings, tiny_model


def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _stats(L, d, abs_rot_s=None, abs_rot_e=None):
    z = torch.zeros
    return BoundaryStats(abs_mean=torch.rand(L + 1, d) + 0.5, abs_mean_rot=torch.rand(L + 1, d) + 0.5,
                         cos=z(L + 1, L + 1), angular=z(L + 1, L + 1), norm_mean=z(L + 1), tokens=1)


def test_linearpatch_is_identity_for_equal_statistics():
    stats = _stats(4, 24)
    stats.abs_mean_rot[3] = stats.abs_mean_rot[1]
    P = build_patch("linearpatch", stats, 1, 3).weight
    assert torch.allclose(P, torch.eye(24), atol=1e-5)


@pytest.mark.parametrize("basis", ["quarot", "paley"])
def test_linearpatch_scales_in_the_basis_of_its_statistics(basis):
    from lp.hadamard import hadamard
    from lp.patches import PatchContext

    stats = _stats(4, 24)
    stats.hadamard = basis
    P = build_patch("linearpatch", stats, 0, 2).weight
    H = hadamard(24, construction=basis)
    assert not torch.equal(H, hadamard(24, construction={"quarot": "paley", "paley": "quarot"}[basis]))
    r = stats.abs_mean_rot[2] / stats.abs_mean_rot[0]
    assert torch.allclose(H.T @ P @ H, torch.diag(r), atol=1e-5)  # P = H diag(r) H^T
    assert torch.allclose(P, P.T, atol=1e-6)
    other = "paley" if basis == "quarot" else "quarot"  # a patch in another basis than its statistics': refused
    with pytest.raises(ValueError, match=f"patch.hadamard={other}.*{basis}"):
        build_patch("linearpatch", PatchContext(stats, {"hadamard": other}), 0, 2)


def test_removing_zero_layers_changes_nothing(any_model, ids):
    before = logits(any_model, ids)
    stats = collect_stats(any_model, ids, progress=False)
    spec = prune_and_patch(any_model, [], lambda s, e: build_patch("linearpatch", stats, s, e))
    assert spec.removed == [] and spec.patches == {}
    assert torch.equal(logits(any_model, ids), before)


def _by_hand(model, ids, kept, P, at):
    """Run the kept dense layers one by one, multiplying the hidden state by P before dense layer ``at``."""
    lay = Layout(model)
    x = lay.base.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    pe = lay.base.rotary_emb(x, pos)
    for i in kept:
        if i == at:
            x = x @ P
        out = lay.layers[i](x, attention_mask=None, position_embeddings=pe, position_ids=pos)
        x = out[0] if isinstance(out, tuple) else out
    if at == len(lay.layers):
        x = x @ P
    return lay.head(lay.norm(x))


@pytest.mark.parametrize("removed", [[2, 3], [4, 5], [0, 1, 2]])
def test_pruned_patched_output_equals_hand_computation(llama, ids, removed):
    kept = [i for i in range(6) if i not in removed]
    e = removed[-1] + 1
    P = torch.randn(24, 24, generator=torch.Generator().manual_seed(0)) * 0.3 + torch.eye(24)
    expected = _by_hand(llama, ids, kept, P, e)
    spec = prune_and_patch(llama, removed, lambda s, e_: LinearPatch(P))
    assert spec.patches == {str(interface_position(removed, e)): "linearpatch"}
    assert len(Layout(llama).layers) == len(kept) == llama.config.num_hidden_layers
    torch.testing.assert_close(logits(llama, ids), expected, rtol=1e-4, atol=1e-4)


def test_every_interface_gets_its_own_patch(llama, ids):
    stats = collect_stats(llama, ids, progress=False)
    spec = prune_and_patch(llama, [1, 2, 4], lambda s, e: build_patch("diag", stats, s, e))
    # interfaces (1,3) and (4,5) -> pruned positions 1 and 2
    assert spec.patches == {"1": "diag", "2": "diag"}
    lay = Layout(llama)
    assert [isinstance(m, Patched) for m in lay.layers] == [False, True, True]
    assert torch.allclose(lay.layers[1].patch.weight, stats.abs_mean[3] / stats.abs_mean[1])
    assert torch.allclose(lay.layers[2].patch.weight, stats.abs_mean[5] / stats.abs_mean[4])


def test_pruned_context_restores_the_dense_model(any_model, ids):
    before = logits(any_model, ids)
    stats = collect_stats(any_model, ids, progress=False)
    with pruned(any_model, [2, 3], lambda s, e: build_patch("linearpatch", stats, s, e)):
        assert any_model.config.num_hidden_layers == 4
        assert not torch.allclose(logits(any_model, ids), before)
    assert any_model.config.num_hidden_layers == 6
    assert [m.self_attn.layer_idx for m in Layout(any_model).layers] == list(range(6))
    assert torch.equal(logits(any_model, ids), before)


def test_generation_with_kv_cache_matches_no_cache(any_model, ids):
    stats = collect_stats(any_model, ids, progress=False)
    prune_and_patch(any_model, [1, 2], lambda s, e: build_patch("linearpatch", stats, s, e))
    prompt = ids[:1, :5]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = any_model.generate(prompt, use_cache=True, **kw)
    plain = any_model.generate(prompt, use_cache=False, **kw)
    assert cached.shape[1] == 13
    assert torch.equal(cached, plain)


def test_save_load_round_trip(llama, ids, tmp_path):
    stats = collect_stats(llama, ids, progress=False)
    spec = prune_and_patch(llama, [3, 4, 5], lambda s, e: build_patch("linearpatch", stats, s, e))
    assert spec.patches == {"3": "linearpatch"}  # interface at the final norm
    expected = logits(llama, ids)
    save_pruned(llama, None, tmp_path, spec)
    model, tokenizer, spec2 = load_pruned(tmp_path)
    assert spec2.removed == spec.removed and spec2.patches == spec.patches and tokenizer is None
    assert spec2.precision == {"3": "model"} and Layout(model).norm.patch.precision == "model"
    assert model.config.num_hidden_layers == 3
    assert isinstance(Layout(model).norm, Patched)
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)
    # plain transformers would drop the patch: it must fail loudly, naming the way to load the folder (lp's, or
    # the folder's own modeling file)
    from transformers import AutoModelForCausalLM

    with pytest.raises(Exception, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "load_pruned" in (tmp_path / "config.json").read_text()


def test_damaged_spec_is_named(llama, ids, tmp_path):
    import json

    stats = collect_stats(llama, ids, progress=False)
    spec = prune_and_patch(llama, [3, 4], lambda s, e: build_patch("diag", stats, s, e))
    save_pruned(llama, None, tmp_path, spec)
    bad = json.loads((tmp_path / "lp_pruning.json").read_text())
    bad["patches"] = {"-1": "diag"}
    (tmp_path / "lp_pruning.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="does not fit the saved model"):
        load_pruned(tmp_path)


def test_bad_layer_indices_are_refused(llama):
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        remove_layers(llama, [6])


def _pairs(model, ids, s, e):
    from lp.patches import PatchContext

    return map(torch.cat, zip(*PatchContext(None, model=model, samples=ids).pairs(s, e)))


def test_lstsq_map_minimises_squared_error(llama, ids):
    from lp.patches import PatchContext

    stats = collect_stats(llama, ids, progress=False)
    M = build_patch("lstsq", PatchContext(stats, {"ridge": 0.0}, llama, ids), 1, 4).weight.double()
    xs, xe = (x.double() for x in _pairs(llama, ids, 1, 4))
    grad = xs.T @ (xs @ M - xe)  # d/dM of ||xs M - xe||^2 / 2
    assert grad.abs().max() < 1e-6 * (xs.T @ xe).abs().max()
    err = ((xs @ M - xe) ** 2).sum()
    assert err < ((xs - xe) ** 2).sum()  # beats no patch


def test_streamline_ffn_lowers_calibration_mse(llama, ids):
    from lp.patches import PatchContext

    stats = collect_stats(llama, ids, progress=False)
    ctx = PatchContext(stats, conf_settings("patch", "streamline_ffn", lr=3e-3, epochs=30, token_batch=8), llama, ids)
    net = build_patch("streamline_ffn", ctx, 2, 4)
    xs, xe = _pairs(llama, ids, 2, 4)
    before = torch.nn.functional.mse_loss(xs, xe)  # patch=none
    assert torch.nn.functional.mse_loss(net(xs), xe) < 0.7 * before
    assert sum(p.numel() for p in net.parameters()) > 0 and not any(p.requires_grad for p in net.parameters())


def test_streamline_layer_lowers_calibration_mse_and_takes_a_layer_slot(llama, ids):
    from lp.calibration import stream_block_io
    from lp.modules import ReplacementLayer
    from lp.patches import PatchContext

    stats = collect_stats(llama, ids, progress=False)
    ctx = PatchContext(stats, conf_settings("patch", "streamline_layer", lr=3e-3, epochs=30), llama, ids)
    net = build_patch("streamline_layer", ctx, 2, 4)
    (xs, kwargs, xe), *_ = stream_block_io(llama, ids, 2, 4, batch_size=len(ids))
    out = net(xs, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    before = torch.nn.functional.mse_loss(xs, xe)  # patch=none
    assert torch.nn.functional.mse_loss(out, xe) < 0.7 * before
    assert isinstance(net, ReplacementLayer) and not any(p.requires_grad for p in net.parameters())
    # removing [1, 2] and [4] with replacements: 6 - 3 + 2 layers, in the places of layers 1 and 4
    spec = prune_and_patch(llama, [1, 2, 4], lambda s, e: build_patch("streamline_layer", ctx, s, e))
    lay = Layout(llama)
    assert spec.replaced == [1, 4] and spec.patches == {"1": "streamline_layer", "3": "streamline_layer"}
    assert [isinstance(m, ReplacementLayer) for m in lay.layers] == [False, True, False, True, False]
    assert llama.config.num_hidden_layers == 5
    assert [m.self_attn.layer_idx for m in lay.layers] == list(range(5))  # own KV cache slot each
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(llama.generate(ids[:1, :5], use_cache=True, **kw),
                       llama.generate(ids[:1, :5], use_cache=False, **kw))


def test_patches_after_a_replacement_land_on_the_right_layer(llama, ids):
    from lp.modules import ChannelScale, ReplacementLayer

    layer = Layout(llama).layers[1]
    make = lambda s, e: ReplacementLayer(layer) if s == 1 else ChannelScale(torch.full((1,), 2.0))  # noqa: E731
    spec = prune_and_patch(llama, [1, 2, 4], make)
    # slots: 0, [replacement of 1-2], 3, 5 -> the patch of interface (4, 5) wraps dense layer 5 at position 3
    assert spec.patches == {"1": "streamline_layer", "3": "diag"}
    assert interface_position([1, 2, 4], 5, replaced=[1]) == 3


@pytest.mark.parametrize("variant", ["prunecomp", "lstsq", "streamline_ffn", "streamline_layer"])
def test_fitted_patches_save_and_reload(llama, ids, tmp_path, variant):
    from lp.patches import PatchContext

    stats = collect_stats(llama, ids, progress=False)
    ctx = PatchContext(stats, conf_settings("patch", variant, epochs=1), llama, ids, fitted={"prunecomp": {2: 1.25, 3: 0.9}})
    spec = prune_and_patch(llama, [2, 3], lambda s, e: build_patch(variant, ctx, s, e))
    module_kind = {"lstsq": "linearpatch", "prunecomp": "diag"}.get(variant, variant)  # the module that holds it
    assert spec.patches == {"2": module_kind}
    expected = logits(llama, ids)
    save_pruned(llama, None, tmp_path, spec, fold=False)
    model, _, spec2 = load_pruned(tmp_path)
    assert spec2.patches == spec.patches
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("removed", [[1, 2, 4], [4, 5]])
def test_prunecomp_folds_into_the_saved_weights(llama, ids, tmp_path, removed):
    from transformers import AutoModelForCausalLM

    ctx = PatchContext(None, fitted={"prunecomp": {1: 1.25, 2: 0.9, 4: 1.1, 5: 1.3}})  # Prune&Comp's scalars
    spec = prune_and_patch(llama, removed, lambda s, e: build_patch("prunecomp", ctx, s, e))
    expected = logits(llama, ids)
    save_pruned(llama, None, tmp_path, spec)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # no lp: a plain model
    torch.testing.assert_close(logits(plain, ids), expected, rtol=1e-4, atol=1e-4)
    model, _, spec2 = load_pruned(tmp_path)
    scalars = {pos: p.weight.item() for pos, p in patches_of(llama).items()}
    assert spec2.patches == {} and {int(k): v for k, v in spec2.folded.items()} == pytest.approx(scalars)


def test_scalar_patches_stay_patches_where_folding_is_not_exact(ids, tmp_path):
    stats_model = tiny_model("gemma2")  # a norm follows each branch: dividing the branch output is undone
    ctx = PatchContext(None, fitted={"prunecomp": {2: 1.25, 3: 0.9}})
    spec = prune_and_patch(stats_model, [2, 3], lambda s, e: build_patch("prunecomp", ctx, s, e))
    expected = logits(stats_model, ids)
    save_pruned(stats_model, None, tmp_path, spec)
    model, _, spec2 = load_pruned(tmp_path)
    assert spec2.folded == {} and spec2.patches == {"2": "diag"}
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)


def test_split_offloaded_model_gives_the_same_patched_outputs(ids, tmp_path):
    """accelerate's CPU + disk offload stands in for a multi-GPU device map here."""
    from accelerate import dispatch_model

    stats = collect_stats(tiny_model(), ids, progress=False)
    make = lambda s, e: build_patch("linearpatch", stats, s, e)  # noqa: E731
    plain = tiny_model()
    prune_and_patch(plain, [2, 3], make)
    expected = logits(plain, ids)

    split = tiny_model()
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "cpu", "model.layers.2": "disk", "model.layers.3": "disk",
                  "model.layers.4": "disk", "model.layers.5": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    split = dispatch_model(split, device_map=device_map, offload_dir=str(tmp_path), main_device="cpu")
    assert Layout(split).layers[4].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    prune_and_patch(split, [2, 3], make)
    patched = Layout(split).layers[2]
    assert isinstance(patched, Patched) and patched.patch.weight.device.type == "cpu"
    torch.testing.assert_close(logits(split, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(t for t, f in LAYOUTS.items() if f.prefix_reuse))
@pytest.mark.parametrize("removed", [[2, 3], [3, 5]])
def test_prefix_reuse_matches_the_plain_path(ids, model_type, removed):
    from lp.evaluation import Prefix, perplexity

    model = tiny_model(model_type)
    stats = collect_stats(model, ids, progress=False)
    prefix = Prefix.compute(model, ids, layer=min(removed), batch_size=1)
    with pruned(model, removed, lambda s, e: build_patch("linearpatch", stats, s, e)):
        plain = perplexity(model, ids, batch_size=1, progress=False)
        reused = perplexity(model, ids, batch_size=1, progress=False, prefix=prefix)
        logits_reused = prefix.forward(model, 0, 2)
        torch.testing.assert_close(logits_reused, logits(model, ids), rtol=1e-5, atol=1e-5)
    assert reused == pytest.approx(plain, rel=1e-6)
    assert model.config.num_hidden_layers == 6 and len(Layout(model).layers) == 6


def test_prefix_reuse_refuses_unsupported_models(ids):
    from lp.evaluation import Prefix, prefix_reuse_applies

    gemma = tiny_model("gemma")  # its embeddings are scaled by sqrt(d) inside the model
    assert not prefix_reuse_applies(gemma)
    with pytest.raises(ValueError, match="prefix reuse does not apply to Gemma"):
        Prefix.compute(gemma, ids, layer=1)


def test_a_layer_of_another_output_shape_is_a_clear_error_not_a_silent_fallback(ids):
    from lp.evaluation import Prefix

    model = tiny_model("llama")
    layer = Layout(model).layers[0]
    real = layer.forward
    layer.forward = lambda *a, **k: {"hidden_states": real(*a, **k)}  # a family whose layers return a dict
    with pytest.raises(ValueError, match="returned dict, neither a tensor nor a tuple .* eval.prefix_reuse=false"):
        Prefix.compute(model, ids, layer=2)


def test_every_family_names_modules_its_layers_have(any_model):
    """The family traits are real module paths of that family's decoder layers (what folds, hooks, the FFN
    replacement and the restore of a pruned model reach for)."""
    from lp.modules import unwrap

    layout = Layout(any_model)
    layer = unwrap(layout.layers[0])
    assert all(isinstance(getattr(owner, name), nn.Linear) for owner, name in layout.branch_ends(layer))
    adds = layout.stream_additions(layer)
    assert len(adds) == 2 and all(m in dict(layer.named_modules()).values() for m in adds)
    if layout.family.post_branch_norms:  # Gemma 2/3, OLMo 2: the norms, not the linear maps, join the stream
        assert not any(isinstance(m, nn.Linear) for m in adds)
        with pytest.raises(ValueError, match="does not fit them; valid for .*'llama'"):
            layout.mlp_branch(layer)
    else:
        norm, mlp = layout.mlp_branch(layer)
        assert norm is getattr(layer, layout.family.mlp_norm) and mlp is layer.mlp


def test_patch_precision_model_computes_in_the_hidden_dtype(ids):
    from lp.modules import LinearPatch
    from lp.patches import PatchContext

    P = torch.randn(24, 24, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    exact = (x.float() @ P).to(torch.bfloat16)
    assert torch.equal(LinearPatch(P, precision="float32")(x), exact)
    cheap = LinearPatch(P)(x)  # the default: the hidden states' dtype
    assert torch.equal(cheap, x @ P.to(torch.bfloat16)) and cheap.dtype == torch.bfloat16
    torch.testing.assert_close(cheap.float(), exact.float(), rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match=r"patch.precision='fp8' is not one of \['float32', 'model'\]"):
        LinearPatch(P, precision="fp8")
    stats = _stats(4, 24)
    assert build_patch("linearpatch", PatchContext(stats, {"precision": "float32"}), 1, 3).precision == "float32"


@pytest.mark.parametrize("model_type,kind", [("llama", "linearpatch"), ("qwen2", "diag"), ("gemma3_text", "linearpatch")])
def test_a_patched_folder_loads_with_stock_transformers_and_no_lp(tmp_path, model_type, kind):
    """save_model of a patched model: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True), in a
    process where lp cannot be imported, gives lp's pruned model's logits (float32, 1e-5)."""
    import subprocess
    import sys

    from lp.modules import ChannelScale, LinearPatch
    from tests.conftest import tiny_model

    model = tiny_model(model_type)
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(3)
    make = (lambda: LinearPatch(torch.eye(d) + 0.1 * torch.randn(d, d, generator=g))) if kind == "linearpatch" else \
        (lambda: ChannelScale(1 + torch.rand(d, generator=g)))
    x = torch.randint(0, 128, (2, 10), generator=g)
    out = tmp_path / "saved"
    with pruned(model, [1, 2, 4], lambda s, e: make()) as spec:
        want = model(input_ids=x).logits
        save_pruned(model, None, out, spec)
    torch.save({"x": x, "want": want}, tmp_path / "io.pt")
    code = f"""
import sys
sys.modules["lp"] = None  # lp cannot be imported here
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32).eval()
io = torch.load({str(tmp_path / "io.pt")!r})
with torch.no_grad():
    got = m(input_ids=io["x"]).logits
print("maxdiff", (got - io["want"]).abs().max().item(), type(m).__name__)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    diff = float(res.stdout.split("maxdiff")[1].split()[0])
    assert diff < 1e-5 and "LPPatchedForCausalLM" in res.stdout
    assert load_pruned(out)[0] is not None  # lp's own loader still reads the folder
