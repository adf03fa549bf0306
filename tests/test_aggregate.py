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
    assert csv[0] == "model,data,eval,metric,patch,distill,n=3,n=5"
    rows = {tuple(line.split(",")[:6]): line.split(",")[6:] for line in csv[1:] if line.startswith("m,")}
    assert rows[("m", "d", "ppl", "cosine", "none", "none")] == ["22.0", ""]
    assert rows[("m", "d", "ppl", "cosine", "linearpatch", "none")] == ["", "30.0"]
    assert (tmp_path / "tables" / "ppl.md").is_file() and (tmp_path / "tables" / "ppl.tex").is_file()
    assert "dense perplexity" in capsys.readouterr().out


def test_no_records_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="no complete records"):
        aggregate.main(["--records", str(tmp_path)])


def test_figures_render_without_a_display(tmp_path):
    import torch

    from experiments import figures
    from lp.calibration import BoundaryStats

    L, d = 6, 12
    g = torch.Generator().manual_seed(0)
    stats_path = tmp_path / "stats.pt"
    BoundaryStats(abs_mean=torch.rand(L + 1, d, generator=g) + 0.1, abs_mean_rot=torch.rand(L + 1, d, generator=g) + 0.1,
                  cos=torch.rand(L + 1, L + 1, generator=g), angular=torch.rand(L + 1, L + 1, generator=g),
                  norm_mean=torch.arange(1.0, L + 2), tokens=10).save(stats_path)
    recs = tmp_path / "records"
    for i, (n, patch) in enumerate([(2, "none"), (2, "linearpatch"), (3, "linearpatch"), (3, "diag")]):
        r = record(n, patch, 10.0 + n + i, f"2026-01-0{i + 1}")
        r.update(interfaces=[[1, 1 + n]], calib_stats=str(stats_path))
        write_json(recs / f"{i}.json", r)
    written = figures.main(["--records", str(recs), "--out", str(tmp_path / "fig")])
    names = sorted(p.name for p in written)
    assert names == sorted(f"{f}.{e}" for f in ("magnitude", "cosine", "ppl_vs_n", "patches") for e in ("png", "pdf"))
    assert all(p.stat().st_size > 1000 for p in written)
    assert (tmp_path / "fig" / "magnitude.png").read_bytes()[:4] == b"\x89PNG"
