"""Paired bootstrap intervals of RP and dRP (lp.intervals) and the tables that show them."""
import json

import numpy as np
import pytest

from lp.intervals import drp_interval, rp_interval, task_means
from lp.records import load_outcomes, outcomes_path, save_outcomes
from lp.files import DamagedFile
from lp.report.tables import accuracy, frame, paired


def _model(**tasks):
    return {t: {"ids": list(range(len(v))), "acc": [int(x) for x in v], "acc_norm": None} for t, v in tasks.items()}


def test_bootstrap_of_a_paired_difference_agrees_with_the_analytic_paired_variance():
    """dRP against an all-correct dense model is 100 x the difference of two paired means, whose variance is
    var(x - y) / n: the bootstrap standard deviation and interval agree with it."""
    rng = np.random.default_rng(3)
    n = 2000
    y = rng.random(n) < 0.6
    x = np.where(rng.random(n) < 0.85, y, rng.random(n) < 0.5)  # mostly the same answers: strongly paired
    dense, run, ref = _model(t=np.ones(n)), _model(t=x), _model(t=y)
    _, boot, docs = task_means([dense, run, ref], resamples=4000, seed=1)
    diff = 100 * (boot[:, 1, 0] - boot[:, 2, 0])
    analytic = 100 * np.std(x.astype(float) - y, ddof=1) / np.sqrt(n)
    assert docs == {"t": n} and diff.std() == pytest.approx(analytic, rel=0.05)
    unpaired = 100 * np.sqrt((x.var() + y.var()) / n)
    assert analytic < 0.7 * unpaired  # pairing is what makes the interval narrow
    d = drp_interval(dense, run, ref, resamples=4000, seed=1)
    assert d["drp"] == pytest.approx(100 * (x.mean() - y.mean()))
    assert d["ci"][1] - d["ci"][0] == pytest.approx(2 * 1.96 * analytic, rel=0.08)


def test_a_model_compared_with_itself_has_zero_difference_and_zero_width():
    rng = np.random.default_rng(0)
    dense = _model(a=rng.random(300) < 0.7, b=rng.random(100) < 0.5)
    run = _model(a=rng.random(300) < 0.6, b=rng.random(100) < 0.5)
    d = drp_interval(dense, run, run, resamples=200)
    assert d["drp"] == 0 and d["ci"] == [0.0, 0.0]
    r = rp_interval(dense, dense, resamples=200)
    assert r["rp"] == pytest.approx(100) and r["ci"] == pytest.approx([100, 100])


def test_intervals_are_seeded_and_resample_within_tasks_on_common_documents():
    dense = _model(a=[1, 1, 0, 1, 1, 0, 1, 1], b=[1, 0, 1, 1])
    pruned = {"a": {"ids": [0, 1, 2, 3, 4, 5], "acc": [1, 0, 0, 1, 1, 0], "acc_norm": None},
              "b": dense["b"]}
    one, two = rp_interval(dense, pruned, seed=5), rp_interval(dense, pruned, seed=5)
    assert one == two and rp_interval(dense, pruned, seed=6)["ci"] != one["ci"]
    assert one["documents"] == 6 + 4  # documents 6 and 7 of task a were scored by the dense model only
    # the point estimate is the paper's RP on those documents: mean over tasks of pruned / of dense
    assert one["rp"] == pytest.approx(100 * (3 / 6 + 3 / 4) / (4 / 6 + 3 / 4))
    assert one["ci"][0] <= one["rp"] <= one["ci"][1]
    with pytest.raises(ValueError, match="different tasks"):
        rp_interval(dense, {"a": pruned["a"]})


def _record(tmp_path, name, patch, acc, outcomes=True):
    rec = {"run_id": name, "model": "m", "data": "brown", "metric": "cosine", "n": 5, "patch": patch,
           "distill": "none", "eval": "local", "seed": 0, "removed": [1], "params_pruned": 1,
           "created": name, "ppl": {"dense": 10.0, "pruned": 12.0},
           "zeroshot": {"dense": {"t": {"acc": 0.8}}, "pruned": {"t": {"acc": float(np.mean(acc))}}},
           "retention": {"metric": "acc", "rp": 100 * float(np.mean(acc)) / 0.8, "avg_dense": 0.8,
                         "avg_pruned": float(np.mean(acc))}, "outcomes": None}
    path = tmp_path / f"{name}.json"
    if outcomes:
        rec["outcomes"] = outcomes_path(path).name
        save_outcomes(outcomes_path(path), _model(t=[1, 1, 1, 1, 0] * 20), _model(t=acc))
    path.write_text(json.dumps(rec))
    return {**rec, "_path": str(path), "_outcomes": load_outcomes(path, rec)}  # as lp.records.load_records reads it


def test_tables_show_intervals_only_for_records_with_outcomes(tmp_path):
    rng = np.random.default_rng(2)
    none = (rng.random(100) < 0.6).astype(int)
    better = np.where(rng.random(100) < 0.5, 1, none)
    old = _record(tmp_path, "old", "diag", none, outcomes=False)
    recs = [_record(tmp_path, "a", "none", none), _record(tmp_path, "b", "linearpatch", better), old]
    df = paired(frame(recs))
    by = df.set_index("patch")
    assert by.loc["none", "rp_lo"] < by.loc["none", "rp"] < by.loc["none", "rp_hi"]
    assert np.isnan(by.loc["none", "drp"])  # the reference itself
    assert by.loc["linearpatch", "drp"] == pytest.approx(100 * (better.mean() - none.mean()) / 0.8)
    assert by.loc["linearpatch", "drp_lo"] > 0  # only ever better on the same documents
    assert by.loc["diag", ["rp_lo", "rp_hi", "drp"]].isna().all()  # no side file: no interval, none made up
    t = accuracy(df)
    assert {"RP lo", "RP hi", "dRP", "dRP lo", "dRP hi"} <= set(t.mean.columns)
    assert t.mean.xs("cosine + diag", level="method")["RP lo"].isna().all()
    assert "no interval is made up" in t.note


def test_a_damaged_side_file_is_named(tmp_path):
    rec = _record(tmp_path, "a", "none", [1, 0] * 50)
    outcomes_path(rec["_path"]).write_bytes(b"not gzip")
    with pytest.raises(DamagedFile, match="a.outcomes.json.gz"):
        load_outcomes(rec["_path"])
    assert load_outcomes(tmp_path / "missing.json") is None
