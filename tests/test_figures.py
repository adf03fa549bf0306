import os
import subprocess
import sys

import pytest
import torch

from lp.calibration import BoundaryStats
from lp.files import write_json
from tests.conftest import record


def synthetic(tmp_path, L=6, d=12, T=9):
    g = torch.Generator().manual_seed(0)
    stats_path = tmp_path / "stats.pt"
    BoundaryStats(abs_mean=torch.rand(L + 1, d, generator=g) + 0.1, abs_mean_rot=torch.rand(L + 1, d, generator=g) + 0.1,
                  cos=torch.rand(L + 1, L + 1, generator=g), angular=torch.rand(L + 1, L + 1, generator=g),
                  norm_mean=torch.arange(1.0, L + 2), tokens=10, token_absmax=torch.rand(L + 1, T, generator=g) + 1,
                  token_absmax_rot=torch.rand(L + 1, T, generator=g) + 0.5).save(stats_path)
    recs = tmp_path / "records"
    runs = [(2, "none", "cosine"), (2, "linearpatch", "cosine"), (3, "linearpatch", "cosine"), (3, "diag", "cosine"),
            (3, "none", "block_influence")]
    for i, (n, patch, metric) in enumerate(runs):
        r = record(n, patch, 10.0 + n + i, f"2026-01-0{i + 1}", metric=metric)
        r.update(interfaces=[[1, 1 + n]], calib_stats=str(stats_path))
        write_json(recs / f"{i}.json", r)
    return recs


def test_figures_render_without_a_display(tmp_path):
    recs = synthetic(tmp_path)
    out = tmp_path / "fig"
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "experiments.figures", "--records", str(recs), "--out", str(out)],
                   check=True, env=env, cwd=root)
    names = sorted(p.name for p in out.iterdir())
    figs = ("magnitude", "outliers", "cosine", "ppl_vs_n", "patches", "methods")
    assert names == sorted(f"{f}.{e}" for f in figs for e in ("png", "pdf"))
    assert all(p.stat().st_size > 1000 for p in out.iterdir())
    assert (out / "magnitude.png").read_bytes()[:4] == b"\x89PNG" and (out / "magnitude.pdf").read_bytes()[:4] == b"%PDF"
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    subprocess.run([sys.executable, "-m", "experiments.figures", "--records", str(recs), "--out", str(out)],
                   check=True, env=env, cwd=root)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # unchanged records: the same bytes


def test_the_zoomed_interface_is_the_middle_linearpatch_depth(tmp_path):
    from lp.report import figures

    records, df, stats, same = figures.load(synthetic(tmp_path))
    assert figures.interface_of(same) == (1, 4)  # LinearPatch at n=2 and n=3: the second of the two
    assert stats.token_absmax.shape == (7, 9) and set(df["eval"]) == {"ppl"}


def test_selection_scores_figure_draws_every_candidate_and_the_cosine(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from lp.report import figures

    recs = synthetic(tmp_path)
    r = record(2, "linearpatch", 12.0, "2026-01-09", metric="patched")
    r.update(calib_stats=str(tmp_path / "stats.pt"), selection_scores={str(s): 0.1 * (s + 1) for s in range(5)})
    fig = figures.selection_scores([r])
    score_line, = fig.axes[0].get_lines()
    cos_line, = fig.axes[1].get_lines()
    assert list(score_line.get_xdata()) == [0, 1, 2, 3, 4]
    assert list(score_line.get_ydata()) == [0.1 * (s + 1) for s in range(5)]
    stats = BoundaryStats.load(tmp_path / "stats.pt")
    assert list(cos_line.get_ydata()) == [stats.cos[s, s + 2].item() for s in range(5)]
    assert figures.selection_scores(figures.load(recs)[0]) is None  # no patched runs: no figure


def test_statistics_of_records_made_under_another_results_dir_are_found_beside_the_records(tmp_path):
    """A record made on another machine names its statistics by that machine's path (e.g. a GPU's results_dir):
    the figures find the file of that name in the stats/ folder beside the records, and nothing when it is not
    there (never a file of another name)."""
    import json

    from lp.report import figures

    recs = synthetic(tmp_path)
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats.pt").rename(tmp_path / "stats" / "calib_abc.pt")
    for f in recs.glob("*.json"):
        r = json.loads(f.read_text())
        write_json(f, {**r, "calib_stats": "/elsewhere/results/stats/calib_abc.pt"})
    records, _, stats, same = figures.load(recs)
    assert stats is not None and stats.token_absmax.shape == (7, 9) and len(same) == len(records)
    assert figures.stats_path(records[0]) is None  # without the folder to look in: not found
    (tmp_path / "stats" / "calib_abc.pt").rename(tmp_path / "stats" / "calib_other.pt")
    assert figures.load(recs)[2] is None


def test_the_figures_model_is_one_whose_statistics_are_at_hand(tmp_path):
    """More records of another model, made elsewhere without their statistics, do not take the interface
    figures away from the model whose statistics are saved; with none saved, the most common model is taken."""
    import json

    from lp.report import figures

    recs = synthetic(tmp_path)  # five records of model "m", their statistics saved
    for i in range(6):
        r = record(2 + i % 3, "linearpatch", 20.0 + i, f"2026-02-0{i + 1}")
        write_json(recs / f"other{i}.json", {**r, "run_id": f"other-{i}", "model": "other", "interfaces": [[1, 3]],
                                             "calib_stats": "/gpu/results/stats/calib_gone.pt"})
    records, df, stats, same = figures.load(recs)
    assert {r["model"] for r in records} == set(df["model"]) == {"m"} and stats is not None and len(same) == 5
    (tmp_path / "stats.pt").unlink()
    records, df, stats, _ = figures.load(recs)
    assert {r["model"] for r in records} == {"other"} and len(records) == 6 and stats is None


def _outcomes(p_dense, p_pruned, n=40):
    """Per-document 0/1 outcomes of one task, dense and pruned, right on the first p * n documents."""
    doc = lambda p: {"ids": list(range(n)), "acc": [1 if i < p * n else 0 for i in range(n)], "acc_norm": None}  # noqa: E731
    return {"dense": {"t": doc(p_dense)}, "pruned": {"t": doc(p_pruned)}}


def test_depth_figure_draws_each_matching_record_once_with_its_bands(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from lp.report import figures
    from lp.report.tables import frame, paper_rows

    runs = [(1, "none", "cosine", 0.5), (2, "none", "cosine", 0.4), (1, "linearpatch", "cosine", 0.55),
            (2, "linearpatch", "cosine", 0.45), (2, "none", "block_influence", 0.3)]
    recs = []
    for i, (n, patch, metric, acc) in enumerate(runs):
        r = record(n, patch, 20.0, f"2026-01-0{i + 1}", metric=metric, acc={"t": acc}, dense_acc={"t": 0.6})
        r.update(num_layers=6, _outcomes=_outcomes(0.6, acc))
        recs.append(r)
    other = record(1, "none", 20.0, "2026-01-08", acc={"t": 0.2}, dense_acc={"t": 0.6})
    other.update(model="other", num_layers=6)  # another model: never on m's figure
    df = frame(recs + [other])
    assert figures.depth_figures(df) == [("depth_m", "m", "ppl")]
    fig = figures.depth(df, "m", paper_rows())
    axes = fig.axes  # row by row: RP main, RP other methods, paper; dRP main, dRP other methods, (empty)
    rp_ax, drp_ax, paper_ax = axes[0], axes[3], axes[2]
    assert not [ln for ax in (axes[1], axes[4]) for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    # one colour per selection method, one line style per patch
    main = {ln.get_label(): (ln.get_color(), ln.get_linestyle()) for ln in rp_ax.get_lines()
            if not ln.get_label().startswith("_")}
    assert main["cosine"][0] == main["cosine + linearpatch"][0] != main["block_influence"][0]
    assert main["cosine"][1] == main["block_influence"][1] != main["cosine + linearpatch"][1]
    lines = {ln.get_label(): ln for ln in rp_ax.get_lines() if not ln.get_label().startswith("_")}
    assert sum(len(ln.get_xdata()) for ln in lines.values()) == len(runs)  # one marker per matching record
    assert list(lines["cosine"].get_xdata()) == [1 / 6, 2 / 6]
    assert list(lines["cosine"].get_ydata()) == [r["retention"]["rp"] for r in recs[:2]]
    assert len(rp_ax.collections) == 3  # a band per method: every record has outcomes
    drp = {ln.get_label(): ln for ln in drp_ax.get_lines() if not ln.get_label().startswith("_")}
    assert set(drp) == {"cosine", "block_influence"}  # LP[L] is the reference itself
    assert list(drp["block_influence"].get_ydata()) == pytest.approx([(0.3 - 0.45) / 0.6 * 100])  # vs LP[L], n = 2
    paper = paper_rows()
    want = paper[(paper["model"] == "llama3.1-8b") & paper["rp"].notna() & (paper["n"] > 0)]
    assert sum(len(ln.get_xdata()) for ln in paper_ax.get_lines() if not ln.get_label().startswith("_")) == len(want)
    assert figures.depth(df, "nobody") is None


def _zeroshot(model, eval_, limit, n, patch, acc, metric="cosine", L=6):
    r = record(n, patch, 20.0, f"2026-01-{n:02d}", metric=metric, acc={"t": acc}, dense_acc={"t": 0.6})
    r.update(model=model, eval=eval_, num_layers=L, config={"eval": {"limit": limit}},
             _outcomes=_outcomes(0.6, round(acc * 40) / 40 - 1e-9))  # exactly acc * 40 documents right
    r["run_id"] += f"-{model}-{eval_}"
    return r


def test_each_evaluation_gets_its_depth_figure_and_whole_splits_the_plain_name():
    import matplotlib

    matplotlib.use("Agg")
    from lp.report import figures
    from lp.report.tables import frame

    recs = [_zeroshot("m", "local_cpu", 200, n, p, 0.5) for n in (1, 2, 3) for p in ("none", "linearpatch")]
    recs += [_zeroshot("m", "local", None, n, "none", 0.5) for n in (1, 2)]  # fewer records, but whole splits
    recs += [_zeroshot("x", "local_cpu", 200, n, "none", 0.5) for n in (1, 2)]
    recs += [_zeroshot("x", "quick", 200, 1, "none", 0.5)]  # one depth: no figure
    df = frame(recs)
    assert figures.depth_figures(df) == [("depth_m", "m", "local"), ("depth_m_local_cpu", "m", "local_cpu"),
                                         ("depth_x", "x", "local_cpu")]
    for eval_, shown in (("local", 2), ("local_cpu", 6)):  # each figure draws its evaluation's records only
        ax = figures.depth(df, "m", None, eval_).axes[0]
        assert sum(len(ln.get_xdata()) for ln in ax.get_lines() if not ln.get_label().startswith("_")) == shown


def test_patch_gain_is_linearpatch_minus_no_patch_per_model_and_selection():
    import matplotlib

    matplotlib.use("Agg")
    from lp.report import figures
    from lp.report.tables import frame

    acc = {("a", "cosine", "none"): 0.40, ("a", "cosine", "linearpatch"): 0.45, ("a", "block_influence", "none"): 0.30,
           ("a", "block_influence", "linearpatch"): 0.25, ("b", "cosine", "none"): 0.50, ("b", "cosine", "linearpatch"): 0.53}
    recs = [_zeroshot(m, "local", None, n, p, v - 0.05 * (n - 1), metric=sel, L=6 if m == "a" else 4)
            for (m, sel, p), v in acc.items() for n in (1, 2)]
    recs.append(_zeroshot("a", "local_cpu", 200, 1, "linearpatch", 0.1))  # another evaluation of a: not drawn
    recs.append(_zeroshot("a", "local_cpu", 200, 1, "none", 0.5))
    fig = figures.patch_gain(frame(recs))
    cos_ax, bi_ax = fig.axes
    cos, bi = ({ln.get_label().split(" ")[0]: ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
               for ax in (cos_ax, bi_ax))
    assert set(cos) == {"a", "b"} and set(bi) == {"a"}
    assert list(cos["a"].get_ydata()) == pytest.approx([(0.45 - 0.40) / 0.6 * 100] * 2)
    assert list(cos["b"].get_xdata()) == [1 / 4, 2 / 4]
    assert list(bi["a"].get_ydata()) == pytest.approx([(0.25 - 0.30) / 0.6 * 100] * 2)
    assert len(cos_ax.collections) == 2  # a band per model
    assert figures.patch_gain(frame([r for r in recs if r["patch"] == "none"])) is None
    from lp.report.tables import patch_gain  # the same numbers as a table, every evaluation a row

    cells = patch_gain(frame(recs)).mean
    assert cells.loc[("a", "local", 6, "cosine"), "n=2"].startswith(f"{(0.45 - 0.40) / 0.6 * 100:+.2f} [")
    assert cells.loc[("a", "local_cpu", 6, "cosine"), "n=1"].startswith(f"{(0.1 - 0.5) / 0.6 * 100:+.2f} [")
    assert isinstance(cells.loc[("b", "local", 4, "cosine"), "n=2"], str) and len(cells) == 4


def test_the_figures_of_one_model_take_the_model_asked_for(tmp_path):
    """--model picks the one-model figures' model whatever the counts (the main job's by default, so that records
    brought back from a GPU with their statistics do not move the documented figures to another model); a model
    with no records is refused by name."""
    from experiments.figures import main_model
    from lp.report import figures

    recs = synthetic(tmp_path)  # five records of model "m", their statistics saved
    for i in range(6):
        r = record(2 + i % 3, "linearpatch", 20.0 + i, f"2026-02-0{i + 1}")
        write_json(recs / f"other{i}.json", {**r, "run_id": f"other-{i}", "model": "other", "interfaces": [[1, 3]],
                                             "calib_stats": str(tmp_path / "stats.pt")})
    assert {r["model"] for r in figures.load(recs)[0]} == {"other"}  # the most common
    records, df, stats, same = figures.load(recs, model="m")
    assert {r["model"] for r in records} == set(df["model"]) == {"m"} and stats is not None and len(same) == 5
    with pytest.raises(SystemExit, match="--model nothing: no complete records of that model.*'m', 'other'"):
        figures.load(recs, model="nothing")
    assert main_model() == "smollm2-135m"  # conf/config.yaml's default model, as its record names it
