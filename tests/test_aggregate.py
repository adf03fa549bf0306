import pytest

from lp.report import tables as aggregate
from lp.files import write_json
from tests.conftest import record


def csv_rows(path, key_width):
    lines = path.read_text().splitlines()
    return lines[0].split(","), {tuple(x.split(",")[:key_width]): x.split(",")[key_width:] for x in lines[1:]}


def test_ppl_table_from_synthetic_records(tmp_path):
    recs = tmp_path / "records"
    write_json(recs / "a.json", record(3, "none", 20.0, "2026-01-01"))
    write_json(recs / "b.json", record(3, "none", 22.0, "2026-01-02"))  # duplicate run: newest wins
    write_json(recs / "c.json", record(5, "linearpatch", 30.0, "2026-01-01"))
    write_json(recs / "c2.json", record(5, "none", 35.0, "2026-01-01"))
    write_json(recs / "sweep2" / "d.json", record(5, "none", 9.0, "2026-01-03", status="failed"))  # never read
    (recs / "e.json").write_text("{half a rec")  # a damaged record is listed as skipped, never read
    _, skipped = aggregate.build(recs, tmp_path / "tables")
    assert sorted((p.rsplit("/", 1)[-1], "not JSON" in w) for p, w in skipped) == [("d.json", False), ("e.json", True)]
    header, rows = csv_rows(tmp_path / "tables" / "ppl.csv", 6)
    assert header == ["model", "data", "eval", "metric", "patch", "distill", "n=3", "n=5"]
    assert rows[("m", "d", "ppl", "cosine", "none", "none")] == ["22.0", "35.0"]
    assert rows[("m", "d", "ppl", "cosine", "linearpatch", "none")] == ["", "30.0"]
    md = (tmp_path / "tables" / "ppl.md").read_text()
    assert "**30.00**" in md and "**35.00**" not in md  # the lower perplexity of the n=5 column is bold
    assert "\\textbf{30.00}" in (tmp_path / "tables" / "ppl.tex").read_text()


def test_seeds_give_mean_and_std(tmp_path):
    recs = tmp_path / "records"
    for seed, ppl in enumerate([20.0, 22.0, 24.0]):
        write_json(recs / f"s{seed}.json", record(3, "none", ppl, "2026-01-01", seed=seed))
    found, _ = aggregate.build(recs, tmp_path / "tables")
    assert found["ppl"].mean.iloc[0, 0] == pytest.approx(22.0) and found["ppl"].std.iloc[0, 0] == pytest.approx(2.0)
    assert "22.00 ± 2.00" in (tmp_path / "tables" / "ppl.md").read_text()
    header, _ = csv_rows(tmp_path / "tables" / "ppl.csv", 6)
    assert header[-2:] == ["n=3", "n=3 std"]


def test_dataset_table_has_one_column_per_eval_data_and_avg(tmp_path):
    recs = tmp_path / "records"
    r = record(3, "linearpatch", 10.0, "2026-01-01", data="wikitext2")
    r["ppl"]["datasets"] = {"wikitext2": {"dense": 5.0, "pruned": 10.0}, "c4": {"dense": 8.0, "pruned": 20.0},
                            "ptb": {"dense": 9.0, "pruned": 30.0}}
    write_json(recs / "a.json", r)
    write_json(recs / "b.json", record(3, "none", 50.0, "2026-01-01", data="wikitext2"))  # wikitext2 only: no avg
    aggregate.build(recs, tmp_path / "tables")
    header, rows = csv_rows(tmp_path / "tables" / "ppl_datasets.csv", 5)
    assert header == ["model", "data", "eval", "n", "method", "c4", "ptb", "wikitext2", "avg"]
    assert rows[("m", "wikitext2", "ppl", "3", "cosine + linearpatch")] == ["20.0", "30.0", "10.0", "20.0"]
    assert rows[("m", "wikitext2", "ppl", "3", "cosine")] == ["", "", "50.0", ""]
    assert rows[("m", "wikitext2", "ppl", "0", "dense")] == ["8.0", "9.0", "5.0", "7.333333333333333"]


def test_accuracy_table_in_the_paper_layout_with_a_missing_task(tmp_path):
    recs = tmp_path / "records"
    dense = {"arc_e": 0.8, "piqa": 0.6}
    write_json(recs / "a.json", record(3, "linearpatch", 20.0, "2026-01-01", acc={"arc_e": 0.72, "piqa": 0.6},
                                       dense_acc=dense))
    write_json(recs / "b.json", record(3, "none", 25.0, "2026-01-01", acc={"arc_e": 0.64},  # a sweep without piqa
                                       dense_acc={"arc_e": 0.8}))
    write_json(recs / "c.json", record(5, "none", 40.0, "2026-01-01"))  # no zero-shot: not in this table
    found, _ = aggregate.build(recs, tmp_path / "tables")
    header, rows = csv_rows(tmp_path / "tables" / "accuracy.csv", 5)
    assert header == ["model", "data", "eval", "n", "method", "arc_e", "piqa", "Avg", "RP"]
    assert [float(x) for x in rows[("m", "d", "ppl", "3", "cosine + linearpatch")]] == pytest.approx(
        [72.0, 60.0, 66.0, 66 / 70 * 100])
    arc, piqa, avg, rp = rows[("m", "d", "ppl", "3", "cosine")]  # piqa missing: empty cell, RP over arc_e
    assert "m: whole splits" in (tmp_path / "tables" / "accuracy.md").read_text()
    assert (float(arc), piqa, float(rp)) == (pytest.approx(64.0), "", pytest.approx(80.0))
    assert [float(x) for x in rows[("m", "d", "ppl", "0", "dense")]] == pytest.approx([80.0, 60.0, 70.0, 100.0])
    assert set(k[3] for k in rows) == {"0", "3"}
    md = (tmp_path / "tables" / "accuracy.md").read_text()
    assert "**72.00**" in md and "**94.29**" in md and "**80.00**" not in md  # best arc_e and RP of n=3
    assert not found["accuracy"].best().xs("dense", level="method").any().any()  # the reference is not bold


def test_no_records_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no complete records"):
        aggregate.build(tmp_path, tmp_path / "t")


def test_a_reference_no_record_has_is_refused_by_name(tmp_path):
    """--vs patch=linearptach would leave every dRP empty: refused, with the values the records have."""
    import experiments.aggregate as cli

    write_json(tmp_path / "records" / "a.json", record(3, "linearpatch", 20.0, "2026-01-01"))
    with pytest.raises(SystemExit, match=r"--vs patch=linearptach: no record has it; the records' patch: \['linearpatch'\]"):
        cli.main(["--results", str(tmp_path), "--vs", "patch=linearptach"])
    assert cli.main(["--results", str(tmp_path), "--vs", "patch=linearpatch"])  # a value a record has
    assert cli.main(["--results", str(tmp_path)])  # the default reference (no unpatched run here): empty dRP


def test_runs_differing_in_other_settings_are_named_and_split_with_by(tmp_path, caplog):
    recs = tmp_path / "records"
    for i, lr in enumerate([1e-4, 1e-3]):
        r = record(5, "streamline_ffn", 80.0 - 10 * i, f"2026-01-0{i + 1}")
        r.update(run_id=f"m__x__hash{i}", config={"patch": {"variant": "streamline_ffn", "lr": lr},
                                                   "eval": {"prefix_reuse": bool(i)}})
        write_json(recs / f"{i}.json", r)
    with caplog.at_level("WARNING"):
        aggregate.build(recs, tmp_path / "t1")
    out = caplog.text
    caplog.clear()
    assert "differ only in ['patch.lr']" in out and "--by" in out  # prefix_reuse is not a setting
    _, rows = csv_rows(tmp_path / "t1" / "ppl.csv", 6)
    assert list(rows.values()) == [["70.0"]]  # one row: the newest
    aggregate.build(recs, tmp_path / "t2", ["patch.lr"])
    assert "differ only" not in caplog.text
    _, rows = csv_rows(tmp_path / "t2" / "ppl.csv", 6)
    assert {k[4]: v for k, v in rows.items()} == {"streamline_ffn [patch.lr=0.0001]": ["80.0"],
                                                  "streamline_ffn [patch.lr=0.001]": ["70.0"]}


def test_aggregate_command_does_not_import_torch(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    recs = tmp_path / "records"
    from lp.files import write_json

    write_json(recs / "a.json", record(3, "linearpatch", 12.0, "2026-01-01"))
    code = ("import sys, experiments.aggregate as a; a.main(['--records', sys.argv[1], '--out', sys.argv[2]]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    out = subprocess.run([sys.executable, "-c", code, str(recs), str(tmp_path / "t")], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "t" / "ppl.md").is_file()


def test_readme_blocks_are_refilled_from_the_tables(tmp_path):
    import experiments.aggregate as cli

    recs = tmp_path / "records"
    dense = {"arc_e": 0.8, "piqa": 0.6}
    write_json(recs / "a.json", record(3, "linearpatch", 20.0, "2026-01-01", acc={"arc_e": 0.72, "piqa": 0.6},
                                       dense_acc=dense))
    write_json(recs / "b.json", record(3, "none", 25.0, "2026-01-01", acc={"arc_e": 0.64}, dense_acc={"arc_e": 0.8},
                                       data="other"))
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n<!-- table accuracy data=other n=0,3 -->\nstale rows\n<!-- /table -->\nkept text\n"
                      "<!-- table ppl data=d patch=\"linearpatch,no such\" -->\n<!-- /table -->\n")
    cli.main(["--records", str(recs), "--out", str(tmp_path / "t"), "--readme", str(readme)])
    text = readme.read_text()
    assert "stale rows" not in text and text.startswith("# Results\n") and "\nkept text\n" in text
    acc_block = text.split("<!-- table accuracy data=other n=0,3 -->\n")[1].split("<!-- /table -->")[0]
    rows = [line for line in acc_block.splitlines() if line.startswith("| m ")]
    assert [r.split("|")[5].strip() for r in rows] == ["dense", "cosine"]  # data=other only, both depths
    assert "piqa" not in acc_block and "arc_e" in acc_block  # a column none of its rows fills is dropped
    ppl_block = text.split('<!-- table ppl data=d patch="linearpatch,no such" -->')[1]
    assert "| linearpatch |" in ppl_block and "| other " not in ppl_block  # the other block: data=d alone
    readme.write_text("<!-- table nope eval=x -->\n<!-- /table -->\n")
    with pytest.raises(SystemExit, match="nope.md does not exist"):
        cli.main(["--records", str(recs), "--out", str(tmp_path / "t"), "--readme", str(readme)])
    readme.write_text("<!-- table ppl modle=m -->\n<!-- /table -->\n")
    with pytest.raises(SystemExit, match=r"table columns \['modle'\] do not exist"):
        cli.main(["--records", str(recs), "--out", str(tmp_path / "t"), "--readme", str(readme)])


def test_the_papers_numbers_sit_beside_lps_runs_of_the_same_model():
    """results/paper/linearpatch.csv (the official README's Tables 1-4) as [paper] rows; an lp run of
    llama3.1-8b with eval=paper joins them in the same (model, n) block."""
    import pandas as pd

    from lp.report.tables import frame, paper

    tables = aggregate
    p = pd.read_csv(tables.PAPER)
    lp_s = p[(p["table"] == "4") & (p["metric"] == "block_influence") & (p["patch"] == "linearpatch")].iloc[0]
    assert (lp_s["rp"], lp_s["avg"], lp_s["removed"]) == (87.82, 64.42, "[22, 23, 24, 25, 26, 27, 28]")
    tasks = {t: {"acc": 0.5} for t in tables.PAPER_TASKS}
    r = record(7, "linearpatch", 25.0, "2026-01-01", metric="block_influence", acc=tasks,
               dense_acc={t: {"acc": 0.6} for t in tables.PAPER_TASKS})
    r.update(model="llama3.1-8b", eval="paper",
             ppl={"dense": 6.1, "pruned": 25.0, "datasets": {k: {"dense": 6.0, "pruned": 20.0} for k in tables.PAPER_PPL}})
    t = paper(frame([r]))
    block = t.mean.loc[("llama3.1-8b", 7)]
    assert block.loc["block_influence + linearpatch [paper]", "rp"] == 87.82
    assert block.loc["block_influence + linearpatch", "rp"] == pytest.approx(100 * 0.5 / 0.6)
    assert block.loc["block_influence + linearpatch", "wikitext2"] == 20.0
    assert t.mean.loc[("llama2-7b", 0, "dense [paper]"), "avg"] == 69.98


def test_a_distilled_run_is_labelled_with_how_much_it_trained():
    """distill=paper and the CPU preset share the method offline_kl: the label says samples x seqlen."""
    runs = []
    for samples, seqlen, created in ((1000, 2048, "2026-01-01"), (64, 128, "2026-01-02")):
        r = record(3, "linearpatch", 20.0, created)
        r.update(distill="offline_kl", run_id=f"m-{samples}",
                 config={"distill": {"method": "offline_kl", "samples": samples, "seqlen": seqlen}})
        runs.append(r)
    methods = set(aggregate.frame(runs)["method"])
    assert methods == {"cosine + linearpatch + offline_kl [1000 x 2048]", "cosine + linearpatch + offline_kl [64 x 128]"}


def test_labels_split_runs_whose_numbers_differ_by_basis_bos_or_metric_variant():
    """Settings that change the numbers but not the run's choices get their own row and label: LinearPatch in
    lp's own Hadamard basis ([H=paley]; records from before patch.hadamard existed were in it too), BOS forced on
    or off ([bos=...]), a metric's non-default variant, and a search with the patch in its loop ([in-loop]); the
    defaults get no label."""
    configs = {
        "quarot": {"patch": {"variant": "linearpatch", "hadamard": "quarot"}},
        "paley": {"patch": {"variant": "linearpatch", "hadamard": "paley"}},
        "old": {"patch": {"variant": "linearpatch"}},  # before patch.hadamard: lp's own basis
        "bos": {"patch": {"variant": "linearpatch", "hadamard": "quarot"}, "data": {"bos": True}},
        "auto": {"patch": {"variant": "linearpatch", "hadamard": "quarot"}, "data": {"bos": "auto"}},
        "last": {"patch": {"variant": "linearpatch", "hadamard": "quarot"}, "prune": {"token": "mean"}},
        "loop": {"patch": {"variant": "linearpatch", "hadamard": "quarot"}, "prune": {"in_loop": True}},
        "posthoc": {"patch": {"variant": "linearpatch", "hadamard": "quarot"}, "prune": {"in_loop": False}},
    }
    runs = []
    for name, config in configs.items():
        r = record(3, "linearpatch", 20.0, "2026-01-01")
        r.update(run_id=name, config=config)
        runs.append(r)
    rows = {r["run_id"]: aggregate.frame([r]).iloc[0] for r in runs}
    got = {name: (row["data"], row["metric"], row["patch"]) for name, row in rows.items()}
    assert got == {"quarot": ("d", "cosine", "linearpatch"), "paley": ("d", "cosine", "linearpatch [H=paley]"),
                   "old": ("d", "cosine", "linearpatch [H=paley]"), "bos": ("d [bos=true]", "cosine", "linearpatch"),
                   "auto": ("d", "cosine", "linearpatch"), "last": ("d", "cosine [mean]", "linearpatch"),
                   "loop": ("d", "cosine [in-loop]", "linearpatch"), "posthoc": ("d", "cosine", "linearpatch")}
    assert len(aggregate.frame(runs)) == 5  # quarot, auto and posthoc share a row, as do paley and old


def test_cost_table_puts_trained_parameters_and_minutes_beside_rp(tmp_path):
    recs = tmp_path / "records"
    dense = {"arc_e": 0.8}
    free = record(3, "linearpatch", 20.0, "2026-01-01", acc={"arc_e": 0.72}, dense_acc=dense)
    free.update(params_pruned=90_000_000)
    tuned = record(3, "none", 20.0, "2026-01-02", metric="last", acc={"arc_e": 0.76}, dense_acc=dense)
    tuned.update(params_pruned=90_000_000, distill="offline_kl", timings={"distill": 90.0},
                 distill_result={"steps": 4, "loss": [1.0], "val": [], "stopped": None, "trained_params": 37_000_000})
    write_json(recs / "a.json", free)
    write_json(recs / "b.json", tuned)
    write_json(recs / "c.json", record(5, "none", 40.0, "2026-01-01"))  # no zero-shot: not in this table
    aggregate.build(recs, tmp_path / "tables")
    header, rows = csv_rows(tmp_path / "tables" / "cost.csv", 5)
    assert header == ["model", "data", "eval", "n", "method", "params (M)", "trained (M)", "train min", "RP"]
    assert [float(x) for x in rows[("m", "d", "ppl", "3", "last + offline_kl")]] == pytest.approx([90.0, 37.0, 1.5, 95.0])
    assert [float(x) for x in rows[("m", "d", "ppl", "3", "cosine + linearpatch")]] == pytest.approx([90.0, 0.0, 0.0, 90.0])
    assert set(k[3] for k in rows) == {"3"}


def test_removed_layers_table_names_each_selections_layers(tmp_path):
    recs = tmp_path / "records"
    runs = [("cosine", "none", [1, 2]), ("cosine", "linearpatch", [1, 2]), ("block_influence", "none", [0, 3]),
            ("block_influence", "prunecomp", [2, 4]), ("llm_pruner", "none", [])]
    for i, (metric, patch, removed) in enumerate(runs):
        r = record(2, patch, 20.0, f"2026-01-0{i + 1}", metric=metric)
        r["removed"] = removed
        write_json(recs / f"{i}.json", r)
    aggregate.build(recs, tmp_path / "tables")
    import csv

    header, row = list(csv.reader((tmp_path / "tables" / "removed.csv").open()))
    assert header == ["model", "data", "n", "block_influence", "block_influence (prunecomp)", "cosine"]
    assert row == ["m", "d", "2", "0, 3", "2, 4", "1, 2"]  # width pruning removes no layer: no column
    assert "| 1, 2 " in (tmp_path / "tables" / "removed.md").read_text()
