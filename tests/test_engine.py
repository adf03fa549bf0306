"""lp's loglikelihood engine (lp.engine) against a plain full forward per request and against lm-eval's HFLM."""
import random

import pytest
import torch

from tests.conftest import tiny_config
from lp.engine import (PackedLM, PrefixStates, attention_kernel, attention_mask, group_requests, layout_batch, pack,
                       score_batch)
from lp.models import LAYOUTS


def _family_model(model_type: str, **config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(model_type, layers=4)
    if hasattr(cfg, "sliding_window"):
        cfg.sliding_window = 6  # shorter than the requests: the sliding layers' mask is exercised
    for k, v in config.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def _requests(seed=0, questions=7, vocab=128):
    """Multiple-choice-shaped requests: questions of 2-4 choices sharing their context, a few lone ones."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(questions):
        ctx = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 14))]
        for _ in range(rng.randrange(1, 5)):
            reqs.append((("c", "x"), ctx, [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 6))]))
    return reqs


def _reference(model, requests, max_length):
    """Each request alone, HFLM's way: the whole input through the model, log-softmax over the vocabulary."""
    out = []
    for _, ctx, cont in requests:
        inp = torch.tensor([(ctx + cont)[-(max_length + 1):][:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=inp).logits[0, -len(cont):].float(), -1)
        tok = torch.tensor(cont)
        out.append((logp.gather(1, tok[:, None]).sum().item(), bool((logp.argmax(-1) == tok).all())))
    return out


def _engine(model, requests, max_length, budget, prefix=None, attention="sdpa"):
    res = {}
    with attention_kernel(model, attention):
        for rows in pack(group_requests(requests, max_length), budget):
            for i, ll, greedy in score_batch(model, layout_batch(rows, 0), prefix, attention):
                res[i] = (ll, greedy)
    return [res[i] for i in range(len(requests))]


@pytest.mark.parametrize("model_type", sorted(LAYOUTS))
def test_engine_equals_a_full_forward_per_request_for_every_family(model_type):
    """Shared contexts, several questions per row, several rows per batch, left truncation: each request's
    log-likelihood and greediness are those of the request run alone."""
    model = _family_model(model_type)
    requests = _requests()
    for max_length, budget in ((64, 40), (64, 10_000), (9, 30)):  # 9: contexts truncated from the left
        got, want = _engine(model, requests, max_length, budget), _reference(model, requests, max_length)
        assert [g for _, g in got] == [g for _, g in want]
        assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) < 1e-4


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])  # one mask; a mask per layer type (sliding windows)
def test_flex_block_mask_gives_what_the_additive_mask_gives(model_type):
    """eval.attention=flex (FlexAttention with the block mask, through the model's attention interface): the
    same log-likelihoods as each request run alone, and the model's own attention restored after."""
    model = _family_model(model_type)
    requests = _requests()
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        from torch.nn.attention import flex_attention as fa

        real = fa.flex_attention
        mp.setattr(fa, "flex_attention", lambda *a, **k: calls.append(k["block_mask"]) or real(*a, **k))
        for max_length, budget in ((64, 40), (9, 30)):
            got, want = _engine(model, requests, max_length, budget, attention="flex"), _reference(model, requests, max_length)
            assert [g for _, g in got] == [g for _, g in want]
            assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) < 1e-4
    assert calls and all(type(m).__name__ == "BlockMask" for m in calls)  # the flex kernel ran, on block masks
    assert model.config._attn_implementation == "sdpa"


def test_groups_share_contexts_and_batches_keep_the_budget():
    requests = _requests(seed=3, questions=20)
    groups = group_requests(requests, 64)
    assert len(groups) == len({tuple(c) for _, c, _ in requests})  # one group per distinct context
    assert sum(len(g.members) for g in groups) == len(requests)
    batches = pack(groups, 60)
    assert [g for b in batches for row in b for g in row] == groups  # longest first, none lost
    for rows in batches:
        width = max(sum(g.size for g in row) for row in rows)
        assert len(rows) == 1 or len(rows) * width <= 60
    b = layout_batch(batches[0], 0)
    m = attention_mask(b, torch.float32)[:, 0] == 0
    for r in range(len(m)):  # a suffix never sees another suffix; nothing sees a later token
        for q in range(m.shape[1]):
            for k in range(m.shape[2]):
                if m[r, q, k] and q != k:
                    assert k < q and b.seg[r, q] == b.seg[r, k] and b.part[r, k] in (0, b.part[r, q])


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_prefix_states_give_the_same_scores_and_are_used(model_type):
    """States entering layer 2, captured while scoring the dense model, then reused for a pruned one (layers
    from 2 removed): the same numbers as the pruned model run whole. Gemma 3: sliding and full layers mixed,
    embeddings scaled inside embed_tokens."""
    from lp.evaluation import prefix_reuse_applies
    from lp.pruning import pruned

    mixed = {"layer_types": ["sliding_attention", "full_attention"] * 2} if model_type == "gemma3_text" else {}
    model = _family_model(model_type, **mixed)
    assert prefix_reuse_applies(model)
    requests = _requests(seed=5)
    states = PrefixStates(2, 2**30)
    dense = _engine(model, requests, 64, 50, states)
    assert states.states and states.hits == 0 and dense == _engine(model, requests, 64, 50)
    with pruned(model, [2], lambda *_: None):
        plain = _engine(model, requests, 64, 50)
        reused = _engine(model, requests, 64, 50, states)
    assert states.hits == len(states.states)
    assert reused == plain


def test_engine_is_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("lp") is PackedLM


def test_engine_equals_hflm_on_loglikelihood_and_rolling(tiny_dir):
    """Through lm-eval's own request path (its tokenisation, empty contexts, rolling windows): the same numbers
    as HFLM on a model with a real tokenizer."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    pairs = [("The jury said", " it did."), ("The jury said", " nothing at all"), ("", "An empty context"),
             ("Fulton County ", "Grand Jury"), ("Atlanta's recent primary election", " produced no evidence")]
    ll = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    text = "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election " * 6
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    kw = dict(pretrained=model, tokenizer=tok, device="cpu", max_length=48)  # rolling: several windows
    lp_lm, hf = PackedLM(token_budget=64, **kw), HFLM(batch_size=3, **kw)
    for (a, ga), (b, gb) in zip(lp_lm.loglikelihood(ll), hf.loglikelihood(ll)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert lp_lm.loglikelihood_rolling(rolling)[0] == pytest.approx(hf.loglikelihood_rolling(rolling)[0], abs=1e-3)
    assert lp_lm.generate_until([Instance("generate_until", {}, ("The jury", {"max_gen_toks": 4, "until": ["\n"]}), 0)])


def test_prefix_states_saved_and_loaded_give_the_same_scores(tmp_path):
    """What a process keeps on disk for the next: the same states, used as in memory; a damaged file is named."""
    from lp.pruning import pruned
    from lp.files import DamagedFile

    model = _family_model("llama")
    requests = _requests(seed=5)
    states = PrefixStates(2, 2**30)
    _engine(model, requests, 64, 50, states)
    states.save(tmp_path / "s.pt")
    again = PrefixStates(2, 2**30)
    again.load(tmp_path / "s.pt", model.config.hidden_size)
    assert again.loaded == len(states.states) and again.tuple_output == states.tuple_output
    assert all(torch.equal(again.states[k], h) for k, h in states.states.items())
    with pruned(model, [2], lambda *_: None):
        assert _engine(model, requests, 64, 50, again) == _engine(model, requests, 64, 50)
    assert again.hits == len(again.states)
    data = (tmp_path / "s.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedFile, match=r"cut.pt is damaged"):
        PrefixStates(2, 2**30).load(tmp_path / "cut.pt", model.config.hidden_size)
    with pytest.raises(DamagedFile, match=r"not the states entering layer 3"):
        PrefixStates(3, 2**30).load(tmp_path / "s.pt", model.config.hidden_size)


def test_prefix_states_filled_by_a_model_pruned_of_its_last_layers():
    """prune=last: the pruned model has no layer at the prefix's index; its states (the final norm's input)
    are filled by its own evaluation and then reused, with the numbers of the model run whole."""
    from lp.pruning import pruned

    model = _family_model("llama")
    requests = _requests(seed=6)
    states = PrefixStates(2, 2**30)
    with pruned(model, [2, 3], lambda *_: None):
        plain = _engine(model, requests, 64, 50)
        assert _engine(model, requests, 64, 50, states) == plain and states.states and states.hits == 0
        assert _engine(model, requests, 64, 50, states) == plain and states.hits == len(states.states)
    dense = PrefixStates(2, 2**30)
    _engine(model, requests, 64, 50, dense)  # the dense model's states entering layer 2: the same tensors
    assert all(torch.equal(dense.states[k], h) for k, h in states.states.items())
