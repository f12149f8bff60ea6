"""The report of a train_tiny run set: verdict, tables and the figures, from its files alone.

    python -m lab.compare runs/tiny                 # verdict + tables of a (finished or partial) run
    python -m lab.compare runs/tiny --markdown      # the results.md text
    python -m lab.compare runs/tiny --plot out.png  # the figure of paired differences
    python -m lab.compare runs/tiny --curves out.png  # per-router validation-loss curves
    python -m lab.compare runs/tiny --write         # recompute the analysis into results.json/md/png

A run directory holds one JSON per (router, seed) under runs/ (train_tiny writes them as each run
finishes) and, once all are done, results.json. Everything here reads only those files. The
verdict is the analysis plan's (docs/analysis_plan.md, lab/stats.py: controls, paired t, Holm
over the family, MDE, steps to target); this file adds the pairing of run labels (moe/routers.py:
"ec2@c1 - top2@c1" is the plan's ec2 - top2 pair at c = 1), the per-router tables, the inference
section and the two figures: differences.png (the paired differences the verdict reads) and beside
it curves.png (each router's validation loss over training, the mean over seeds).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from ecmoe import expert_capacity
from lab import stats
from lab.files import atomic_write, read_json, write_json, write_text
from moe.routers import NULL_SUFFIX, ROUTERS, resolve, split
from moe.threshold import ExpertThresholdMoE

PAPER_FIG3 = dict(bins=["0", "1", "2", "3-4", ">4"], note="Fig. 3 (100M/64E, EC-CF2): most tokens "
                  "get 1-2 experts, 23% get 3-4, ~3% get >4")


# ----------------------------------------------------------------------------------------------
# Analysis of one run set (the dict train_tiny writes as results.json).


def analyse(res):
    """-> dict(judgment, verdict, noise, routers, inference): every statistic of the run set."""
    by = stats.runs_by_router(res)
    last = [np.asarray(r["val_batch_loss"][-1]) for r in res["runs"] if "val_batch_loss" in r]
    noise = dict(point_se=float(np.mean([x.std(ddof=1) / math.sqrt(len(x)) for x in last]))
                 if last and len(last[0]) > 1 else None,
                 seed_sd={rt: float(np.std([r["final_val"] for r in runs.values()], ddof=1))
                          for rt, runs in by.items()
                          if len(runs) > 1 and all(r["final_val"] is not None for r in runs.values())})
    judgment = judge(res)
    return dict(judgment=judgment, verdict=verdict(res, judgment), noise=noise,
                routers={rt: router_summary(runs) for rt, runs in by.items()},
                inference={rt: inference_summary(runs, res) for rt, runs in by.items()
                           if all("inference" in r for r in runs.values())})


def pair_labels(labels, pairs):
    """[(challenger label, baseline label)] for each (challenger, baseline) of `pairs` (router
    names) that the run labels hold at one capacity factor: two labels with the same "@c" suffix
    ("ec2@c1", "top2@c1" are the ec2 - top2 pair at c = 1), or one of a router without a c
    (dense: moe.routers.resolve). A label that is no router name (fine-tuning's "scratch") pairs
    by its name alone. In the order of `pairs`, then of `labels`."""
    def no_c(label):
        try:
            return resolve(label).capacity_factor is None
        except ValueError:
            return False
    stem = {label: split(label)[0] for label in labels}
    return [(a, b) for x, y in pairs for a in labels if stem[a] == x for b in labels
            if stem[b] == y and (a[len(x):] == b[len(y):] or no_c(a) or no_c(b))]


def judged_names(labels):
    """{run label: the router name stats.judge reads it as}, and a note (None if all pair).

    The plan's pairs name routers ("ec2", "top2"); a label carries "@cC" when the run's capacity
    factor C differs from the router table's (moe.routers.resolve). Labels lose the suffix, so
    that "ec2@c1" and "top2@c1" are judged as the plan's ec2 - top2 pair, when every pair the plan
    could form then joins two labels of the same suffix (a router without a c, dense, joins any)
    and no two labels become one name. One train_tiny run set trains every router at one c, so
    this always holds there. Otherwise (labels at several c) every label stays as it is: only runs
    at the table's c pair, and the note says so."""
    stem = {label: split(label)[0] for label in labels}
    suffix = {label: label[len(stem[label]):] for label in labels}
    if not any(suffix.values()):
        return {label: label for label in labels}, None
    by_stem = {stem[label]: label for label in labels}
    pairs = [*stats.COMPARISONS, *stats.POSITIVE_CONTROLS,
             *((s, s[:-len(NULL_SUFFIX)]) for s in by_stem if s.endswith(NULL_SUFFIX))]
    mixed = [f"{by_stem[a]} - {by_stem[b]}" for a, b in pairs if a in by_stem and b in by_stem
             and suffix[by_stem[a]] != suffix[by_stem[b]]
             and None not in (resolve(by_stem[a]).capacity_factor, resolve(by_stem[b]).capacity_factor)]
    if len(by_stem) == len(labels) and not mixed:
        return stem, None
    return {label: label for label in labels}, (
        f"runs at several capacity factors ({', '.join(sorted(x for x in labels if suffix[x]))}): only "
        "runs at the router table's c are paired; judge each c in a run set of its own")


def relabel(x, names):
    """x (a judgment: dicts, lists, strings) with every router name of `names` {name: label}
    written as its label, as a whole word ("top2" in "top2's", not in "top2_aa")."""
    if not names:
        return x
    word = re.compile(r"(?<![\w@])(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
                      + r")(?![\w@])")

    def walk(v):
        if isinstance(v, str):
            return word.sub(lambda m: names[m.group(1)], v)
        if isinstance(v, dict):
            return {k: walk(w) for k, w in v.items()}
        if isinstance(v, list):
            return [walk(w) for w in v]
        return v
    return walk(x)


def judge(res):
    """stats.judge(res) with the pairing rule of run labels (judged_names): "ec2@c1 - top2@c1" is
    judged as the plan's ec2 - top2 pair, and the judgment names the labels. A run set without
    "@c" labels is judged exactly as stats.judge judges it. The paper's 2x claim is about c = 2:
    it is not read for a pair at another c."""
    names, note = judged_names(sorted({r["router"] for r in res["runs"]}))
    renamed = dict(res, runs=[dict(r, router=names[r["router"]]) for r in res["runs"]])
    j = relabel(stats.judge(renamed), {n: label for label, n in names.items() if n != label})
    claim = j["claim_2x"]
    if claim and claim["pair"] != " - ".join(stats.CLAIM_PAIR):
        j["notes"].append(f"the paper's 2x claim is about {' - '.join(stats.CLAIM_PAIR)} at the "
                          f"table's c: not read for {claim['pair']}")
        j["claim_2x"] = None
    if note:
        j["notes"].append(note)
    return j


def verdict(res, j):
    """Plain sentences, the headline first: could this run set see a difference, then what it saw."""
    if res["config"].get("dry_run"):
        return ["Dry run (a few steps of a tiny model): the numbers test the plumbing, no verdict."]
    word = {True: "passed", False: "FAILED", None: "not judged (one seed)"}
    pc = j["positive_control"]
    lines = [f"Positive control {pc['pair']} = {stats.describe(pc)}: {word[pc['passed']]}."
             if pc else "No positive control (dense and top2 or ec2) in this run set."]
    lines += [f"Null control {s['pair']} = {stats.describe(s)}: {word[s['passed']]}."
              for s in j["null_controls"]]
    if not j["interpretable"]:
        lines.append(f"INCONCLUSIVE: {j['why']}; the pairs below cannot be read as router results.")
    lines += [s["sentence"] for s in j["pairs"]]
    if j["claim_2x"]:
        lines.append(j["claim_2x"]["sentence"])
    return lines + [f"Note: {n}" for n in j["notes"]] + [
        f"Judged under analysis plan v{j['plan_version']} (docs/analysis_plan.md): Holm over "
        f"{len(j['family'])} pair(s), alpha {j['alpha']}."]


def inference_summary(runs, res):
    """The train/inference gap of one router over its seeds: validation loss at batch size 1,
    routed as it would be deployed (expert choice: threshold routing; token choice, expert
    threshold and dense: as in training), minus the trained model's validation loss at the
    training batch size.

    -> dict(gap=stats.paired_t dict with min/max, deployed=, plus for expert choice the naive gap
    of group routing at batch size 1, the largest |threshold_B - threshold_1|, and per layer the
    loads of threshold routing relative to the training bucket k/n)."""
    runs = [runs[s] for s in sorted(runs)]
    inf = [r["inference"] for r in runs]
    if any(i["group_1"] is None for i in inf):      # capped EC: cannot run at batch size 1
        return dict(seeds=[r["seed"] for r in runs], error=inf[0].get("error", "?"))
    ec = "threshold_1" in inf[0]
    deployed = [i["threshold_1" if ec else "group_1"] for i in inf]
    gaps = [d - r["final_val"] for d, r in zip(deployed, runs)]
    et = resolve(runs[0]["router"]).layer is ExpertThresholdMoE   # trained with its thresholds
    out = dict(seeds=[r["seed"] for r in runs],
               routing="threshold" if ec else "threshold, as trained" if et else "group",
               trained=float(np.mean([r["final_val"] for r in runs])),
               deployed=float(np.mean(deployed)),
               gap=dict(stats.paired_t(gaps), min=float(min(gaps)), max=float(max(gaps)),
                        per_seed=gaps))
    if not ec:
        return out
    naive = [i["group_1"] - r["final_val"] for i, r in zip(inf, runs)]
    out["naive_group_1_gap"] = dict(mean=float(np.mean(naive)), min=float(min(naive)),
                                    max=float(max(naive)))
    out["threshold_B_vs_1"] = float(max(abs(i["threshold_B"] - i["threshold_1"]) for i in inf))
    c = resolve(runs[0]["router"], runs[0]["config"].get("capacity_factor")).capacity_factor
    groups = {stack: n for stack, _, n in res.get("routing_groups", [])}
    loads = {}
    for layer in inf[0]["threshold_loads"]:
        n = groups.get("encoder" if layer.startswith("enc") else "decoder", groups.get("lm"))
        L = np.array([i["threshold_loads"][layer]["expert_load"] for i in inf])   # [seeds, e]
        e = L.shape[1]
        bucket = expert_capacity(n, e, c) / n if n else c / e   # training: k / n each
        loads[layer] = dict(
            bucket=bucket, experts_per_token=float(L.sum(1).mean()),
            trained_experts_per_token=bucket * e,
            max_over_bucket=float((L.max(1) / bucket).mean()),
            min_over_bucket=float((L.min(1) / bucket).mean()),
            over_bucket=float((L > bucket).mean()), idle=float((L < 0.1 * bucket).mean()),
            bins=np.mean([i["threshold_loads"][layer]["experts_per_token"] for i in inf],
                         0).tolist())
    out["loads"] = loads
    return out


def router_summary(runs):
    runs = list(runs.values())
    finals = [r["final_val"] for r in runs if r["final_val"] is not None] or [math.nan]  # None: diverged
    stats = {}
    for n in runs[0]["moe_layers"]:      # mean over seeds of each layer's routing statistics
        keys = [k for k in runs[0]["stats"][n] if k != "experts_per_token"]
        stats[n] = dict(experts_per_token=np.mean([r["stats"][n]["experts_per_token"]
                                                   for r in runs], 0).tolist(),
                        **{k: float(np.mean([r["stats"][n][k] for r in runs])) for k in keys})
    return dict(final_val=dict(mean=float(np.mean(finals)), min=float(np.min(finals)),
                               max=float(np.max(finals))),
                s_per_step=float(np.mean([r["s_per_step"] for r in runs])),
                tokens_per_s=float(np.mean([r["tokens_per_s"] for r in runs])),
                n_params=runs[0]["n_params"], seeds=sorted(r["seed"] for r in runs), stats=stats)


# ----------------------------------------------------------------------------------------------
# Tables and plots.


def _header(res):
    cfg = res["config"]
    model = (f"decoder-only byte LM, {cfg['dec_layers']} layers" if cfg["arch"] == "lm" else
             f"T5 encoder-decoder, {cfg['enc_layers']}+{cfg['dec_layers']} layers, decoder "
             f"router: {cfg['decoder_router']}")
    groups = ", ".join(f"{s}: {g} groups of n={n}" for s, g, n in res.get("routing_groups", []))
    return [f"Command: `{res['command']}`  ",
            f"Hardware: {res['hardware']['summary']}; wall time {res['wall_time_s']:.0f} s "
            f"(sum of training time {res['train_time_sum_s']:.0f} s); seeds {cfg['seeds']}; "
            f"{cfg['steps']} steps of {res.get('tokens_per_batch', '?')} target tokens  ",
            f"Corpus: {res['corpus']['source']}, {res['corpus']['total_bytes']:,} bytes, sha256 "
            f"{res['corpus']['sha256'][:16]}...  ",
            f"Model: {model}, d={cfg['d_model']}, d_ff={cfg['d_ff']}, every other FFN MoE, "
            f"{cfg['experts']} experts; routing: {groups}  "] + (
                [f"Statistics: {res['analysis_by']}  "] if res.get("analysis_by") else [])


def markdown(res):
    a = res["analysis"]
    out = _header(res) + ["", "## Verdict", ""] + [f"- {line}" for line in a["verdict"]]
    noise = a["noise"]
    out += ["", "## Paired differences (challenger - baseline; negative = challenger better)", "",
            "Final validation loss difference over seeds [95% t interval], paired-t p and Holm p "
            "over the family, MDE = the smallest true difference found with 80% power. Steps to "
            "target: steps the challenger needs to reach the baseline's fitted loss at 50% / 75% / "
            "100% of the baseline's steps, over those steps (< 1 = faster; read both ways round, "
            "only where the curves still fall; docs/analysis_plan.md).", ""]
    table = stats.markdown(a["judgment"]).rstrip("\n").split("\n")
    out += table[next(i for i, line in enumerate(table) if line.startswith("| pair")):]
    if noise["point_se"] is not None:
        out += ["", f"Validation noise: one validation point (mean over "
                f"{res['config']['val_batches']} fixed batches) has a standard error of "
                f"{noise['point_se']:.4f}. Seed-to-seed sd of the final loss: "
                + ", ".join(f"{rt} {v:.4f}" for rt, v in noise["seed_sd"].items()) + "."]
    out += ["", "## Per router", "",
            "| router | final val loss mean (min-max) | s/step | target tokens/s | params | "
            "experts/token 0/1/2/3-4/>4 (mean of MoE layers) | TC drops | load max/mean |",
            "|---|---|---|---|---|---|---|---|"]
    for rt, row in a["routers"].items():
        fv, st = row["final_val"], list(row["stats"].values())
        if st:
            ept = "/".join(f"{100 * v:.0f}%" for v in np.mean([x["experts_per_token"]
                                                                for x in st], 0))
            drops = f"{100 * np.mean([x['dropped_fraction'] for x in st]):.1f}%"
            load = f"{np.mean([x['load_max_over_mean'] for x in st]):.2f}"
        else:
            ept = drops = load = "-"
        out.append(f"| {rt} | {fv['mean']:.4f} ({fv['min']:.4f}-{fv['max']:.4f}) | "
                   f"{row['s_per_step']:.3f} | {row['tokens_per_s']:.0f} | {row['n_params']:,} | "
                   f"{ept} | {drops} | {load} |")
    out += ["", "Routing statistics per MoE layer, mean over training steps and seeds "
            "(experts/token bins as in the paper's Fig. 3; " + PAPER_FIG3["note"] + "):", "",
            "| router | layer | experts/token 0 / 1 / 2 / 3-4 / >4 | unrouted | TC dropped | "
            "load max/mean | overflow |", "|---|---|---|---|---|---|---|"]
    for rt, row in a["routers"].items():
        for layer, x in row["stats"].items():
            ept = " / ".join(f"{100 * v:.1f}%" for v in x["experts_per_token"])
            out.append(f"| {rt} | {layer} | {ept} | {100 * x['unrouted_fraction']:.1f}% | "
                       f"{100 * x['dropped_fraction']:.1f}% | {x['load_max_over_mean']:.2f} | "
                       f"{100 * x['overflow_fraction']:.1f}% |")
    out += inference_markdown(res) + samples_markdown(res)
    out += ["", "Step ratios come from isotonic fits of validation curves taken every "
            f"{res['config']['eval_every']} steps; s/step is training time only, measured while "
            "other runs shared the machine."]
    return "\n".join(out) + "\n"


def inference_markdown(res):
    """The section on batch-size-1 inference (train_tiny runs that measured it)."""
    inf = res["analysis"].get("inference") or {}
    if not inf:
        return []
    out = ["", "## Inference at batch size 1: the train/inference gap", "",
           "Validation loss of the same fixed sequences fed ONE at a time, routed as the model "
           "would be deployed (expert choice: threshold routing with the thresholds learned in "
           "training; token choice, expert threshold (et*) and dense: as in training, so their "
           "gap measures only the batch size), minus the validation loss at the "
           "training batch size (group routing). Mean over seeds [95% t interval] (min to max). "
           "Naive = expert choice left in group routing at batch size 1 (every expert takes "
           "every token).", "",
           "| router | routing at batch 1 | seeds | trained loss | loss at batch 1 | gap [95% CI] "
           "(min to max) | naive EC gap | threshold batch B vs 1 |", "|---|---|---|---|---|---|---|---|"]
    for rt, x in inf.items():
        if "error" in x:
            out.append(f"| {rt} | - | {len(x['seeds'])} | - | - | cannot run at batch size 1: "
                       f"{x['error'].split(':')[0]} | - | - |")
            continue
        g = x["gap"]
        naive = x.get("naive_group_1_gap")
        out.append(f"| {rt} | {x['routing']} | {len(x['seeds'])} | {x['trained']:.4f} | "
                   f"{x['deployed']:.4f} | {stats.describe(g)} ({g['min']:+.4f} to {g['max']:+.4f}) | "
                   + (f"{naive['mean']:+.3f} ({naive['min']:+.3f} to {naive['max']:+.3f})"
                      if naive else "-") + " | "
                   + (f"{x['threshold_B_vs_1']:.1e}" if "threshold_B_vs_1" in x else "-") + " |")
    rows = [(rt, layer, v) for rt, x in inf.items() for layer, v in x.get("loads", {}).items()]
    if rows:
        out += ["", "Expert loads under threshold routing at batch size 1 (fraction of tokens an "
                "expert takes, relative to its training bucket k/n; mean over seeds):", "",
                "| router | layer | experts/token (training) | busiest expert / bucket | "
                "idlest / bucket | experts over bucket | idle (< 0.1 bucket) | experts/token "
                "0 / 1 / 2 / 3-4 / >4 |", "|---|---|---|---|---|---|---|---|"]
        for rt, layer, v in rows:
            out.append(f"| {rt} | {layer} | {v['experts_per_token']:.2f} "
                       f"({v['trained_experts_per_token']:.2f}) | {v['max_over_bucket']:.2f} | "
                       f"{v['min_over_bucket']:.2f} | {100 * v['over_bucket']:.0f}% | "
                       f"{100 * v['idle']:.0f}% | "
                       + " / ".join(f"{100 * b:.1f}%" for b in v["bins"]) + " |")
    return out


def samples_markdown(res):
    """Greedy samples at batch size 1 (train_tiny --sample), if the directory has them."""
    smp = res.get("samples")
    if not smp:
        return []
    out = ["", "## Samples at batch size 1", "", f"`{smp['command']}`: {smp['how']}", ""]
    for i, prompt in enumerate(smp["prompts"]):
        out += [f"Prompt {i + 1}: `{prompt}`", "", "| router | routing | continuation |",
                "|---|---|---|"]
        for rt, x in smp["by_router"].items():
            text = x["texts"][i].replace("|", "\\|").replace("`", "'")
            out.append(f"| {rt} | {x['routing']} | `{text}` |")
        out.append("")
    return out


def console_summary(res):
    """Plain text for a terminal or a log (no width limit): the verdict and a short table."""
    a = res["analysis"]
    lines = ["", "router          final val (mean, min-max)     s/step"]
    for rt, row in a["routers"].items():
        fv = row["final_val"]
        lines.append(f"{rt:<15} {fv['mean']:.4f} ({fv['min']:.4f}-{fv['max']:.4f})   "
                     f"{row['s_per_step']:.3f}")
    return "\n".join(lines + [""] + [f"* {v}" for v in a["verdict"]])


def plot_label(role, s):
    """'positive control: passed (5 seeds)' / 'not resolved, Holm p 0.25 (5 seeds)'."""
    if role:
        return f"{role}: " + {True: "passed", False: "FAILED", None: "one seed"}[s["passed"]] + f" ({s['n']} seeds)"
    holm = "" if s.get("p_holm") is None else f", Holm p {s['p_holm']:.2g}"
    return ("resolved" if s["resolved"] else "not resolved") + holm + f" ({s['n']} seeds)"


def forest(ax, rows, labels, better=-1):
    """Paired differences as a forest plot on ax, rows top to bottom: rows [(role, s)], s a
    stats.paired_t dict (mean, lo, hi; may carry mde and resolved) or None (an empty row); labels
    [text] for the y axis, one per row. Each s is its mean with the 95% interval: filled when
    resolved (s["resolved"], after Holm) or, for an s without that key, when the interval excludes
    0; the grey bar is +-MDE where s has one. Controls (role != "") grey; pairs blue where the
    challenger is better (the sign of `better`: -1 for losses, +1 for scores), red where worse."""
    for i, (role, s) in enumerate(rows):
        if not s or "mean" not in s:
            continue
        y = len(rows) - 1 - i
        color = "tab:gray" if role else ("tab:blue" if s["mean"] * better > 0 else "tab:red")
        if s.get("mde"):
            ax.plot([-s["mde"], s["mde"]], [y, y], color="0.85", lw=9, solid_capstyle="butt")
        if s["lo"] is not None:
            ax.plot([s["lo"], s["hi"]], [y, y], color=color, lw=2)
        excludes_0 = s["lo"] is not None and not s["lo"] <= 0 <= s["hi"]
        ax.plot(s["mean"], y, "o", ms=8, color=color,
                mfc=color if (s["resolved"] if "resolved" in s else excludes_0) else "white")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), list(reversed(labels)), fontsize=8)


def plot(path, res):
    """What the verdict says, at a glance. Left: each pair's final-loss difference, challenger -
    baseline paired by seed, with its 95% interval (filled: resolved after Holm; the grey bar is
    +-MDE, what could still hide). Right: the same differences over training, one small panel per
    pair, with the 95% t band and the zero line. Controls first, in the same style."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    j, by = res["analysis"]["judgment"], stats.runs_by_router(res)
    rows = ([("positive control", j["positive_control"])] if j["positive_control"] else []) + \
        [("null control", s) for s in j["null_controls"]] + [("", s) for s in j["pairs"]]
    if not rows:
        return
    fig = plt.figure(figsize=(12, 1.0 + 1.1 * len(rows)))
    grid = fig.add_gridspec(len(rows), 2, width_ratios=(1.1, 1), hspace=0.35, wspace=0.25)
    ax = fig.add_subplot(grid[:, 0])
    forest(ax, rows, [f"{s['pair']}\n{plot_label(role, s)}" for role, s in rows])
    ax.set(xlabel="final validation loss, challenger - baseline (nats; < 0: challenger better)",
           title="mean, 95% CI (filled: excludes 0, after Holm for the\nfamily); grey: +-MDE, "
                 "what could still hide at 80% power")
    ax.grid(axis="x", alpha=0.3)
    share = None
    for i, (role, s) in enumerate(rows):
        bx = fig.add_subplot(grid[i, 1], sharex=share, sharey=share)
        share = share or bx
        A, B = by[s["challenger"]], by[s["baseline"]]
        if len({tuple(A[x]["val_step"]) for x in s["seeds"]} | {tuple(B[x]["val_step"]) for x in s["seeds"]}) == 1:
            steps = A[s["seeds"][0]]["val_step"]
            D = np.subtract([A[x]["val_loss"] for x in s["seeds"]], [B[x]["val_loss"] for x in s["seeds"]])
            band = [stats.paired_t(D[:, t]) for t in range(D.shape[1])]  # [evals]
            bx.plot(steps, D.mean(0), color="tab:gray" if role else "tab:purple", lw=1.2)
            if band[0]["lo"] is not None:
                bx.fill_between(steps, [b["lo"] for b in band], [b["hi"] for b in band], alpha=0.25,
                                color="tab:gray" if role else "tab:purple")
        bx.axhline(0, color="black", lw=0.8)
        bx.text(0.01, 0.95, s["pair"], transform=bx.transAxes, fontsize=7, va="top")
        bx.tick_params(labelsize=7)
        bx.grid(alpha=0.3)
        if i == 0:
            bx.set_title("the same difference over training (95% t band)", fontsize=9)
        if i < len(rows) - 1:
            bx.tick_params(labelbottom=False)
    bx.set_xlabel("training step", fontsize=8)
    # one symmetric scale for every small panel, set by the late part of the curves (the first
    # validations, where every run is far from converged, would squash the rest)
    late = [abs(v) for ax_ in fig.axes[1:] for line in ax_.get_lines()[:1]
            for v in line.get_ydata()[len(line.get_ydata()) // 4:]]
    if late and np.isfinite(late).all():
        share.set_ylim(-1.5 * max(late) - 1e-3, 1.5 * max(late) + 1e-3)
    cfg = res["config"]
    fig.suptitle(f"{cfg['arch']}, {cfg['steps']} steps, seeds {cfg['seeds']}: challenger - baseline, "
                 f"analysis plan v{j['plan_version']}", fontsize=10)
    atomic_write(path, lambda t: fig.savefig(t, dpi=110, format="png", bbox_inches="tight"))
    plt.close(fig)


def colour(base):
    """One colour per router of the table, the same in every figure (dense black, unknown grey)."""
    import matplotlib.pyplot as plt
    moe = [r for r in ROUTERS if ROUTERS[r].layer is not None]
    if base not in moe:
        return "black" if base == "dense" else "tab:gray"
    k = moe.index(base)
    extra = ("deeppink", "darkgoldenrod", "navy")               # beyond tab10's ten colours
    return plt.get_cmap("tab10")(k) if k < 10 else extra[(k - 10) % len(extra)]


def draw_curves(res, full, late=None):
    """Each router's validation loss over training, drawn on the matplotlib axes `full` (all of
    training) and `late` (the second half, on its own scale, where the routers separate): the mean
    over its seeds (line) and the range of its seeds, min to max (band: where the seeds lie, not a
    confidence interval; the paired differences and their intervals are in differences.png).
    Dense black, A/A controls (ROUTER_aa) dashed; a seed without a finite curve (a diverged run)
    is left out and the legend counts the seeds drawn. No backend change, no file (a notebook
    calls it too). -> whether anything was drawn."""
    by = stats.runs_by_router(res)
    last = max((r["val_step"][-1] for r in res["runs"] if r.get("val_step")), default=0)
    window = []
    for rt, runs in by.items():
        ok = [r for r in runs.values() if r.get("val_loss") and all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in r["val_loss"])]
        steps = sorted(set.intersection(*[set(r["val_step"]) for r in ok])) if ok else []
        if not steps:
            continue
        L = np.array([[dict(zip(r["val_step"], r["val_loss"]))[t] for t in steps] for r in ok])
        mean, lo, hi = L.mean(0), L.min(0), L.max(0)                     # over seeds, [evals]
        stem, base = split(rt)[:2]
        style = dict(color=colour(base), ls="--" if stem.endswith(NULL_SUFFIX) else "-", lw=1.3)
        half = np.asarray(steps) >= last / 2
        for ax, keep in ((full, slice(None)), (late, half)):
            if ax is None:
                continue
            x = np.asarray(steps)[keep]
            ax.plot(x, mean[keep], label=f"{rt} ({len(ok)} seeds)", **style)
            ax.fill_between(x, lo[keep], hi[keep], color=style["color"], alpha=0.12, lw=0)
        window += [lo[half].min(), hi[half].max()] if half.any() else []
    if not window:
        return False
    full.set(xlabel="training step", ylabel="validation loss (nats per byte)",
             title="all of training")
    full.grid(alpha=0.3)
    if late is not None:
        pad = 0.05 * (max(window) - min(window)) + 1e-4
        late.set_ylim(min(window) - pad, max(window) + pad)
        late.set(xlabel="training step", title=f"second half (steps >= {last / 2:g})")
        late.grid(alpha=0.3)
        late.legend(fontsize=7, loc="upper right")
    return True


def curves(path, res):
    """curves.png beside differences.png: draw_curves on two panels, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg = res["config"]
    fig, (full, late) = plt.subplots(1, 2, figsize=(12, 4.8))
    if draw_curves(res, full, late):
        fig.suptitle(f"{cfg['arch']}, {cfg['steps']} steps, seeds {cfg['seeds']}: validation loss "
                     "per router; line: mean over seeds, band: min to max over seeds (not an "
                     "interval)", fontsize=10)
        fig.tight_layout()
        atomic_write(path, lambda t: fig.savefig(t, dpi=110, format="png", bbox_inches="tight"))
    plt.close(fig)


def load(run_dir):
    """A train_tiny --out directory -> the results dict, analysis recomputed. Uses results.json
    when present, else assembles the finished per-run files of a partial run."""
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if path.exists():
        res = read_json(path, "results file")
    else:
        runs = [read_json(p) for p in sorted((run_dir / "runs").glob("*.json"))]
        if not runs:
            raise FileNotFoundError(f"{run_dir}: no results.json and no runs/*.json")
        seeds = sorted({r["seed"] for r in runs})
        cfg = dict(runs[0]["config"], seeds=",".join(map(str, seeds)))
        res = dict(command=f"(partial run in {run_dir})", config=cfg, runs=runs,
                   seeds=seeds,
                   routers=sorted({r["router"] for r in runs}), corpus=dict(
                       source="?", total_bytes=0, sha256=runs[0]["config"].get("corpus_sha256",
                                                                                "?")),
                   hardware=dict(summary="?"), wall_time_s=math.nan,
                   train_time_sum_s=sum(r["train_time"] for r in runs))
    res["analysis"] = analyse(res)
    return res


def merge(run_dirs):
    """Several run directories of ONE experiment (the same config but the seeds, e.g. more seeds
    added later) -> one results dict (analysis recomputed). ValueError if the configs differ or a
    (router, seed) appears twice. Each part's command, hardware and wall time are kept."""
    parts = [load(d) for d in run_dirs]
    run_only = ("seeds", "routers", "out", "workers", "threads", "resume", "stop_after", "preset")
    for d, p in zip(run_dirs[1:], parts[1:]):  # flags both know (a newer trainer may add some)
        keys = (parts[0]["config"].keys() & p["config"].keys()) - set(run_only)
        diff = sorted(k for k in keys if p["config"][k] != parts[0]["config"][k])
        if diff:
            raise ValueError(f"{d}: config differs from {run_dirs[0]} in {diff}")
    runs = [dict(r, part=i) for i, p in enumerate(parts) for r in p["runs"]]
    seen = [(r["router"], r["seed"]) for r in runs]
    if len(set(seen)) < len(seen):
        raise ValueError(f"a (router, seed) appears in two parts: {sorted({x for x in seen if seen.count(x) > 1})}")
    seeds = sorted({r["seed"] for r in runs})
    res = dict(parts[0], runs=runs, seeds=seeds, config=dict(parts[0]["config"], seeds=",".join(map(str, seeds))),
               routers=sorted({r["router"] for r in runs}),
               command=" + ".join(f"(part {i}, seeds {p['config']['seeds']}) {p['command']}"
                                  for i, p in enumerate(parts)),
               analysis_by="python -m lab.compare " + " ".join(map(str, run_dirs)) + " --merge OUT "
                           f"(judged under analysis plan v{stats.PLAN_VERSION})",
               hardware=dict(summary="; ".join(f"part {i}: {p['hardware']['summary']}"
                                                for i, p in enumerate(parts))),
               wall_time_s=sum(p["wall_time_s"] for p in parts),
               train_time_sum_s=sum(p["train_time_sum_s"] for p in parts),
               parts=[dict(dir=str(d), command=p["command"], seeds=p["config"]["seeds"],
                           hardware=p["hardware"], versions=p.get("versions"),
                           wall_time_s=p["wall_time_s"]) for d, p in zip(run_dirs, parts)])
    res["analysis"] = analyse(res)
    return res


def write(out, res):
    """results.json (the analysis before this one kept under earlier_analyses), results.md and
    the figures differences.png and curves.png, atomically."""
    out = Path(out)
    if (out / "results.json").exists():
        before = read_json(out / "results.json", "results file").get("analysis")
        if before and before.get("judgment", {}).get("plan_version") != stats.PLAN_VERSION:
            res["earlier_analyses"] = res.get("earlier_analyses", []) + [
                dict(plan_version=before.get("judgment", {}).get("plan_version", "0 (compare.py before plan v1)"),
                     verdict=before.get("verdict"))]
    write_json(out / "results.json", res)
    write_text(out / "results.md", markdown(res))
    plot(out / "differences.png", res)
    curves(out / "curves.png", res)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lab.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="+", help="train_tiny --out directories")
    p.add_argument("--markdown", action="store_true", help="print results.md text")
    p.add_argument("--plot", default="", help="write the figure of paired differences here")
    p.add_argument("--curves", default="", help="write the figure of per-router validation-loss "
                   "curves here (with several run directories: that file name in each)")
    p.add_argument("--write", action="store_true", help="recompute the analysis under the current "
                   "plan and rewrite each directory's results.json, results.md, differences.png, "
                   "curves.png "
                   "(the earlier analysis's verdict is kept in results.json)")
    p.add_argument("--merge", default="", metavar="OUT", help="merge the run directories (one "
                   "experiment, more seeds) into OUT: results.json, results.md, differences.png, curves.png")
    args = p.parse_args(argv)
    if args.merge:
        try:
            res = merge(args.run_dir)
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--merge: {e}")
        write(args.merge, res)
        print(console_summary(res) + f"\nwrote {args.merge}/results.json, results.md, differences.png, "
              "curves.png")
        return 0
    for d in args.run_dir:
        try:
            res = load(d)
        except (OSError, ValueError, KeyError) as e:
            p.error(f"run_dir {d!r}: {e}")
        print(f"== {d}")
        print(markdown(res) if args.markdown else console_summary(res))
        for flag, draw in ((args.plot, plot), (args.curves, curves)):
            if flag:
                draw(flag if len(args.run_dir) == 1 else Path(d) / Path(flag).name, res)
        if args.write:
            if not (Path(d) / "results.json").exists():
                p.error(f"--write: {d} has no results.json (the run has not finished)")
            res["analysis_by"] = (f"python -m lab.compare --write (re-judged under analysis plan "
                                  f"v{stats.PLAN_VERSION} after the run)")
            write(d, res)
            print(f"rewrote {d}/results.json, results.md, differences.png, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
