import contextlib

import pytest
import torch

import lp.distill as distill
from lp.calibration import collect_stats
from lp.distill import TeacherCache, distill_kl, topk_kl, trainable_parameters
from lp.patches import build_patch
from lp.pruning import prune_and_patch
from tests.conftest import tiny_model

TRAINING = dict(weight_decay=1e-4, min_lr_factor=20.0, epochs=1)  # distill_kl's settings besides lr (all explicit)


@pytest.fixture
def samples():
    return torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(2))


def test_topk_kl_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 20, generator=g)
    teacher = torch.randn(2, 3, 20, generator=g)
    top = teacher.topk(5, dim=-1)
    p = top.values.softmax(-1)
    got = topk_kl(student, p, top.indices)
    total = 0.0
    for b in range(2):
        for t in range(3):
            q = student[b, t, top.indices[b, t]].softmax(-1)  # renormalised over the teacher's top-k
            total += sum(p[b, t, j] * (p[b, t, j].log() - q[j].log()) for j in range(5))
    assert torch.isclose(got, total / 6, atol=1e-6)
    assert topk_kl(teacher, p, top.indices).abs() < 1e-6  # zero when the student is the teacher


def test_teacher_cache_round_trip(tmp_path, samples):
    teacher = tiny_model()
    cache = TeacherCache(tmp_path, len(samples), 12, 7, shard_size=4).build(teacher, samples, progress=False)
    assert cache.complete and cache.num_shards == 2 and cache.nbytes == 6 * 12 * 7 * 6
    with torch.no_grad():
        top = teacher(input_ids=samples).logits.topk(7, dim=-1)
    got_p = torch.cat([cache.shard(i)["probs"] for i in range(2)])
    got_i = torch.cat([cache.shard(i)["indices"] for i in range(2)])
    assert got_p.dtype == torch.float16 and got_i.dtype == torch.int32
    assert torch.equal(got_i.long(), top.indices)
    torch.testing.assert_close(got_p.float(), top.values.softmax(-1), atol=1e-3, rtol=1e-3)


def test_teacher_cache_resumes_after_interruption(tmp_path, samples, caplog):
    caplog.set_level("INFO")
    teacher = tiny_model()
    TeacherCache(tmp_path, 6, 12, 7, 2).build(teacher, samples, progress=False)
    whole = {p.name: p.read_bytes() for p in tmp_path.glob("shard_*.pt")}
    # interrupted: one shard never renamed into place (only its .tmp is there), no meta.json yet
    (tmp_path / "meta.json").unlink()
    (tmp_path / "shard_00001.pt").rename(tmp_path / "shard_00001.tmp")
    calls = []
    orig = teacher.forward
    teacher.forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    cache = TeacherCache(tmp_path, 6, 12, 7, 2)
    assert not cache.complete
    cache.build(teacher, samples, progress=False)
    assert len(calls) == 1 and cache.complete  # only the missing shard was computed
    assert {p.name: p.read_bytes() for p in tmp_path.glob("shard_*.pt")}.keys() == whole.keys()
    assert "1 of 3 shards to write" in caplog.text


def _pruned_student(samples):
    model = tiny_model()
    stats = collect_stats(model, samples, progress=False)
    prune_and_patch(model, [2, 3], lambda s, e: build_patch("linearpatch", stats, s, e))
    return model


@pytest.mark.parametrize("train", ["patch", "patch+norms"])
def test_only_trainable_parameters_change(tmp_path, samples, train):
    cache = TeacherCache(tmp_path, 6, 12, 7, 2).build(tiny_model(), samples, progress=False)
    student = _pruned_student(samples)
    trained = {id(p) for p in trainable_parameters(student, train)}
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    res = distill_kl(student, cache, samples, **TRAINING, lr=1e-2, train=train, progress=False)
    assert res.steps == 3 and res.stopped is None
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    by_id = {n: id(p) for n, p in student.named_parameters()}
    assert changed and all(by_id[n] in trained for n in changed)  # frozen weights are bit-identical
    assert "model.layers.2.patch.weight" in changed
    assert any("norm" in n for n in changed) == (train == "patch+norms")
    if train == "patch+norms":  # the final norm too (wrapped, it is named model.norm.inner), and each once
        assert "model.norm.weight" in changed or "model.norm.inner.weight" in changed
        params = trainable_parameters(student, train)
        assert len(params) == len({id(p) for p in params})
    assert not any(p.requires_grad for p in student.parameters())


def test_distillation_lowers_the_kl(tmp_path, samples):
    cache = TeacherCache(tmp_path, 6, 12, 7, 2).build(tiny_model(), samples, progress=False)
    student = _pruned_student(samples)
    before = distill._val_loss(student, cache, samples, torch.device("cpu"), contextlib.nullcontext)
    res = distill_kl(student, cache, samples, cache, samples, **{**TRAINING, "epochs": 8}, lr=3e-3, progress=False)
    assert res.val[-1] < before and len(res.val) == 8


def test_non_finite_loss_stops_with_last_good_patch(tmp_path, samples, monkeypatch):
    cache = TeacherCache(tmp_path, 6, 12, 7, 2).build(tiny_model(), samples, progress=False)
    student = _pruned_student(samples)
    real, seen = distill.topk_kl, []

    def flaky(*a):
        seen.append(1)
        return real(*a) * (float("nan") if len(seen) == 2 else 1.0)

    monkeypatch.setattr(distill, "topk_kl", flaky)
    snapshots = []
    res = distill_kl(student, cache, samples, **TRAINING, lr=1e-2, progress=False,
                     on_step=lambda step, h: snapshots.append(student.model.layers[2].patch.weight.detach().clone()))
    assert res.steps == 1 and "nan" in res.stopped
    assert torch.equal(student.model.layers[2].patch.weight, snapshots[0])  # the last good patch
    assert torch.isfinite(student.model.layers[2].patch.weight).all()


def test_patch_none_has_nothing_to_train(samples):
    model = tiny_model()
    prune_and_patch(model, [1], lambda s, e: None)
    with pytest.raises(ValueError, match="no patch to train"):
        trainable_parameters(model, "patch")
    with pytest.raises(ValueError, match="distill.train='all'"):
        trainable_parameters(model, "all")


@pytest.mark.parametrize("train,k", [("last3", 3), ("norm_lmhead", 0)])
def test_partial_layer_fine_tuning_trains_only_the_last_layers_and_the_head(tmp_path, samples, train, k):
    """Lu et al.'s partial-layer fine-tuning (prune=last, then the last k kept layers, the final norm and the
    head, with lp's offline top-k KL): only those change, the KL on the training samples goes down, and it needs
    no patch."""
    cache = TeacherCache(tmp_path, 6, 12, 7, 2).build(tiny_model(), samples, progress=False)
    student = tiny_model()
    prune_and_patch(student, [4, 5], lambda s, e: None)  # prune=last: 4 of 6 layers kept, no patch
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    kl = distill._val_loss(student, cache, samples, torch.device("cpu"), contextlib.nullcontext)
    res = distill_kl(student, cache, samples, cache, samples, **{**TRAINING, "epochs": 4}, lr=3e-3, train=train,
                     progress=False)
    changed = {n.split(".")[0] if n.startswith("lm_head") else n for n, p in student.named_parameters()
               if not torch.equal(p, before[n])}
    layers = {int(n.split(".")[2]) for n in changed if n.startswith("model.layers.")}
    assert layers == set(range(4 - k, 4)) and "lm_head" in changed and "model.norm.weight" in changed
    assert not any(n.startswith("model.embed_tokens") for n in changed)  # the tiny model's head is untied
    assert res.val[-1] < kl


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong_shape", "meta"])
def test_a_damaged_teacher_shard_is_set_aside_and_rebuilt(tmp_path, samples, caplog, damage):
    teacher = tiny_model()
    TeacherCache(tmp_path, 6, 12, 7, 2).build(teacher, samples, progress=False)
    whole = [TeacherCache(tmp_path, 6, 12, 7, 2).shard(i) for i in range(3)]
    shard = tmp_path / "shard_00001.pt"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:300])
    elif damage == "garbage":
        shard.write_bytes(b"\x00garbage" * 50)
    elif damage == "wrong_shape":  # a readable shard of another cache: top-3 of 5 tokens
        torch.save({"probs": torch.rand(2, 5, 3).half(), "indices": torch.zeros(2, 5, 3, dtype=torch.int32)}, shard)
    else:
        (tmp_path / "meta.json").write_text('{"num_samples": 6, "seqlen": 99}')
    calls = []
    orig = teacher.forward
    teacher.forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    with caplog.at_level("WARNING"):
        cache = TeacherCache(tmp_path, 6, 12, 7, 2).build(teacher, samples, progress=False)
    named = tmp_path / ("meta.json" if damage == "meta" else "shard_00001.pt")
    assert str(named) in caplog.text and named.with_name(named.name + ".bad").is_file()
    assert len(calls) == (0 if damage == "meta" else 1)  # only the damaged shard is recomputed
    for i in range(3):
        assert torch.equal(cache.shard(i)["indices"], whole[i]["indices"])
        assert torch.equal(cache.shard(i)["probs"], whole[i]["probs"])


def test_prune_last_with_partial_layer_fine_tuning_runs_from_the_config(tiny_dir, tmp_path):
    from lp import pipeline
    from tests.conftest import cfg_for

    small = ["distill.samples=4", "distill.seqlen=16", "distill.batch_size=2", "distill.val_samples=0",
             "distill.topk=5", "distill.lr=1e-2"]
    rec = pipeline.run(cfg_for(tiny_dir, tmp_path, "prune=last", "prune.n=2", "patch=none", "distill=offline_kl",
                               "distill.train=last3", *small))
    assert rec["removed"] == [4, 5] and rec["distill_result"]["steps"] == 2
    assert rec["ppl"]["training_free"] != rec["ppl"]["pruned"]  # the tail was trained
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tail = [p for i in (1, 2, 3) for p in dense.model.layers[i].parameters()] + [dense.model.norm.weight, dense.lm_head.weight]
    assert rec["distill_result"]["trained_params"] == sum(p.numel() for p in tail)  # the last 3 kept layers, norm, head
