import json

from experiments import aggregate
from lp.records import RECORD_VERSION, write_json


def record(n, patch, ppl, created, status="complete"):
    return {"version": RECORD_VERSION, "status": status, "model": "m", "data": "d", "metric": "cosine", "n": n,
            "patch": patch, "distill": "none", "eval": "ppl", "seed": 0, "removed": list(range(n)),
            "params_pruned": 1, "created": created, "ppl": {"dense": 10.0, "pruned": ppl}}


def test_tables_from_synthetic_records(tmp_path, capsys):
    recs = tmp_path / "records"
    write_json(recs / "a.json", record(3, "none", 20.0, "2026-01-01"))
    write_json(recs / "b.json", record(3, "none", 22.0, "2026-01-02"))  # duplicate run: newest wins
    write_json(recs / "c.json", record(5, "linearpatch", 30.0, "2026-01-01"))
    write_json(recs / "sweep2" / "d.json", record(5, "none", 99.0, "2026-01-01", status="failed"))
    (recs / "e.json.tmp").write_text("{half a rec")  # an interrupted write is never read
    aggregate.main(["--records", str(recs), "--out", str(tmp_path / "tables")])
    csv = (tmp_path / "tables" / "ppl.csv").read_text().splitlines()
    assert csv[0] == "model,data,metric,patch,distill,n=3,n=5"
    rows = {tuple(line.split(",")[:5]): line.split(",")[5:] for line in csv[1:] if line.startswith("m,")}
    assert rows[("m", "d", "cosine", "none", "none")] == ["22.0", ""]
    assert rows[("m", "d", "cosine", "linearpatch", "none")] == ["", "30.0"]
    assert (tmp_path / "tables" / "ppl.md").is_file() and (tmp_path / "tables" / "ppl.tex").is_file()
    assert "dense perplexity" in capsys.readouterr().out


def test_no_records_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="no complete records"):
        aggregate.main(["--records", str(tmp_path)])
