"""EvoPress (lp.evopress, prune=evopress): the search finds the brute-force optimum where every set can be
enumerated, is reproducible from its seed, keeps the official mutation and selection rules, and runs end to end."""
import random

import pytest
import torch

from lp import pipeline
from lp.calibration import collect_stats
from lp.modules import ChannelScale
from lp.evopress import KLFitness, Schedule, brute_force, draw_rows, search
from lp.pruning import pruned
from lp.selection import SelectionContext, select_layers
from tests.conftest import cfg_for, conf_settings, tiny_model

EXACT = dict(initial=2, offspring=4, survivors=(2, 1), max_mutations=3)  # every step on every token


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", layers=8)
    samples = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))
    return model, samples, KLFitness(model, samples, batch_size=2)


def test_search_finds_the_brute_force_optimum(setup):
    model, samples, fitness = setup
    n, t = samples.shape
    everything = [(i, t) for i in range(n)]
    for k in (2, 3):
        want, best = brute_force(fitness, 8, k, everything)
        got = search(fitness, 8, k, n, t, Schedule(initial_tokens=n * t, tokens=(n * t, n * t), **EXACT), seed=1)
        assert got.fitness == pytest.approx(best, rel=1e-5)
        assert got.removed == want
        assert got.history == sorted(got.history, reverse=True)  # elitist: the best never gets worse


def test_search_is_reproducible_from_its_seed(setup):
    _, samples, fitness = setup
    sched = Schedule(generations=4, initial=6, offspring=5, initial_tokens=16, tokens=(16, 32))
    a, b = (search(fitness, 8, 3, *samples.shape, sched, seed=7) for _ in range(2))
    assert (a.removed, a.history) == (b.removed, b.history)
    assert len(a.removed) == 3 and a.generations == 4


def test_default_generations_are_k_times_l_minus_k_over_1_5():
    assert Schedule().generations_for(12, 32) == 160  # the official script's Mistral-7B example
    assert Schedule(generations=3).generations_for(12, 32) == 3


def test_rows_are_distinct_samples_cut_to_the_budget():
    rows = draw_rows(random.Random(0), 5, 10, 33)
    assert sum(n for _, n in rows) == 33 and len({i for i, _ in rows}) == len(rows) == 4
    assert sorted(n for _, n in rows) == [3, 10, 10, 10]
    with pytest.raises(ValueError, match="asks for 60 tokens; the search samples hold 5 x 10 = 50"):
        draw_rows(random.Random(0), 5, 10, 60)


def test_offspring_are_one_to_three_swaps_away_and_never_a_parent(setup):
    """Each child keeps k layers, differs from its parent, and (whole-layer drops) by at most max_mutations swaps."""
    seen = []

    def record(removed, rows):
        seen.append(frozenset(removed))
        return float(sum(removed))  # the fewest and earliest layers: a known optimum {0, 1, 2}

    got = search(record, 8, 3, 4, 12, Schedule(generations=30, initial=3, offspring=4, initial_tokens=12,
                                                tokens=(12, 24)), seed=0)
    assert got.removed == [0, 1, 2] and all(len(s) == 3 for s in seen)


def test_prefix_states_give_the_fitness_of_the_whole_model(setup):
    """Candidates start from the dense state entering their first removed layer: the same KL as running every
    layer (a budget of 0 keeps no state), for every set."""
    model, samples, fitness = setup
    whole = KLFitness(model, samples, batch_size=2, budget=0)
    assert whole.stride == 8 and fitness.stride == 1
    rows = [(0, 12), (2, 7)]
    for removed in [(3, 4), (1, 6), (5, 7), (0, 2)]:
        assert fitness(removed, rows) == pytest.approx(whole(removed, rows), rel=1e-5, abs=1e-7)


def test_fitness_is_the_official_kl_and_top_k_approximates_it(setup):
    model, samples, fitness = setup
    removed, rows = (2, 3), [(1, 12)]
    with torch.no_grad():
        dense = model(samples[1:2]).logits[0, :-1].float()
        with pruned(model, list(removed), lambda s, e: None):
            out = model(samples[1:2]).logits[0, :-1].float()
    want = torch.nn.functional.kl_div(out.log_softmax(-1), dense.log_softmax(-1), log_target=True,
                                      reduction="batchmean").item()
    assert fitness(removed, rows) == pytest.approx(want, rel=2e-2)  # the dense log-probabilities kept in bf16
    top = KLFitness(model, samples, topk=128)  # the whole vocabulary as "top-k": the same divergence
    assert top(removed, rows) == pytest.approx(want, rel=2e-2)


def test_in_the_loop_the_fitness_is_the_patched_models(setup):
    model, samples, _ = setup
    calls = []

    def make_patch(s, e, scale=1.0):
        calls.append((s, e))
        return ChannelScale(torch.full((24,), scale))

    plain = KLFitness(model, samples)
    looped = KLFitness(model, samples, make_patch=make_patch)
    rows = [(0, 12)]
    assert looped((2, 3), rows) == pytest.approx(plain((2, 3), rows), rel=1e-6)  # an identity patch: no change
    looped((2, 3), rows)
    assert calls == [(2, 4)]  # each interface's patch built once
    doubled = KLFitness(model, samples, make_patch=lambda s, e: make_patch(s, e, 2.0))
    assert doubled((2, 3), rows) != pytest.approx(plain((2, 3), rows), rel=1e-3)  # the patch is in the loop


def test_the_metric_is_seeded_and_protects_nothing_it_should_not(setup):
    model, samples, _ = setup
    stats = collect_stats(model, samples, 2, progress=False)
    settings = conf_settings("prune", "evopress", generations=3, initial=4, offspring=3, initial_tokens=12,
                             tokens=[12, 24])
    picks = [select_layers("evopress", SelectionContext(stats, 3, model=model, samples=samples, settings=settings,
                                                        seed=s)) for s in (0, 0, 1)]
    assert picks[0] == picks[1] and all(len(p) == 3 and all(0 <= i < 8 for i in p) for p in picks)


def test_a_token_budget_beyond_the_samples_is_refused_before_the_weights_load(tiny_dir, tmp_path):
    cfg = cfg_for(tiny_dir, tmp_path, "prune=evopress", "prune.n=2", "prune.score_seqlen=null")  # 16 x 32 tokens
    with pytest.raises(ValueError, match=r"prune.initial_tokens asks for 2048 tokens.*= 512"):
        pipeline.validate(cfg)
    cfg = cfg_for(tiny_dir, tmp_path, "+experiment=evopress_cpu", "prune.n=2", "patch=lstsq", "prune.in_loop=true",
                  "prune.tokens=[64,256]")
    with pytest.raises(ValueError, match="prune.in_loop=true .* patch=lstsq is not one"):
        pipeline.validate(cfg)


def test_a_run_records_the_searched_layers_and_runs_after_the_search_share_it(tiny_dir, tmp_path, monkeypatch):
    from lp import evopress

    searches = []
    real = evopress.search
    monkeypatch.setattr(evopress, "search", lambda *a, **k: searches.append(1) or real(*a, **k))
    small = ["prune=evopress", "prune.n=2", "prune.generations=2", "prune.initial=4", "prune.offspring=3",
             "prune.score_samples=2", "prune.initial_tokens=32", "prune.tokens=[32,64]"]
    runs = [pipeline.run(cfg_for(tiny_dir, tmp_path, *small, *extra), workspace=pipeline.Workspace())
            for extra in (["patch=none"], ["patch=linearpatch"], ["patch=linearpatch", "prune.in_loop=true"])]
    plain, patched, looped = runs
    assert all(r["metric"] == "evopress" and len(r["removed"]) == 2 for r in runs)
    assert patched["removed"] == plain["removed"] and len(searches) == 2  # the patch came after the search: shared
    assert looped["config"]["prune"]["in_loop"] is True and plain["timings"]["selection"] > 0
    assert len(list((tmp_path / "cache" / "search").glob("*.json"))) == 2
