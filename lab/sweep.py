"""Vary one train_tiny flag, train every value with paired seeds, tabulate the gap.

    python -m lab.sweep --flag experts --values 8,16,32,64 --out assets/sweep_experts \\
        -- --routers top2,ec2 --seeds 0,1,2
    python -m lab.sweep --flag capacity_factor --values 1,1.5,2 --out runs/sweep_c \\
        -- --routers top2,ec2,dense
    python -m lab.sweep --out assets/sweep_experts --report-only        # tables/plot again

Each value runs `train_tiny.main([...the flags after --..., --FLAG VALUE, --out OUT/FLAG_VALUE,
--resume])`: the trainer itself, so an interrupted sweep continues where it stopped. The report
(OUT/sweep.json, sweep.md, sweep.png) gives, per value, each matched pair's paired final-loss
difference with its 95% t interval and the positive control (MoE vs the dense FFN), all as
lab/compare.py's analysis computes them. The dense model does not depend on the number of
experts, the capacity factor or the routing group size, so `--dense-from DIR` can take the dense
runs of another run directory with the same seeds and otherwise equal flags instead of training
them again at every value.

Runs are named by their labels (moe/routers.py): with --flag capacity_factor the point at c = 1
trains "top2@c1" and "ec2@c1". Within a point every MoE router runs at the point's c, which the
row already states, so the report drops the "@cC" of a point's labels where the names stay
unique (each row's "labels" keeps the originals): the pairs are "ec2 vs top2" at every value.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import train_tiny
from lab import compare
from lab.files import atomic_write, read_json, write_json, write_text
from moe.routers import split


def point_dirs(out):
    """(sweep_meta, [(value, directory)]) of a sweep, in the order the values were run."""
    meta = read_json(Path(out) / "sweep_meta.json", "sweep file", ("flag", "values"))
    return meta, [(v, Path(out) / f"{meta['flag']}_{v}") for v in meta["values"]]


STAT = ("mean", "lo", "hi", "sd", "n")        # of a paired final-loss difference, kept per pair


def pairs_of(res):
    """{"challenger vs baseline": paired final-loss difference} of compare's analysis of res."""
    j = res["analysis"]["judgment"]
    return {f"{s['challenger']} vs {s['baseline']}": {k: s[k] for k in STAT} for s in j["pairs"]}


def unlabelled(res):
    """A point's results with the "@cC" of its labels dropped, where the names stay unique, and
    analysed again -> (results, {name: label} of the runs renamed)."""
    names = {r["router"]: split(r["router"])[0] for r in res["runs"]}   # label -> name
    renamed = {n: label for label, n in names.items() if n != label}
    if not renamed or len(set(names.values())) < len(names):
        return res, {}
    out = dict(res, runs=[dict(r, router=names[r["router"]]) for r in res["runs"]],
               routers=[names.get(x, x) for x in res.get("routers", names)])
    out["analysis"] = compare.analyse(out)
    return out, renamed


def versus_dense(res, router, dense_runs):
    """compare's positive control of `router` against the dense runs (paired by seed)."""
    runs = [r for r in res["runs"] if r["router"] == router] + dense_runs
    return compare.analyse(dict(res, runs=runs))["judgment"]["positive_control"]


def report(out, dense_from=""):
    """Aggregate a sweep's run directories -> sweep.json, sweep.md, sweep.png in `out`."""
    meta, points = point_dirs(out)
    borrowed = [r for r in compare.load(dense_from)["runs"] if r["router"] == "dense"] \
        if dense_from else []
    rows = []
    for value, d in points:
        res, labels = unlabelled(compare.load(d))
        a = res["analysis"]
        by = {r["router"] for r in res["runs"]}
        row = dict(value=value, dir=str(d), command=res["command"],
                   wall_time_s=res.get("wall_time_s"), train_time_s=res.get("train_time_sum_s"),
                   pairs={k: v for k, v in pairs_of(res).items() if not k.endswith(" vs dense")},
                   final_val={rt: a["routers"][rt]["final_val"]["mean"] for rt in a["routers"]},
                   s_per_step={rt: a["routers"][rt]["s_per_step"] for rt in a["routers"]},
                   labels=labels)
        dense = [r for r in res["runs"] if r["router"] == "dense"] or borrowed
        if dense is borrowed and borrowed:
            check_dense(res["runs"], borrowed, meta["flag"], d)
        for rt in ("top2", "ec2"):
            if rt in by and dense:
                pos = versus_dense(res, rt, dense)
                row["pairs"][f"{rt} vs dense"] = {k: pos[k] for k in STAT}
                row.setdefault("positive_control",
                               dict(pair=f"{rt} vs dense", passed=pos["passed"]))
        rows.append(row)
    summary = dict(meta, dense_from=dense_from, points=rows)
    write_json(Path(out) / "sweep.json", summary)
    write_text(Path(out) / "sweep.md", sweep_markdown(summary))
    sweep_plot(Path(out) / "sweep.png", summary)
    return summary


def check_dense(runs, dense, flag, point):
    """--dense-from runs must be the same experiment as the sweep point apart from the swept
    flag (steps, batch, lr, corpus and code hashes, ...) and cover its seeds."""
    runs = [r for r in runs if r["router"] in ("top2", "ec2")]
    missing = sorted({r["seed"] for r in runs} - {r["seed"] for r in dense})
    if missing:
        raise ValueError(f"--dense-from has no dense run for seed(s) {missing} of {point}")
    ref = dense[0]["config"]
    diff = sorted(k for r in runs for k in set(r["config"]) | set(ref)
                  if k != flag and r["config"].get(k) != ref.get(k))
    if diff:
        raise ValueError(f"--dense-from runs differ from {point} in {sorted(set(diff))}; they "
                         "must be the same experiment apart from --" + flag.replace("_", "-"))


def sweep_markdown(s):
    names = sorted({p for r in s["points"] for p in r["pairs"]})
    out = [f"Sweep of --{s['flag'].replace('_', '-')} over {s['values']}; command per value: "
           f"`python train_tiny.py {' '.join(s['train_args'])} --{s['flag'].replace('_', '-')} "
           f"VALUE --out {s['out']}/{s['flag']}_VALUE --resume`" + (
               f"; dense runs from {s['dense_from']}" if s["dense_from"] else ""), "",
           "Paired final-loss difference, challenger - baseline (mean over seeds [95% t "
           "interval]); negative = challenger better. Positive control: the analysis plan's "
           "rule (docs/analysis_plan.md: MoE better than dense and the 95% CI excludes 0); where "
           "it fails, this setting does not show that experts help, so read that value's router "
           "comparison with care. Intervals are unadjusted, 3 seeds: a sweep is exploratory, "
           "not part of a corrected family.", "",
           f"| {s['flag']} | " + " | ".join(names) + " | positive control | training s (sum of "
           "runs) | wall s |", "|---" * (len(names) + 4) + "|"]
    for r in s["points"]:
        cells = [interval(r["pairs"][n]) if n in r["pairs"] else "-" for n in names]
        wall, train = r["wall_time_s"], r.get("train_time_s")
        pc = r.get("positive_control")
        out.append(f"| {r['value']} | " + " | ".join(cells) + " | "
                   + ({True: "passes", False: "FAILS", None: "not judged (1 seed)"}[pc["passed"]]
                      + f" ({pc['pair']})" if pc else "-")
                   + " | " + (f"{train:.0f}" if train else "-") + " | "
                   + (f"{wall:.0f}" if wall and math.isfinite(wall) else "-") + " |")
    out += ["", "Wall s is the time of the train_tiny invocation at that value; a value whose runs "
            "were copied from another run directory (same config and code) shows only the "
            "seconds it took to read them."]
    out += ["", "Final validation loss per router (mean over seeds):", "",
            f"| {s['flag']} | router | final val | s/step |", "|---|---|---|---|"]
    for r in s["points"]:
        for rt, v in r["final_val"].items():
            out.append(f"| {r['value']} | {rt} | {v:.4f} | {r['s_per_step'][rt]:.3f} |")
    return "\n".join(out) + "\n"


def finite(x):
    return x is not None and math.isfinite(x)


def interval(stat, fmt="{:+.4f}"):
    """'mean [lo, hi]', or 'mean (1 seed: no interval)' (results files hold null for infinity)."""
    if not (finite(stat.get("lo")) and finite(stat.get("hi"))):
        return fmt.format(stat["mean"]) + f" ({stat.get('n', 1)} seed: no interval)"
    return f"{fmt.format(stat['mean'])} [{fmt.format(stat['lo'])}, {fmt.format(stat['hi'])}]"


def sweep_plot(path, s):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    names = sorted({p for r in s["points"] for p in r["pairs"]})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.arange(len(s["points"]))
    for i, n in enumerate(names):
        pts = [(j, r["pairs"][n]) for j, r in enumerate(s["points"]) if n in r["pairs"]]
        xs = np.array([j for j, _ in pts]) + (i - len(names) / 2) * 0.06
        m = np.array([p["mean"] for _, p in pts])
        err = np.array([[p["mean"] - p["lo"] if finite(p["lo"]) else 0 for _, p in pts],
                        [p["hi"] - p["mean"] if finite(p["hi"]) else 0 for _, p in pts]])
        ax.errorbar(xs, m, yerr=err, marker="o", capsize=3,
                    ls="--" if n.endswith("dense") else "-", label=n)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [f"{r['value']} (whole batch)" if s["flag"] == "group_size"
                      and str(r["value"]) == "0" else str(r["value"]) for r in s["points"]])
    ax.set(xlabel=f"--{s['flag'].replace('_', '-')}",
           ylabel="paired final-loss difference (95% t interval)",
           title="challenger - baseline; < 0: challenger better")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda t: fig.savefig(t, dpi=110, format="png"))
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    p = argparse.ArgumentParser(prog="python -m lab.sweep", description=__doc__.split("\n\n")[0],
                                epilog="Flags after -- go to train_tiny.py (python train_tiny.py "
                                "--help lists them).")
    p.add_argument("--flag", help="train_tiny flag to vary, e.g. experts, group_size, steps")
    p.add_argument("--values", help="comma list of values")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--dense-from", default="", help="run directory whose dense runs serve as "
                   "the positive control at every value (remembered for --report-only)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report")
    args = p.parse_args(own)
    out = Path(args.out)
    if not args.report_only:
        if not args.flag or not args.values:
            p.error("--flag and --values are required unless --report-only")
        flag = args.flag.replace("-", "_")
        if flag not in {f.name for f in dataclasses.fields(train_tiny.Config)}:
            p.error(f"--flag: {args.flag!r} is not a train_tiny flag")
        values = [v.strip() for v in args.values.split(",")]
        if "" in values or len(set(values)) < len(values):
            p.error(f"--values: {args.values!r} has an empty or a repeated value")
        meta = dict(flag=flag, values=values, train_args=train_args, out=str(out),
                    dense_from=args.dense_from)
        write_json(out / "sweep_meta.json", meta)
        for v in values:
            train_tiny.main(train_args + [f"--{flag.replace('_', '-')}", v,
                                          "--out", str(out / f"{flag}_{v}"), "--resume"])
    elif not (out / "sweep_meta.json").exists():
        p.error(f"--out: {out} holds no sweep (no sweep_meta.json)")
    try:
        dense_from = args.dense_from or point_dirs(out)[0].get("dense_from", "")
        s = report(out, dense_from)
    except ValueError as e:
        p.error(str(e))
    print(sweep_markdown(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
