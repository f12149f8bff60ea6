"""The report of a fine-tuning run set (lab/finetune.py): scores per router and task, paired
differences with the analysis plan's controls, Holm over the comparisons, finetune.md and
finetune.png, from finetune.json alone.

    python -m lab.finetune_report assets/lm_finetune_after_ec/finetune.json --out /tmp/report
        # re-derive finetune.md and finetune.png from the committed scores (nothing retrained)

The statistics are lab/stats.py's (paired t, the controls' rules, Holm, describe) and the
difference panels of the figure lab/compare.py's forest plot; run labels pair as in lab/compare
(compare.pair_labels: "ec2@c1 - top2@c1" is the ec2 - top2 pair at c = 1). What is particular to
fine-tuning is here: scores in % (higher is better: the opposite sign of a loss), several tasks
and their average (GLUE's average score), and wins per seed.

Controls (the rules are the analysis plan's, docs/analysis_plan.md: lab.stats positive_control and
null_control, applied to test scores)
    positive  "scratch": the same fine-tuning from a randomly initialised (train_tiny
              .init_weights, per seed) dense model. Pretrained dense must beat it, paired by
              seed: passes when pretrained dense scores higher and the 95% t interval of the
              paired differences excludes 0 (one seed: not judged). Where it does not,
              pretraining does not show on that task and the task cannot rank pretrained routers.
    null      top2_aa (same router and init as top2, pretrained on another data order) vs top2:
              must come out null; fails exactly when the 95% t interval of the paired
              differences excludes 0 (one test; one seed: not judged).
Comparisons (PAIRS, where both routers are present): per task and on the average, the mean
paired difference with its 95% t interval; the average's paired-t p-values are Holm-corrected
over the comparisons (one family, as the plan's).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lab import compare, stats
from lab.files import atomic_write, read_json, write_text

SCRATCH = "scratch"          # the positive control's pseudo-router: dense, never pretrained
PAIRS = (("ec1", "top1"), ("ec2", "top2"), ("ec2", "top2_dropless"), ("ec2", "dense"),
         ("ec1", "dense"), ("ec2", "top2_gshard"), ("cap2", "top2"), ("cap3", "top2"),
         ("top2", "dense"),
         ("et2", "ec2"), ("et2", "top2"), ("et1", "top1"), ("top2_lossfree", "top2_dropless"))  # issue 18
POSITIVE = ("dense", SCRATCH)      # pretrained dense - the same model never pretrained
NULL = ("top2_aa", "top2")
AVERAGE = "average"                # mean over the tasks of one run (GLUE's average score)
PLAN = f"rule of analysis plan v{stats.PLAN_VERSION}, docs/analysis_plan.md"   # the controls' rules
PAPER = "Paper, Table 2 (100M/32E, GLUE+SuperGLUE average): top-1 80.6, top-2 83.5, EC-CF2 85.0."


# ----------------------------------------------------------------------------------------------
# Analysis: per-router scores, paired differences, controls, Holm.


def scores_by(runs, split="test"):
    """runs -> {task: {router: {seed: score}}}, plus AVERAGE over tasks for runs that have
    every task."""
    by = {}
    for r in runs:
        by.setdefault(r["task"], {}).setdefault(r["router"], {})[r["seed"]] = r[split]
    tasks = list(by)
    if len(tasks) > 1:
        avg = {}
        for rt in {rt for t in tasks for rt in by[t]}:
            seeds = set.intersection(*[set(by[t].get(rt, {})) for t in tasks])
            if seeds:
                avg[rt] = {s: float(np.mean([by[t][rt][s] for t in tasks])) for s in seeds}
        by[AVERAGE] = avg
    return by


def paired_diff(a, b):
    """Challenger minus baseline scores ({seed: score} each), paired by seed -> dict with the
    per-seed differences, wins / ties / losses, and stats.paired_t of the differences (n, mean,
    95% t interval lo / hi, sd, two-sided p; lo, hi, sd and p are None with one seed)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    out = dict(seeds=seeds, per_seed=d, wins=sum(x > 0 for x in d), ties=sum(x == 0 for x in d),
               losses=sum(x < 0 for x in d))
    if seeds:
        out.update(stats.paired_t(d))
    return out


def analyse(res):
    """-> dict(tasks, routers, pairs, positive, null, verdict) from res['runs'] and res['tasks'].
    Each comparison's average entry also gets p_holm (Holm over the comparisons' average p)."""
    test, val = scores_by(res["runs"]), scores_by(res["runs"], "val")
    tasks = [t for t in res["tasks"] if t in test] + ([AVERAGE] if AVERAGE in test else [])
    order = [r for r in res["routers"] if any(r in test[t] for t in tasks)]
    routers = {t: {rt: dict(test=stats.paired_t(list(test[t][rt].values())),   # mean, t interval
                            val=stats.paired_t(list(val[t][rt].values())), per_seed=test[t][rt])
                   for rt in order if rt in test[t]} for t in tasks}

    def pair(a, b, role):
        by_task = {t: paired_diff(test[t][a], test[t][b]) for t in tasks
                   if a in test[t] and b in test[t]}
        seeds = sorted(set.intersection(*[set(by_task[t]["seeds"]) for t in by_task
                                          if t != AVERAGE])) if by_task else []
        per_seed = {s: sum(test[t][a][s] > test[t][b][s] for t in by_task if t != AVERAGE)
                    for s in seeds}
        n_tasks = len([t for t in by_task if t != AVERAGE])
        return dict(challenger=a, baseline=b, role=role, by_task=by_task, n_tasks=n_tasks,
                    wins_per_seed=per_seed,
                    wins_summary=stats.paired_t(list(per_seed.values())) if per_seed else None)

    pairs = [pair(a, b, "comparison") for a, b in compare.pair_labels(order, PAIRS)]
    positive = next((pair(a, b, "positive control")
                     for a, b in compare.pair_labels(order, [POSITIVE])), None)
    null = next((pair(a, b, "null control") for a, b in compare.pair_labels(order, [NULL])), None)
    # The analysis plan's control rules (lab/stats.py): True / False, None = one seed (not judged).
    if positive:          # the plan's rule is for losses (< 0 = better): scores flip the sign
        for t, d in positive["by_task"].items():
            d["passes"] = stats.positive_control([-x for x in d["per_seed"]])["passed"] \
                if d["per_seed"] else None
    if null:
        for t, d in null["by_task"].items():
            d["null_ok"] = stats.null_control(d["per_seed"])["passed"] if d["per_seed"] else None
    averages = [p["by_task"].get(AVERAGE) or {} for p in pairs]
    for d, ph in zip(averages, stats.holm([d.get("p") for d in averages])):
        if d:
            d["p_holm"] = ph
    a = dict(tasks=tasks, routers=routers, pairs=pairs, positive=positive, null=null)
    a["verdict"] = verdict(res, a)
    return a


def _ci(d, fmt="{:+.1f}"):
    """stats.describe of a paired difference, "-" where there is none."""
    return stats.describe(d, fmt) if d and "mean" in d else "-"


def _wins(p):
    if not p["wins_per_seed"]:
        return "-"
    counts = ", ".join(f"s{s}: {c}" for s, c in p["wins_per_seed"].items())
    return f"{p['wins_summary']['mean']:.1f} of {p['n_tasks']} tasks per seed ({counts})"


def _holm(d, n):
    """'; Holm p = 0.19 over the 6 comparisons' for an average entry with p_holm, else ''."""
    return "" if d.get("p_holm") is None else f"; Holm p = {d['p_holm']:.3g} over the {n} comparisons"


def verdict(res, a):
    """Plain sentences: controls first, then each comparison."""
    lines = []
    pos, null = a["positive"], a["null"]
    real = [t for t in a["tasks"] if t != AVERAGE]
    if pos:
        ok = [t for t in real if pos["by_task"].get(t, {}).get("passes")]
        unjudged = [t for t in real if t in pos["by_task"] and pos["by_task"][t]["passes"] is None]
        lines.append(f"Positive control (pretrained dense - scratch dense, test score; {PLAN}: "
                     "passes when pretrained dense scores higher and the 95% t interval of the "
                     "paired differences excludes 0): passes on "
                     f"{len(ok)} of {len(real)} tasks ({', '.join(ok) or 'none'})"
                     + (f", not judged on {', '.join(unjudged)} (one seed)" if unjudged else "")
                     + "; " + "; ".join(f"{t} {_ci(pos['by_task'][t])} pts" for t in a["tasks"]
                                        if t in pos["by_task"])
                     + ". Tasks where it fails cannot show an effect of pretraining.")
    else:
        lines.append("Positive control missing (needs dense and scratch runs).")
    if null:
        checked = [t for t in a["tasks"] if t in null["by_task"]]
        bad = [t for t in checked if null["by_task"][t]["null_ok"] is False]
        unjudged = [t for t in checked if null["by_task"][t]["null_ok"] is None]
        word = (f"INTERVAL EXCLUDES 0 on {', '.join(bad)}: differences of that size are noise"
                if bad else f"not judged on {', '.join(unjudged)} (one seed)" if unjudged else
                "no difference on any task, as it must")
        lines.append(f"Null control ({null['challenger']} - {null['baseline']}; {PLAN}: fails "
                     "exactly when the 95% t interval excludes 0): " + word + "; "
                     + "; ".join(f"{t} {_ci(d)} pts" for t, d in null["by_task"].items()) + ".")
    else:
        lines.append("Null control missing (needs top2 and top2_aa).")
    family = sum(1 for p in a["pairs"] if (p["by_task"].get(AVERAGE) or {}).get("p_holm") is not None)
    for p in a["pairs"]:
        avg = p["by_task"].get(AVERAGE)
        lines.append(f"{p['challenger']} - {p['baseline']}: "
                     + "; ".join(f"{t} {_ci(d)}" for t, d in p["by_task"].items())
                     + f" pts. {p['challenger']} scores higher on {_wins(p)}"
                     + ("" if not avg or avg.get("n", 0) < 2 else
                        " (average: interval " + ("excludes 0" if not avg["lo"] <= 0 <= avg["hi"]
                                                  else "includes 0") + _holm(avg, family) + ")"))
    return lines


# ----------------------------------------------------------------------------------------------
# Report: markdown and plot.


def rows_of(a):
    """[(role, pair)]: the controls, then the comparisons (the order of every table and panel)."""
    return ([("positive control", a["positive"])] if a["positive"] else []) + \
        ([("null control", a["null"])] if a["null"] else []) + [("", p) for p in a["pairs"]]


def markdown(res):
    a, suite = res["analysis"], res["suite"]
    pre = res["pretraining"]
    out = ["# Fine-tuning on a stdlib task suite (Zhou et al. 2022, Table 2 analogue)", "",
           f"Command: `{res['command']}`  ",
           f"Pretraining run: `{pre['run_dir']}` (`{pre['command']}`), arch {pre['arch']}  ",
           f"Hardware: {res['hardware']['summary']}; wall time {res['wall_time_s']:.0f} s "
           f"(sum over fine-tunings {res['finetune_time_sum_s']:.0f} s); seeds "
           f"{', '.join(map(str, res['seeds']))}  ",
           f"Recipe: {res['recipe']}", "", "## Verdict", ""]
    out += [f"- {line}" for line in a["verdict"]]
    out += ["", "## Tasks", "", f"Source: {suite['info']['source']}; {suite['info']['split']}. "
            f"Val files: {', '.join(suite['info']['files']['val'])}. Test files: "
            f"{', '.join(suite['info']['files']['test'])}.", "",
            "| task | kind | metric | train / val / test examples | prompt + answer tokens | "
            "majority baseline (test) | chance | test example |",
            "|---|---|---|---|---|---|---|---|"]
    for t in a["tasks"]:
        if t == AVERAGE:
            continue
        s = suite[t]
        ex = s["examples"][0] if s["examples"] else dict(text="", answer="")
        show = (ex["text"] + s["task"]["cue"]).replace("\n", "\\n").replace("|", "\\|")
        out.append(f"| {t} | {s['task']['kind']} | {s['task']['metric']} | "
                   f"{s['sizes']['train']} / {s['sizes']['val']} / {s['sizes']['test']} | "
                   f"{s['prompt_len']} + {s['answer_len']} | {s['baseline']['test']:.1f}% "
                   f"({s['baseline']['answer']!r}) | "
                   + (f"{s['chance']:.0f}%" if s["chance"] else "-")
                   + f" | `{show}` -> `{ex['answer']}` |")
    out += ["", "## Scores per router (test, %; mean over seeds [95% t interval]; val mean)", "",
            "| router | " + " | ".join(a["tasks"]) + " |",
            "|---|" + "---|" * len(a["tasks"])]
    base = {t: suite[t]["baseline"]["test"] for t in a["tasks"] if t != AVERAGE}
    out.append("| *majority baseline* | " + " | ".join(
        f"{base[t]:.1f}" if t in base else f"{np.mean(list(base.values())):.1f}"
        for t in a["tasks"]) + " |")
    for rt in res["routers"]:
        cells = []
        for t in a["tasks"]:
            row = a["routers"][t].get(rt)
            cells.append("-" if row is None else
                         f"{_ci(row['test'], '{:.1f}')} (val {row['val']['mean']:.1f})")
        out.append(f"| {rt} | " + " | ".join(cells) + " |")
    out += ["", "## Paired differences (challenger - baseline, test points; > 0: challenger "
            "better)", "",
            "Mean over seeds [95% t interval]; Holm p = the average's paired-t p-value, "
            "Holm-corrected over the comparisons (lab/stats.py); wins = tasks (not counting the "
            "average) on which the challenger scores higher, counted in each seed, then averaged.",
            "", "| pair | role | " + " | ".join(a["tasks"]) + " | Holm p (average) | wins per seed |",
            "|---|---|" + "---|" * len(a["tasks"]) + "---|---|"]
    for role, p in rows_of(a):
        ph = (p["by_task"].get(AVERAGE) or {}).get("p_holm")
        out.append(f"| {p['challenger']} - {p['baseline']} | {p['role']} | "
                   + " | ".join(_ci(p["by_task"].get(t)) for t in a["tasks"])
                   + f" | {'-' if ph is None else format(ph, '.3g')} | {_wins(p)} |")
    sps = [r["s_per_step"] for r in res["runs"]]
    out += ["", f"Fine-tuning speed: {np.mean(sps):.3f} s/step on average (min {min(sps):.3f}, "
            f"max {max(sps):.3f}); raw per-run scores and per-example correctness (one 0/1 "
            "character per example, in split order) in "
            f"finetune.json. {PAPER}"]
    return "\n".join(out) + "\n"


def plot(path, res):
    """Top: test score per router per task (mean, 95% t interval, the seeds as dots) with the
    majority baseline. Bottom, one panel per task: the paired differences challenger - baseline
    as lab/compare's forest plot (mean, 95% t interval; filled where it excludes 0, for the
    average where Holm over the comparisons resolves it; blue: challenger better)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    a = res["analysis"]
    tasks, rows = a["tasks"], rows_of(a)
    fig = plt.figure(figsize=(3.2 * len(tasks) + 2.5, 5 + 0.35 * len(rows)))
    grid = fig.add_gridspec(2, len(tasks), height_ratios=(4, 1 + 0.3 * len(rows)))
    for j, t in enumerate(tasks):
        ax = fig.add_subplot(grid[0, j])
        routers = list(a["routers"][t].items())
        for i, (rt, row) in enumerate(routers):
            m, lo, hi = row["test"]["mean"], row["test"]["lo"], row["test"]["hi"]
            err = [[0 if lo is None else m - lo], [0 if hi is None else hi - m]]   # 1 seed: none
            ax.errorbar([i], [m], yerr=err, fmt="o", capsize=3)
            ax.plot([i] * len(row["per_seed"]), list(row["per_seed"].values()), ".",
                    color="gray", alpha=0.5)
        if t != AVERAGE:
            ax.axhline(res["suite"][t]["baseline"]["test"], ls="--", color="black", lw=0.8,
                       label="majority baseline")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(routers)), [r for r, _ in routers], rotation=45, fontsize=7)
        ax.set_title(f"{t} (test, %)", fontsize=9)
        ax.grid(alpha=0.3)
    share = None
    for j, t in enumerate(tasks):
        bx = fig.add_subplot(grid[1, j], sharey=share)
        share = share or bx
        cells = [(role, p["by_task"].get(t)) for role, p in rows]
        cells = [(role, d if not d or d.get("p_holm") is None else
                  dict(d, resolved=d["p_holm"] < stats.ALPHA)) for role, d in cells]
        compare.forest(bx, cells, [f"{p['challenger']} - {p['baseline']}"
                                   + (f" ({role})" if role else "") for role, p in rows], better=1)
        bx.set_ylim(-0.5, len(rows) - 0.5)
        bx.tick_params(labelleft=j == 0, labelsize=7)
        bx.set_xlabel(f"{t}: challenger - baseline (points)", fontsize=8)
        bx.grid(axis="x", alpha=0.3)
    pre = res["pretraining"]
    fig.suptitle(f"fine-tuning of {pre['run_dir']} ({pre['arch']}), seeds "
                 f"{', '.join(map(str, res['seeds']))}: {res['recipe'][:110]}...\nbottom: paired "
                 "by seed, mean and 95% t interval; filled: excludes 0 (average: after Holm over "
                 "the comparisons); > 0: challenger better", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


def write(out, res):
    """finetune.md and finetune.png of res (its analysis recomputed) into out, atomically."""
    res["analysis"] = analyse(res)
    write_text(Path(out) / "finetune.md", markdown(res))
    plot(Path(out) / "finetune.png", res)
    return res


def main(argv=None):
    """Re-derive finetune.md and finetune.png from a finetune.json (the scores it holds)."""
    p = argparse.ArgumentParser(prog="python -m lab.finetune_report",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("finetune_json", help="a finetune.json (python -m lab.finetune RUN_DIR)")
    p.add_argument("--out", required=True, help="directory for finetune.md and finetune.png")
    args = p.parse_args(argv)
    try:
        res = read_json(args.finetune_json, "fine-tuning results", ("runs", "suite", "tasks"))
    except (OSError, ValueError) as e:
        p.error(f"finetune_json: {e}")
    write(args.out, res)
    print("\n".join(f"* {line}" for line in res["analysis"]["verdict"]))
    print(f"wrote {Path(args.out) / 'finetune.md'}, {Path(args.out) / 'finetune.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
