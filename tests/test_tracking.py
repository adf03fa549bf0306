"""W&B offline: the finished run carries the accuracy table and the record + statistics as an artifact."""
import json

from lp.tracking import make_tracker, summary


def test_finished_run_logs_the_accuracy_table_and_the_record_artifact(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    stats = tmp_path / "calib.pt"
    stats.write_bytes(b"statistics")
    acc = lambda a: {"acc": a, "acc_stderr": 0.05}  # noqa: E731
    record = {"ppl": {"dense": 50.0, "pruned": 70.0, "datasets": {}}, "params_dense": 10, "params_pruned": 8,
              "prune_ratio": 0.2, "removed": [3, 4], "similarity": [0.9], "timings": {"load": 1.0},
              "zeroshot": {"dense": {"piqa": acc(0.64), "arc_easy": acc(0.51)},
                           "pruned": {"piqa": acc(0.60), "arc_easy": acc(0.45)}},
              "retention": {"rp": 91.0, "rp_stderr": 5.0, "per_task": {"piqa": 93.75, "arc_easy": 88.24}},
              "calib_stats": str(stats)}
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    tracker = make_tracker({"backend": "wandb", "mode": "offline", "dir": str(tmp_path / "wandb"), "project": "lp",
                            "entity": None}, {"seed": 0}, "t")
    run, logged, artifacts = tracker.run, [], []
    real_log, real_artifact = run.log, run.log_artifact
    monkeypatch.setattr(run, "log", lambda data, step=None: (logged.append(data), real_log(data, step=step)))
    monkeypatch.setattr(run, "log_artifact", lambda art: (artifacts.append(art), real_artifact(art)))
    tracker.finish_run(record, path)
    table = next(d["accuracy"] for d in logged if "accuracy" in d)
    assert table.columns[0] == "task" and [row[0] for row in table.data] == ["piqa", "arc_easy"]
    assert [row[-1] for row in table.data] == [93.75, 88.24]
    (art,) = [a for a in artifacts if a.type == "record"]
    assert sorted(art.manifest.entries) == ["calib.pt", "record.json"]
    assert summary(record)["rp/avg"] == 91.0 and summary(record)["acc/pruned/piqa"] == 0.60


def test_online_logging_without_an_account_names_the_setting_and_the_ways_out(tmp_path, monkeypatch):
    """logger=wandb_online with no API key (none here, as on a fresh machine): the error says what to do."""
    import pytest

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    with pytest.raises(RuntimeError, match=r"logger.mode=online: W&B could not start .*logger=wandb_offline"):
        make_tracker({"backend": "wandb", "mode": "online", "dir": str(tmp_path / "wandb"), "project": "lp",
                      "entity": None}, {"seed": 0}, "t")
