"""lm-eval's model-independent work done once (lp.harness): the same documents, requests, token ids, per-request
log-likelihoods and per-document outcomes as lm-eval's own simple_evaluate, cold, warm in the process and warm
from disk; damaged files set aside; the template wrapper only over the function it knows."""
import gzip
import json
import logging

import pytest

from lp import harness
from lp.tasks import local_task_dir, task_manager
from lp.zeroshot import evaluate_tasks

TASKS = ["arc_easy_local", "boolq_local", "copa_local", "hellaswag_local", "piqa_local", "winogrande_local"]


@pytest.fixture
def tiny(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture
def lm_eval_as_installed():
    """lm-eval's apply_template as installed during the test (the wrapper restored after), memos emptied."""
    from lm_eval import utils

    installed = getattr(utils.apply_template, "__wrapped__", utils.apply_template)
    current = utils.apply_template
    utils.apply_template = installed
    harness._SUITES.clear()
    harness._ENCODINGS.clear()
    yield installed
    utils.apply_template = current
    harness._SUITES.clear()
    harness._ENCODINGS.clear()


def _per_request(out: dict) -> dict:
    """{(task, doc_id): (the requests' arguments, their log-likelihoods, acc, acc_norm, the document's hash)} of
    lm-eval's samples."""
    return {(t, s["doc_id"]): (s["arguments"], [r[0][0] for r in s["resps"]], s.get("acc"), s.get("acc_norm"),
                               s["doc_hash"])
            for t, rows in out["samples"].items() for s in rows}


def test_cached_evaluation_equals_lm_evals_own(tiny, tmp_path, lm_eval_as_installed):
    """Every document's outcome and every request's log-likelihood: lm-eval's simple_evaluate with HFLM's
    per-string tokenisation and its templates compiled per document, against lp's path cold, warm in the process
    and warm from disk (new suite, empty token memo, the files written by the cold run)."""
    import lm_eval
    from lm_eval.api.model import TemplateLM

    from lp.engine import PackedLM

    model, tok = tiny
    tm = task_manager(local_task_dir(), tuple(TASKS))
    lm = PackedLM(pretrained=model, tokenizer=tok, device="cpu")
    lm.loglikelihood = TemplateLM.loglikelihood.__get__(lm)  # HFLM's own tokenisation, one string at a time
    want = _per_request(lm_eval.simple_evaluate(model=lm, tasks=TASKS, limit=6, num_fewshot=0, task_manager=tm,
                                                log_samples=True, random_seed=0, numpy_random_seed=0,
                                                torch_random_seed=0, fewshot_random_seed=0))
    assert len(want) == 36

    def lp_run():
        lm = PackedLM(pretrained=model, tokenizer=tok, device="cpu", cache_dir=str(tmp_path))
        return _per_request(harness.evaluate(lm, harness.suite(tm, TASKS, 6, 0, 0, tmp_path)))

    assert harness.reuse_compiled_templates()
    cold = lp_run()
    assert sorted((tmp_path / "lm_eval").glob("requests-*.json.gz")) and sorted((tmp_path / "lm_eval").glob("encodings-*.pt"))
    warm = lp_run()
    assert len(harness.suite(tm, TASKS, 6, 0, 0, tmp_path).doc_hash) == 36  # each document's hash kept, once
    harness._SUITES.clear()
    harness._ENCODINGS.clear()
    from_disk = harness.suite(tm, TASKS, 6, 0, 0, tmp_path)  # the suite the next run uses: fields read, not rendered
    assert all(len(task._lp_memo) >= 6 for task in from_disk.leaves.values())
    assert len(from_disk.doc_hash) == 36  # the doc_hash values read too, under keys the new process's dumps meets:
    disk = lp_run()
    assert len(from_disk.doc_hash) == 36  # none computed again
    for got in (cold, warm, disk):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k][0] == want[k][0] and got[k][2:] == want[k][2:], k
            assert got[k][1] == pytest.approx(want[k][1], abs=1e-5), k


def test_token_ids_follow_hflms_rule(tiny, lm_eval_as_installed):
    """encode_pairs gives HFLM's _encode_pair ids for every request of the local tasks (trailing spaces moved to
    the continuation, context + continuation encoded whole), also for a tokenizer that adds BOS."""
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny
    tm = task_manager(local_task_dir(), tuple(TASKS))
    s = harness.suite(tm, TASKS, 4, 0, 0)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    harness.evaluate(lm, s)
    pairs = [a for rows in s.requests().values() for _, _, _, a, _ in rows] + [("ends in spaces  ", "x"), ("a", " b")]
    for add_bos in (False, True):
        lm.add_bos_token = add_bos
        harness._ENCODINGS.clear()
        assert harness.encode_pairs(lm, pairs) == [tuple(map(tuple, lm._encode_pair(c, x))) for c, x in pairs]


def test_requests_key_follows_what_builds_them(tiny, tmp_path, lm_eval_as_installed):
    tm = task_manager(local_task_dir(), ("piqa_local",))
    keys = {harness.Suite(tm, ("piqa_local",), *settings).key() for settings in
            [(5, 0, 0), (6, 0, 0), (5, 1, 0), (5, 0, 1)]}
    assert len(keys) == 4
    assert harness.Suite(tm, ("piqa_local",), 5, 0, 0).key() == harness.Suite(tm, ("piqa_local",), 5, 0, 0).key()


@pytest.mark.parametrize("damage", ["garbage", "other_documents", "string_past_the_table"])
def test_damaged_cache_files_are_set_aside_and_rebuilt(tiny, tmp_path, caplog, lm_eval_as_installed, damage):
    model, tok = tiny
    kw = dict(limit=5, include_path=local_task_dir(), cache_dir=tmp_path)
    _, want = evaluate_tasks(model, tok, ["piqa_local"], **kw)
    folder = tmp_path / "lm_eval"
    for f in folder.iterdir():
        if damage == "garbage":
            f.write_bytes(b"not a cache file")
        elif f.name.startswith("requests"):  # a document id past the task's documents, or a string past the table
            doc, arg = (99999, 1) if damage == "other_documents" else (0, 7)
            f.write_bytes(gzip.compress(json.dumps({"format": harness.FORMAT, "strings": ["a", "b"], "requests": {
                "piqa_local": [["loglikelihood", doc, 0, [0, arg], 1]]}}).encode()))
        else:
            f.write_bytes(b"PK\x03\x04 truncated")
    harness._SUITES.clear()
    harness._ENCODINGS.clear()
    with caplog.at_level(logging.WARNING, logger="lp.records"):
        _, got = evaluate_tasks(model, tok, ["piqa_local"], **kw)
    assert got == want
    assert len(list(folder.glob("*.bad"))) == 2 and "is damaged" in caplog.text


def test_template_wrapper_compiles_once_and_only_over_the_function_it_knows(lm_eval_as_installed, caplog):
    from lm_eval import utils

    doc = {"q": "Why?", "a": ["x", "y"]}
    template = "Question: {{q}}\nAnswer: {{a[1]}}"
    want = lm_eval_as_installed(template, doc)
    assert harness.reuse_compiled_templates() and harness.reuse_compiled_templates()  # once, idempotent
    assert utils.apply_template.__wrapped__ is lm_eval_as_installed
    utils.apply_template.compiled.cache_clear()
    assert [utils.apply_template(template, doc) for _ in range(3)] == [want] * 3
    assert utils.apply_template.compiled.cache_info().misses == 1
    other = lambda template, doc: "something else"  # noqa: E731  (an lm-eval whose function lp does not know)
    utils.apply_template = other
    with caplog.at_level(logging.WARNING, logger="lp.harness"):
        assert not harness.reuse_compiled_templates()
    assert utils.apply_template is other and "not the function lp knows" in caplog.text


def test_doc_hash_reuse_applies_only_where_json_dumps_feeds_hash_string_alone(lm_eval_as_installed, tmp_path):
    """The kept doc_hash stands in for json.dumps' text only where lm-eval's evaluate uses json.dumps once, as
    hash_string's argument (else the text would be wrong elsewhere)."""
    import importlib.util

    from lm_eval.evaluator import evaluate

    assert harness._hashes_doc_json(evaluate)
    (tmp_path / "variants.py").write_text(
        "def alone(requests, hash_string, json):\n"
        "    return hash_string(json.dumps(requests[0].doc, indent=2))\n"
        "def also_elsewhere(requests, hash_string, json):\n"
        "    return hash_string(json.dumps(requests[0].doc, indent=2)), json.dumps(requests[0].doc)\n"
        "def text_kept(requests, hash_string, json):\n"
        "    return json.dumps(requests[0].doc, indent=2)\n")
    spec = importlib.util.spec_from_file_location("variants", tmp_path / "variants.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert harness._hashes_doc_json(mod.alone)
    assert not harness._hashes_doc_json(mod.also_elsewhere) and not harness._hashes_doc_json(mod.text_kept)
