"""prune=patched, lp's own selection: the block that the patched model keeps closest to the dense one."""
import logging

import pytest
import torch

from lp.calibration import collect_stats
from lp.data import calibration_samples, held_out_samples
from lp.models import Layout
from lp.patches import build_patch
from lp.pruning import pruned
from lp.selection import SelectionContext, patched_scores, select_layers
from tests.conftest import conf_settings, tiny_model


class ChannelScaleLayer(torch.nn.Module):
    """A decoder layer whose output is its input scaled per channel: a diagonal patch undoes its removal."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.scale = scale

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states * self.scale


def scaled_copy_model():
    """Layer 4 maps x to x * v (v spread over [0.2, 5]): cosine of its input and output well below 1. Layer 1
    writes small updates (cosine near 1) that no per-channel scale undoes."""
    model = tiny_model("llama", layers=6)
    lay = Layout(model)
    with torch.no_grad():
        lay.layers[1].self_attn.o_proj.weight.mul_(0.1)
        lay.layers[1].mlp.down_proj.weight.mul_(0.1)
    v = torch.logspace(-0.7, 0.7, 24)[torch.randperm(24, generator=torch.Generator().manual_seed(0))]
    lay.layers[4] = ChannelScaleLayer(v)
    return model


def ctx_for(model, stats, samples, variant="diag", **settings):
    return SelectionContext(stats=stats, n=1, model=model, samples=samples, batch_size=2,
                            settings=conf_settings("prune", "patched", **settings),
                            make_patch=lambda s, e: build_patch(variant, stats, s, e))


def test_patched_picks_the_block_the_patch_repairs_where_cosine_picks_another():
    model = scaled_copy_model()
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    held = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    stats = collect_stats(model, calib, progress=False)
    assert select_layers("cosine", SelectionContext(stats=stats, n=1, settings=conf_settings("prune", "cosine"))) == [1]
    ctx = ctx_for(model, stats, held)
    assert select_layers("patched", ctx) == [4]
    assert ctx.scores[4] == pytest.approx(0, abs=1e-6) and min(v for s, v in ctx.scores.items() if s != 4) > 1e-3
    # score=ppl: the repaired block leaves the dense model's perplexity (random tokens: any block may beat it)
    from lp.evaluation import perplexity

    ppl = patched_scores(ctx_for(model, stats, held, score="ppl"))
    assert ppl[4] == pytest.approx(perplexity(model, held, progress=False), rel=1e-5)


@pytest.mark.parametrize("score", ["kl", "ppl"])
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])  # prefix reuse, and the plain path
def test_each_score_equals_a_by_hand_pruned_and_patched_forward(score, model_type):
    model = tiny_model(model_type, layers=5)
    calib = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(1))
    held = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(2))
    stats = collect_stats(model, calib, progress=False)
    ctx = SelectionContext(stats=stats, n=2, model=model, samples=held, batch_size=2,
                           settings={"score": score, "topk": 7},
                           make_patch=lambda s, e: build_patch("linearpatch", stats, s, e))
    got = patched_scores(ctx)
    assert sorted(got) == [0, 1, 2, 3]
    with torch.no_grad():
        dense = model(input_ids=held).logits[:, :-1].float()
        for s, value in got.items():
            with pruned(model, [s, s + 1], lambda a, b: build_patch("linearpatch", stats, a, b)):
                out = model(input_ids=held).logits[:, :-1].float()
            if score == "kl":
                top = dense.topk(7, dim=-1)
                p = top.values.softmax(-1)
                log_q = out.gather(-1, top.indices).log_softmax(-1)
                want = (p * (p.log() - log_q)).sum(-1).mean().item()
            else:
                nll = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), held[:, 1:].reshape(-1))
                want = nll.exp().item()
            assert value == pytest.approx(want, rel=1e-4, abs=1e-6), s


def test_held_out_windows_never_share_a_token_with_the_statistics_windows():
    stream = torch.arange(20_000)  # every token its own position
    calib = calibration_samples(stream, 40, 128, seed=0, bos=7)
    held = held_out_samples(stream, 16, 128, seed=2, exclude=(40, 128, 0), bos=7)
    assert held.shape == (16, 128) and (held[:, 0] == 7).all()
    seen = set(calib[:, 1:].flatten().tolist())
    assert not seen & set(held[:, 1:].flatten().tolist())
    assert len(set(held[:, 1:].flatten().tolist())) == 16 * 127  # nor with each other
    with pytest.raises(ValueError, match="no room"):
        held_out_samples(torch.arange(3000), 16, 128, seed=2, exclude=(20, 128, 0))


def test_non_finite_candidates_are_skipped_and_named(caplog):
    stats = collect_stats(tiny_model("llama", layers=4), torch.randint(0, 128, (2, 16)), progress=False)
    ctx = SelectionContext(stats=stats, n=1, scores={0: float("nan"), 1: 2.0, 2: 1.5, 3: float("inf")})
    with caplog.at_level(logging.WARNING):
        assert select_layers("patched", ctx) == [2]
    assert "[0, 3]" in caplog.text
    with pytest.raises(ValueError, match="every candidate block"):
        select_layers("patched", SelectionContext(stats=stats, n=1, scores={0: float("nan"), 1: float("inf")}))
