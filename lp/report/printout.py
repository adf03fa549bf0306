"""The end-of-run printout: the run id, what was removed, perplexities, parameters and the per-task accuracy and
retention table (what README shows the main job printing)."""
from __future__ import annotations

from pathlib import Path


def summary(record: dict, path: Path) -> None:
    """The short end-of-run summary, on stdout (the rest goes to the log)."""
    ppl = record["ppl"]
    width = (record.get("fitted") or {}).get("width")
    layers = sorted(int(i) for i in width["layers"]) if width else []
    what = (f"narrowed layers {layers[0]}-{layers[-1]} by {width['ratio']:.2%}" if layers else
            f"removed {record['removed']}")
    print(f"[lp] {record['run_id']}\n     {what}  ppl dense {ppl['dense']:.2f}  "
          f"pruned {ppl['pruned']:.2f}  params {record['params_dense']:,} -> {record['params_pruned']:,}")
    if record["retention"]:
        print(format_table(record["zeroshot"]["dense"], record["zeroshot"]["pruned"], record["retention"]))
    print(f"     record: {path}")


def format_table(dense: dict, pruned: dict, rp: dict) -> str:
    m = rp["metric"]
    rows = [f"     {'task':<22}{'dense':>8}{'pruned':>8}{'RP %':>8}"]
    for t in dense:
        flag = "  (dense at chance)" if t in rp.get("at_chance", []) else ""
        task_rp = rp["per_task"][t]  # None where the dense model got none right
        rows.append(f"     {t:<22}{dense[t][m]:>8.4f}{pruned[t][m]:>8.4f}"
                    f"{'-' if task_rp is None else f'{task_rp:.2f}':>8}{flag}")
    err = f" ± {rp['rp_stderr']:.2f}" if "rp_stderr" in rp else ""
    if (rp.get("rp_ci") or {}).get("ci"):
        ci = rp["rp_ci"]
        err = f"  [{ci['ci'][0]:.2f}, {ci['ci'][1]:.2f}] ({100 * ci['level']:.0f}% paired bootstrap)"
    rows.append(f"     {'average (' + m + ')':<22}{rp['avg_dense']:>8.4f}{rp['avg_pruned']:>8.4f}{rp['rp']:>8.2f}{err}")
    if rp.get("at_chance"):
        rows.append(f"     RP rests on tasks where the dense model is at chance: {rp['at_chance']}")
    return "\n".join(rows)
