"""sweep.py: vary one train_tiny flag, train every value with paired seeds, tabulate the gap.

    python sweep.py --flag experts --values 8,16,32,64 --out assets/sweep_experts \\
        -- --routers top2,ec2 --seeds 0,1,2
    python sweep.py --out assets/sweep_experts --report-only        # tables/plot again

Each value runs `train_tiny.main([...the flags after --..., --FLAG VALUE, --out OUT/FLAG_VALUE,
--resume])`: the trainer itself, so an interrupted sweep continues where it stopped. The report
(OUT/sweep.json, sweep.md, sweep.png) gives, per value, each matched pair's paired final-loss
difference with its 95% t interval (compare.paired) and the positive control (MoE vs the dense
FFN). The dense model does not depend on the number of experts or on the routing group size, so
`--dense-from DIR` can take the dense runs of another run directory with the same seeds and
otherwise equal flags instead of training them again at every value.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import compare
import train_tiny


def point_dirs(out):
    """[(value, directory)] of a sweep, in the order they were run."""
    meta = json.loads((Path(out) / "sweep_meta.json").read_text())
    return meta, [(v, Path(out) / f"{meta['flag']}_{v}") for v in meta["values"]]


def report(out, dense_from=""):
    """Aggregate a sweep's run directories -> sweep.json, sweep.md, sweep.png in `out`."""
    meta, points = point_dirs(out)
    dense = compare.runs_by_router(compare.load(dense_from)).get("dense", {}) if dense_from else {}
    rows = []
    for value, d in points:
        res = compare.load(d)
        by = compare.runs_by_router(res)
        row = dict(value=value, dir=str(d), command=res["command"],
                   wall_time_s=res.get("wall_time_s"), train_time_s=res.get("train_time_sum_s"),
                   pairs={},
                   final_val={rt: res["analysis"]["routers"][rt]["final_val"]["mean"]
                              for rt in by},
                   s_per_step={rt: res["analysis"]["routers"][rt]["s_per_step"] for rt in by})
        for a, b in compare.PAIRS + (("ec2", "top2_leaky"),):
            if a in by and b in by:
                row["pairs"][f"{a} vs {b}"] = compare.paired(by[a], by[b])["final_diff"]
        base = by.get("dense") or dense
        if base is dense and dense:
            check_dense(by, dense, meta["flag"], d)
        for a in ("top2", "ec2"):
            if a in by and base:
                fd = compare.paired(by[a], base)["final_diff"]
                row["pairs"][f"{a} vs dense"] = fd
                row.setdefault("positive_control", dict(
                    pair=f"{a} vs dense", passed=compare.positive_control_passes(fd)))
        rows.append(row)
    summary = dict(meta, dense_from=dense_from, points=rows)
    train_tiny._write_json(Path(out) / "sweep.json", summary)
    train_tiny._atomic_write(Path(out) / "sweep.md",
                             lambda t: Path(t).write_text(sweep_markdown(summary)))
    sweep_plot(Path(out) / "sweep.png", summary)
    return summary


def check_dense(by, dense, flag, point):
    """--dense-from runs must be the same experiment as the sweep point apart from the swept
    flag (steps, batch, lr, corpus and code hashes, ...) and cover its seeds."""
    runs = [r for rt in ("top2", "ec2") for r in by.get(rt, {}).values()]
    missing = sorted({r["seed"] for r in runs} - set(dense))
    if missing:
        raise ValueError(f"--dense-from has no dense run for seed(s) {missing} of {point}")
    ref = next(iter(dense.values()))["config"]
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
           "interval]); negative = challenger better. Positive control: compare.py's rule (MoE "
           "better than dense, 95% CI excluding 0, |mean| >= 2 paired sd); where it fails, this "
           "setting does not show that experts help, so read that value's router comparison "
           "with care.", "",
           f"| {s['flag']} | " + " | ".join(names) + " | positive control | training s (sum of "
           "runs) | wall s |", "|---" * (len(names) + 4) + "|"]
    for r in s["points"]:
        cells = [compare._ci(r["pairs"][n]) if n in r["pairs"] else "-" for n in names]
        wall, train = r["wall_time_s"], r.get("train_time_s")
        pc = r.get("positive_control")
        out.append(f"| {r['value']} | " + " | ".join(cells) + " | "
                   + (("passes" if pc["passed"] else "FAILS") + f" ({pc['pair']})" if pc else "-")
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
        err = np.array([[p["mean"] - p["lo"] if math.isfinite(p["lo"]) else 0 for _, p in pts],
                        [p["hi"] - p["mean"] if math.isfinite(p["hi"]) else 0 for _, p in pts]])
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
    train_tiny._atomic_write(path, lambda t: fig.savefig(t, dpi=110, format="png"))
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        if flag not in {f.name for f in train_tiny.dataclasses.fields(train_tiny.Config)}:
            p.error(f"--flag: {args.flag!r} is not a train_tiny flag")
        values = [v.strip() for v in args.values.split(",") if v.strip()]
        out.mkdir(parents=True, exist_ok=True)
        meta = dict(flag=flag, values=values, train_args=train_args, out=str(out),
                    dense_from=args.dense_from)
        train_tiny._write_json(out / "sweep_meta.json", meta)
        for v in values:
            train_tiny.main(train_args + [f"--{flag.replace('_', '-')}", v,
                                          "--out", str(out / f"{flag}_{v}"), "--resume"])
    elif not (out / "sweep_meta.json").exists():
        p.error(f"--out: {out} holds no sweep (no sweep_meta.json)")
    dense_from = args.dense_from or point_dirs(out)[0].get("dense_from", "")
    try:
        s = report(out, dense_from)
    except ValueError as e:
        p.error(str(e))
    print(sweep_markdown(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
