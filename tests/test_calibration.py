import math

import pytest

import torch

from lp.calibration import collect_stats
from lp.hadamard import hadamard
from lp.pruning import interfaces
from lp.selection import SelectionContext, block_influence_scores, select_layers
from tests.conftest import conf_settings


def direct_boundaries(model, ids):
    """Hidden states entering each layer and the final norm, from output_hidden_states (all but the last)
    plus a hook on the norm: the reference for what collect_stats streams."""
    seen = {}
    h = model.model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    h.remove()
    return [x.reshape(-1, x.shape[-1]) for x in out.hidden_states[:-1]] + [seen["x"].reshape(-1, seen["x"].shape[-1])]


@pytest.mark.parametrize("token_chunk", [512, 5])  # the whole window at once, or uneven chunks of it
def test_stats_match_direct_computation(llama, ids, token_chunk):
    xs = direct_boundaries(llama, ids)
    stats = collect_stats(llama, ids, batch_size=1, progress=False, token_chunk=token_chunk)  # two batches
    L = len(xs) - 1
    assert stats.num_layers == L == 6 and stats.tokens == ids.numel()
    assert stats.hadamard == "quarot"  # the official code's basis by default
    H = hadamard(24, construction="quarot")
    for i in range(L + 1):
        torch.testing.assert_close(stats.abs_mean[i], xs[i].abs().mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats.abs_mean_rot[i], (xs[i] @ H).abs().mean(0), rtol=1e-4, atol=1e-6)
        normed = llama.model.norm(xs[L])  # HF's last hidden state
        c = torch.nn.functional.cosine_similarity(xs[i], normed, dim=-1)
        assert math.isclose(stats.cos_normed[i].item(), c.mean().item(), abs_tol=1e-5)
        for j in range(L + 1):
            c = torch.nn.functional.cosine_similarity(xs[i], xs[j], dim=-1)
            assert math.isclose(stats.cos[i, j].item(), c.mean().item(), abs_tol=1e-5)
            ang = torch.arccos(c.clamp(-1, 1)) / math.pi
            assert math.isclose(stats.angular[i, j].item(), ang.mean().item(), abs_tol=1e-4)
            seq = [torch.nn.functional.cosine_similarity(a, b, dim=0).mean()  # along the sequence, per sample
                   for a, b in zip(xs[i].view(len(ids), -1, 24), xs[j].view(len(ids), -1, 24))]
            assert math.isclose(stats.cos_seq[i, j].item(), torch.stack(seq).mean().item(), abs_tol=1e-5)


def test_metrics_agree_with_direct_definitions(llama, ids):
    xs = direct_boundaries(llama, ids)
    stats = collect_stats(llama, ids, progress=False)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()
    n = 2
    best = max(range(0, 7 - n), key=lambda s: cos(xs[s], xs[s + n]))
    assert select_layers("cosine", SelectionContext(stats, n, settings=conf_settings("prune", "cosine"))) == [best, best + 1]
    ang = lambda a, b: (torch.arccos(torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)) / math.pi).mean().item()
    best = min(range(0, 7 - n), key=lambda s: ang(xs[s], xs[s + n]))
    assert select_layers("angular", SelectionContext(stats, n, settings={"token": "all"})) == [best, best + 1]
    bi = [1 - cos(xs[i], xs[i + 1]) for i in range(6)]
    torch.testing.assert_close(block_influence_scores(stats), torch.tensor(bi), atol=1e-5, rtol=0)
    assert select_layers("block_influence", SelectionContext(stats, 3)) == sorted(sorted(range(6), key=bi.__getitem__)[:3])


def test_selection_controls_and_errors(llama, ids):
    import pytest

    stats = collect_stats(llama, ids, progress=False)
    assert select_layers("cosine", SelectionContext(stats, 2, start=1, settings=conf_settings("prune", "cosine"))) == [1, 2]
    assert select_layers("last", SelectionContext(stats, 2)) == [4, 5]
    assert select_layers("manual", SelectionContext(stats, 2, indices=[5, 0])) == [0, 5]
    draws = [select_layers("random", SelectionContext(stats, 3, seed=seed)) for seed in range(200)]
    assert draws[7] == select_layers("random", SelectionContext(stats, 3, seed=7))  # seeded
    assert all(d == sorted(set(d)) and len(d) == 3 and 0 <= d[0] and d[-1] < 6 for d in draws)
    counts = torch.bincount(torch.tensor(draws).flatten(), minlength=6)
    assert len({tuple(d) for d in draws}) == 20 and counts.min() > 70  # every 3 of 6 drawn; each layer about 100 times
    assert select_layers("cosine", SelectionContext(stats, 0, settings=conf_settings("prune", "cosine"))) == []
    for n in (6, -1):
        with pytest.raises(ValueError, match=r"prune.n=.*\[0, 5\]"):
            select_layers("cosine", SelectionContext(stats, n, settings=conf_settings("prune", "cosine")))
    with pytest.raises(ValueError, match="prune.start=5"):
        select_layers("cosine", SelectionContext(stats, 2, start=5, settings=conf_settings("prune", "cosine")))
    with pytest.raises(ValueError, match="prune.metric='nope'"):
        select_layers("nope", SelectionContext(stats, 2))


def test_interfaces_group_contiguous_runs():
    assert interfaces([]) == []
    assert interfaces([3, 1, 2, 7]) == [(1, 4), (7, 8)]


def _ppl_without(model, samples, removed):
    from lp.evaluation import perplexity
    from lp.pruning import pruned

    with pruned(model, removed, lambda s, e: None):
        return perplexity(model, samples, progress=False)


def test_sleb_is_greedy_and_stops_at_n(llama, ids):
    from lp.selection import sleb_steps

    stats = collect_stats(llama, ids, progress=False)
    ctx = SelectionContext(stats, 3, model=llama, samples=ids, settings=conf_settings("prune", "sleb"))
    steps = sleb_steps(ctx)
    assert len(steps) == 3
    removed = []
    for layer, ppl in steps:  # each step is the best single addition to what is already removed, never the
        alive = [i for i in range(6) if i not in removed]  # first or the last remaining block (SLEB's barriers)
        best = min(alive[1:-1], key=lambda i: _ppl_without(llama, ids, removed + [i]))
        assert layer == best
        removed.append(layer)
        assert math.isclose(ppl, _ppl_without(llama, ids, removed), rel_tol=1e-6)
    assert select_layers("sleb", ctx) == sorted(removed)


def test_ppl_and_taylor_metrics(llama, ids):
    from lp.selection import taylor_scores

    stats = collect_stats(llama, ids, progress=False)
    ctx = SelectionContext(stats, 2, model=llama, samples=ids, batch_size=len(ids), settings=conf_settings("prune", "ppl", protect_ends=False))
    single = [_ppl_without(llama, ids, [i]) for i in range(6)]
    assert select_layers("ppl", ctx) == sorted(sorted(range(6), key=single.__getitem__)[:2])
    scores = taylor_scores(ctx)
    # direct first-order importance of layer 0
    llama.requires_grad_(True)
    llama(input_ids=ids, labels=ids).loss.backward()
    direct = sum((p * p.grad).abs().sum().item() for name, p in llama.model.layers[0].named_parameters()
                 if name.endswith("weight"))
    assert math.isclose(scores[0].item(), direct, rel_tol=1e-4)
    assert select_layers("taylor", ctx) == sorted(torch.argsort(scores)[:2].tolist())
    import pytest

    with pytest.raises(ValueError, match="prune.metric='sleb' scores layers by running the model"):
        select_layers("sleb", SelectionContext(stats, 2))


def test_last_token_angular_distance_and_official_linearpatch_cosine(ids):
    from tests.conftest import tiny_model

    model = tiny_model("llama", layers=8)
    seen = {}
    h = model.model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    xs = list(model(input_ids=ids, output_hidden_states=True).hidden_states[:-1]) + [seen["x"]]  # boundaries 0..8
    h.remove()
    stats = collect_stats(model, ids, batch_size=1, progress=False)
    n, L = 3, 8
    # Gromov et al.: the angular distance of the last token of each sample only
    last = lambda a, b: (torch.arccos(torch.nn.functional.cosine_similarity(a[:, -1], b[:, -1], dim=-1).clamp(-1, 1)) / math.pi).mean().item()
    best = min(range(0, L - n + 1), key=lambda s: last(xs[s], xs[s + n]))
    assert select_layers("angular", SelectionContext(stats, n, settings=conf_settings("prune", "angular"))) == list(range(best, best + n))
    # official LinearPatch: torch.cosine_similarity on (1, T, d) per sample (dim=1: along the sequence), mean
    seq = lambda a, b: torch.stack([torch.cosine_similarity(a[i:i + 1], b[i:i + 1]).mean() for i in range(len(a))]).mean()
    torch.testing.assert_close(stats.cos_seq[1, 4], seq(xs[1], xs[4]), atol=1e-5, rtol=0)
    best = max(range(1, L - n), key=lambda s: seq(xs[s], xs[s + n]).item())  # layer_select.py: range(1, max_start)
    assert select_layers("cosine", SelectionContext(stats, n, settings={"similarity": "linearpatch"})) == list(range(best, best + n))


def test_shortened_llama_plus_rule_never_removes_blocks_0_to_3_or_the_last_two(ids):
    import pytest

    from tests.conftest import tiny_model

    model = tiny_model("llama", layers=10)
    stats = collect_stats(model, ids, progress=False)
    for metric in ("taylor", "ppl"):
        ctx = SelectionContext(stats, 4, model=model, samples=ids, batch_size=len(ids), settings=conf_settings("prune", metric))
        chosen = select_layers(metric, ctx)
        assert chosen == [4, 5, 6, 7]  # the only 4 layers the rule leaves removable
        with pytest.raises(ValueError, match="protect_ends"):
            select_layers(metric, SelectionContext(stats, 5, model=model, samples=ids, batch_size=len(ids),
                                                   settings=conf_settings("prune", metric)))
    ctx = SelectionContext(stats, 2, model=model, samples=ids, batch_size=len(ids), settings=conf_settings("prune", "taylor"))
    from lp.selection import taylor_scores
    scores = taylor_scores(ctx)
    allowed = [i for i in torch.argsort(scores, stable=True).tolist() if i in range(4, 8)]
    assert select_layers("taylor", ctx) == sorted(allowed[:2])
