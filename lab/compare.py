"""compare.py: paired statistics, controls, tables and plots for train_tiny runs.

    python compare.py runs/tiny                 # verdict + tables of a (finished or partial) run
    python compare.py runs/tiny --markdown      # the results.md text
    python compare.py runs/tiny --plot out.png  # curves and paired differences
    python compare.py runs/tiny --write         # recompute the analysis into results.json/md/png

A run directory holds one JSON per (router, seed) under runs/ (train_tiny writes them as each run
finishes) and, once all are done, results.json. Everything here reads only those files.

What is compared (challenger minus baseline, paired by seed: same initial weights, same batches):
    matched pairs   EC-CF1 vs top-1; EC-CF2, EC-CAP2/3 vs top-2; EC-CF2 vs dropless top-2 and vs
                    GShard's random-second-expert top-2; GShard top-2 vs top-2.
    positive control  MoE (top-2, else EC-CF2) vs the FLOP-matched dense FFN: a difference the
                    experiment must see. It passes when the MoE is better, its 95% CI excludes
                    zero AND its mean is
                    at least twice its own seed-to-seed standard deviation (the sd over seeds of
                    the paired differences: the noise of a paired comparison, so the gap shows in
                    nearly every seed, not only on average). Otherwise the headline says
                    "INCONCLUSIVE: this setting cannot tell routers apart". (The unpaired sd of
                    the dense runs' final loss is printed beside it; pairing removes the part of
                    it that every router of a seed shares.)
    null control    ROUTER_aa vs ROUTER: the same router and initial weights on another data order;
                    it must come out null. Every statistic is also computed with roles swapped.

Statistics, per pair:
    final-loss difference   mean over seeds with a 95% t interval (n - 1 degrees of freedom).
    steps-to-target         each validation curve is first made monotone (isotonic regression,
                    pool-adjacent-violators: noise cannot make a curve look early by one lucky
                    point), then read by linear interpolation. Target = the baseline's fitted loss
                    at 50%, 75% and 100% of its steps; ratio = the step at which the challenger's
                    fitted curve first reaches it, over the baseline's step. Per pair: geometric
                    mean over seeds with a 95% t interval of log ratios. "Not reached" is kept as
                    such (censored), never filled in. Reverse = roles swapped.
    validation noise        standard error of one validation point (over its fixed batches) and of
                    a paired difference (per-batch differences), printed beside the differences.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

PAIRS = (("ec1", "top1"), ("ec2", "top2"), ("cap2", "top2"), ("cap3", "top2"),
         ("ec2", "top2_dropless"), ("ec2", "top2_gshard"), ("top2_gshard", "top2"))
POSITIVE = (("top2", "dense"), ("ec2", "dense"))      # the first one present is THE control
TARGET_FRACTIONS = (0.5, 0.75, 1.0)
CLAIM_RATIO = 0.5            # the paper: EC-CF2 needs < half of top-2's steps (Fig. 2a)
PAPER_FIG3 = dict(bins=["0", "1", "2", "3-4", ">4"], note="Fig. 3 (100M/64E, EC-CF2): most tokens "
                  "get 1-2 experts, 23% get 3-4, ~3% get >4")


# ----------------------------------------------------------------------------------------------
# Statistics on plain arrays (usable on any curves, not only train_tiny's).


def t_interval(x, level=0.95):
    """Mean and two-sided t confidence interval of the mean of x -> (mean, lo, hi, sd, n).
    With one value the interval is (-inf, inf): one seed says nothing about noise."""
    from scipy import stats
    x = np.asarray(x, dtype=float)
    n, mean = len(x), float(np.mean(x))
    if n < 2:
        return mean, -math.inf, math.inf, math.nan, n
    sd = float(np.std(x, ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half, sd, n


def t_stats(x, level=0.95):
    """t_interval as a dict: mean, lo, hi, sd, n."""
    return dict(zip(("mean", "lo", "hi", "sd", "n"), t_interval(x, level)))


def isotonic_decreasing(y):
    """Least-squares non-increasing fit of y (pool adjacent violators). [m] -> [m]."""
    blocks = []                                   # [sum, count] of pooled neighbours
    for v in np.asarray(y, dtype=float):
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    return np.concatenate([np.full(c, s / c) for s, c in blocks])


def first_crossing(steps, fit, target):
    """First step at which the non-increasing piecewise-linear curve (steps, fit) is <= target;
    None if it never gets there. Before the first point the curve is unknown, so a curve already
    below target there reports its first step."""
    below = np.nonzero(fit <= target)[0]
    if len(below) == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(steps[0])
    x0, x1, y0, y1 = steps[i - 1], steps[i], fit[i - 1], fit[i]
    return float(x0 + (y0 - target) / (y0 - y1) * (x1 - x0))


def steps_ratio(steps_a, loss_a, steps_b, loss_b, fraction):
    """How many steps curve a needs to reach curve b's (fitted) loss at fraction * b's last
    step, over that step. < 1: a is faster. None: a never reaches it."""
    steps_a, steps_b = np.asarray(steps_a, float), np.asarray(steps_b, float)
    at = fraction * steps_b[-1]
    target = float(np.interp(at, steps_b, isotonic_decreasing(loss_b)))
    hit = first_crossing(steps_a, isotonic_decreasing(loss_a), target)
    return None if hit is None else hit / at


def ratio_summary(ratios):
    """Per-seed step ratios (None = not reached) -> dict: geometric mean and 95% t interval of
    the log ratios when every seed reached the target; else only the count that did."""
    got = [r for r in ratios if r is not None]
    out = dict(per_seed=list(ratios), reached=len(got), n=len(ratios))
    if got and len(got) == len(ratios):
        mean, lo, hi, _, _ = t_interval(np.log(got))
        out.update(geo_mean=math.exp(mean), lo=math.exp(lo), hi=math.exp(hi))
    return out


def paired(a_runs, b_runs):
    """Statistics of challenger runs a vs baseline runs b, paired by seed (dicts seed -> run,
    each run with val_step, val_loss, final_val and optionally val_batch_loss)."""
    seeds = sorted(set(a_runs) & set(b_runs))
    a, b = [a_runs[s] for s in seeds], [b_runs[s] for s in seeds]
    diffs = [x["final_val"] - y["final_val"] for x, y in zip(a, b)]
    out = dict(seeds=seeds, final_diff=dict(per_seed=diffs, **t_stats(diffs)))
    for name, (p, q) in (("forward", (a, b)), ("reverse", (b, a))):
        out[name] = {str(f): ratio_summary([steps_ratio(x["val_step"], x["val_loss"],
                                                        y["val_step"], y["val_loss"], f)
                                            for x, y in zip(p, q)]) for f in TARGET_FRACTIONS}
    if seeds and all(len(r.get("val_batch_loss", [[]])[-1]) > 1 for r in a + b):
        # noise of one paired validation point: SE of the per-batch differences at the end
        se = [np.std(np.subtract(x["val_batch_loss"][-1], y["val_batch_loss"][-1]), ddof=1)
              / math.sqrt(len(x["val_batch_loss"][-1])) for x, y in zip(a, b)]
        out["paired_point_se"] = float(np.mean(se))
    if seeds and len({tuple(r["val_step"]) for r in a + b}) == 1:   # one grid for every run
        D = np.subtract([x["val_loss"] for x in a], [y["val_loss"] for y in b])  # [seeds, evals]
        band = [t_interval(D[:, j]) for j in range(D.shape[1])]
        out["curve"] = dict(step=a[0]["val_step"], mean=[x[0] for x in band],
                            lo=[x[1] for x in band], hi=[x[2] for x in band])
    return out


def excludes(stat, value):
    return not stat["lo"] <= value <= stat["hi"]


def positive_control_passes(fd):
    """MoE - dense (a paired final_diff) passes when the MoE is better (mean < 0), the 95% CI
    excludes 0, and |mean| is at least twice the sd over seeds of the paired differences."""
    return bool(fd["mean"] < 0 and excludes(fd, 0.0) and fd["sd"] > 0
                and abs(fd["mean"]) >= 2 * fd["sd"])


# ----------------------------------------------------------------------------------------------
# Analysis of one run set (the dict train_tiny writes as results.json).


def runs_by_router(res):
    by = {}
    for r in res["runs"]:
        by.setdefault(r["router"], {})[r["seed"]] = r
    return by


def analyse(res):
    """-> dict(noise, positive, null, pairs, routers, verdict): every statistic of the run set."""
    by = runs_by_router(res)
    out = dict(pairs={}, null={}, positive=None)
    last = [np.asarray(r["val_batch_loss"][-1]) for r in res["runs"] if "val_batch_loss" in r]
    out["noise"] = dict(
        point_se=float(np.mean([x.std(ddof=1) / math.sqrt(len(x)) for x in last]))
        if last and len(last[0]) > 1 else None,
        seed_sd={rt: float(np.std([r["final_val"] for r in runs.values()], ddof=1))
                 for rt, runs in by.items() if len(runs) > 1})
    for a, b in POSITIVE:
        if a in by and b in by:
            p = paired(by[a], by[b])
            p.update(challenger=a, baseline=b, seed_sd=out["noise"]["seed_sd"].get(b, math.nan),
                     passed=positive_control_passes(p["final_diff"]))
            out["positive"] = p
            break
    for rt in by:
        if rt.endswith("_aa") and rt[:-3] in by:
            p = paired(by[rt], by[rt[:-3]])
            ratios = [p[d][str(f)] for d in ("forward", "reverse") for f in (0.5, 0.75)]
            p.update(challenger=rt, baseline=rt[:-3],
                     passed=bool(not excludes(p["final_diff"], 0.0)
                                 and all("lo" not in r or not excludes(r, 1.0) for r in ratios)))
            out["null"][rt] = p
    for a, b in PAIRS:
        if a in by and b in by:
            out["pairs"][f"{a} vs {b}"] = dict(paired(by[a], by[b]), challenger=a, baseline=b)
    out["routers"] = {rt: router_summary(runs) for rt, runs in by.items()}
    out["inference"] = {rt: inference_summary(runs, res) for rt, runs in by.items()
                        if all("inference" in r for r in runs.values())}
    out["verdict"] = verdict(res, out)
    return out


def inference_summary(runs, res):
    """The train/inference gap of one router over its seeds: validation loss at batch size 1,
    routed as it would be deployed (expert choice: threshold routing; token choice and dense:
    as in training), minus the trained model's validation loss at the training batch size.

    -> dict(gap=t_interval dict with min/max, deployed=, plus for expert choice the naive gap
    of group routing at batch size 1, the largest |threshold_B - threshold_1|, and per layer the
    loads of threshold routing relative to the training bucket k/n)."""
    from ecmoe import expert_capacity
    from train_tiny import ROUTER_SPEC, base_router   # imported here: train_tiny imports us
    runs = [runs[s] for s in sorted(runs)]
    inf = [r["inference"] for r in runs]
    if any(i["group_1"] is None for i in inf):      # capped EC: cannot run at batch size 1
        return dict(seeds=[r["seed"] for r in runs], error=inf[0].get("error", "?"))
    ec = "threshold_1" in inf[0]
    deployed = [i["threshold_1" if ec else "group_1"] for i in inf]
    gaps = [d - r["final_val"] for d, r in zip(deployed, runs)]
    out = dict(seeds=[r["seed"] for r in runs], routing="threshold" if ec else "group",
               trained=float(np.mean([r["final_val"] for r in runs])),
               deployed=float(np.mean(deployed)),
               gap=dict(t_stats(gaps), min=float(min(gaps)), max=float(max(gaps)),
                        per_seed=gaps))
    if not ec:
        return out
    naive = [i["group_1"] - r["final_val"] for i, r in zip(inf, runs)]
    out["naive_group_1_gap"] = dict(mean=float(np.mean(naive)), min=float(min(naive)),
                                    max=float(max(naive)))
    out["threshold_B_vs_1"] = float(max(abs(i["threshold_B"] - i["threshold_1"]) for i in inf))
    _, c, _ = ROUTER_SPEC[base_router(runs[0]["router"])]
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
    finals = [r["final_val"] for r in runs]
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


def _ci(stat, fmt="{:+.4f}"):
    if not math.isfinite(stat["lo"]):
        return fmt.format(stat["mean"]) + " (1 seed: no interval)"
    return f"{fmt.format(stat['mean'])} [{fmt.format(stat['lo'])}, {fmt.format(stat['hi'])}]"


def _ratio(r):
    if "geo_mean" in r:
        return f"{r['geo_mean']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"
    shown = ", ".join("not reached" if x is None else f"{x:.2f}" for x in r["per_seed"])
    return f"{r['reached']}/{r['n']} reached ({shown})"


def _reach(a, b, r):
    """'a reaches b's final loss at 0.88 [0.85, 0.91] of b's steps' or 'in 2 of 5 seeds'."""
    if "geo_mean" in r:
        return f"{a} reaches {b}'s final loss at {_ratio(r)} of {b}'s steps"
    return f"{a} reaches {b}'s final loss in {r['reached']} of {r['n']} seeds"


def verdict(res, a):
    """Plain sentences, the headline first: can this run set see a difference, then what it saw."""
    cfg, lines = res["config"], []
    if cfg.get("dry_run"):
        return ["Dry run (a few steps of a tiny model): the numbers test the plumbing, no verdict."]
    pos = a["positive"]
    if pos is None:
        lines.append("INCONCLUSIVE: no positive control in this run set (needs dense and top2 or "
                     "ec2): nothing says whether it could see a difference.")
    elif not pos["passed"]:
        lines.append(f"INCONCLUSIVE: this setting cannot tell routers apart. The positive control "
                     f"{pos['challenger']} - dense = {_ci(pos['final_diff'])} is not clearly larger "
                     f"than its seed-to-seed noise in the expected direction (sd of the paired "
                     f"difference over seeds {pos['final_diff']['sd']:.4f}; needs MoE better, a "
                     f"95% CI excluding 0 and |mean| >= 2 sd).")
    else:
        fd = pos["final_diff"]
        lines.append(f"Positive control passed: {pos['challenger']} - dense = {_ci(fd)}, "
                     f"{abs(fd['mean']) / fd['sd']:.1f}x its seed-to-seed sd ({fd['sd']:.4f}; "
                     f"unpaired sd of dense over seeds {pos['seed_sd']:.4f}).")
    for rt, p in a["null"].items():
        lines.append(f"Null control {'passed' if p['passed'] else 'FAILED'}: {rt} - "
                     f"{p['baseline']} = {_ci(p['final_diff'])}; step ratio at 75% of the steps "
                     f"{_ratio(p['forward']['0.75'])}, reversed {_ratio(p['reverse']['0.75'])}.")
    if not a["null"]:
        lines.append("No null control (ROUTER_aa) in this run set.")
    conclusive = pos is not None and pos["passed"] and all(p["passed"] for p in a["null"].values())
    for name, p in a["pairs"].items():
        fd, fwd = p["final_diff"], p["forward"]["1.0"]
        if not conclusive:
            tag = "not interpretable (controls above)"
        elif excludes(fd, 0.0):
            tag = f"{p['challenger']} {'better' if fd['mean'] < 0 else 'worse'}"
        else:
            tag = "no difference resolved"
        line = (f"{name}: final loss difference {_ci(fd)} over {fd['n']} seeds: {tag}; "
                f"{_reach(p['challenger'], p['baseline'], fwd)}; reversed: "
                f"{_reach(p['baseline'], p['challenger'], p['reverse']['1.0'])}.")
        if p["challenger"] in ("ec2", "cap2", "cap3") and p["baseline"].startswith("top2"):
            # a seed that never reaches the target has a ratio > 1: the claim fails there
            if "geo_mean" in fwd:
                claim = "holds" if fwd["hi"] < CLAIM_RATIO else "does not hold" \
                    if fwd["lo"] >= CLAIM_RATIO else "unresolved"
            else:
                claim = "does not hold" if fwd["reached"] < fwd["n"] else "unresolved"
            line += f" The paper's 2x claim (< {CLAIM_RATIO} of the steps): {claim} here."
        lines.append(line)
    if len(res["seeds"]) < 3:
        lines.append(f"Only {len(res['seeds'])} seed(s): treat every difference as anecdotal.")
    return lines


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
            "Final validation loss difference: mean over seeds [95% t interval]. Steps to target: "
            "steps the challenger needs to reach the baseline's loss at 50% / 75% / 100% of the "
            "baseline's steps, over those steps (geometric mean [95% interval]; < 1 = faster); "
            "reverse = roles swapped.", "",
            "| pair | role | seeds | final loss diff [95% CI] | to 50% | to 75% | to 100% | "
            "reverse 100% | paired point SE |", "|---|---|---|---|---|---|---|---|---|"]
    rows = ([("positive control", a["positive"])] if a["positive"] else []) + \
        [("null control", p) for p in a["null"].values()] + \
        [("comparison", p) for p in a["pairs"].values()]
    for role, p in rows:
        se = p.get("paired_point_se")
        out.append(f"| {p['challenger']} vs {p['baseline']} | {role} | {len(p['seeds'])} | "
                   f"{_ci(p['final_diff'])} | "
                   + " | ".join(_ratio(p["forward"][str(f)]) for f in TARGET_FRACTIONS)
                   + f" | {_ratio(p['reverse']['1.0'])} | "
                   + (f"{se:.4f}" if se is not None else "-") + " |")
    if noise["point_se"] is not None:
        out += ["", f"Validation noise: one validation point (mean over "
                f"{res['config']['val_batches']} fixed batches) has a standard error of "
                f"{noise['point_se']:.4f}; a paired difference of two runs at the same point has "
                "the SE in the last column. Seed-to-seed sd of the final loss: "
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
           "training; token choice and dense: as in training), minus the validation loss at the "
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
                   f"{x['deployed']:.4f} | {_ci(g)} ({g['min']:+.4f} to {g['max']:+.4f}) | "
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


def plot(path, res):
    """Left: mean validation curves (min-max over seeds). Right: paired differences
    challenger - baseline over steps with 95% t bands and the zero line, controls included."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    a, by = res["analysis"], runs_by_router(res)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    for rt, runs in by.items():
        runs = list(runs.values())
        if len({tuple(r["val_step"]) for r in runs}) > 1:      # runs on other grids: skip
            continue
        x, Y = runs[0]["val_step"], np.array([r["val_loss"] for r in runs])   # [seeds, evals]
        ax.plot(x, Y.mean(0), label=f"{rt} ({len(runs)} seeds)")
        ax.fill_between(x, Y.min(0), Y.max(0), alpha=0.15)
    lo = min(min(r["val_loss"]) for r in res["runs"])
    ax.set_ylim(lo - 0.05, lo + 0.8)
    ax.set(xlabel="training step", ylabel="validation loss (nats / target token)",
           title="validation loss: mean, min-max over seeds")
    rows = ([("positive control", a["positive"], "--")] if a["positive"] else []) + \
        [("null control", p, ":") for p in a["null"].values()] + \
        [("", p, "-") for p in a["pairs"].values()]
    for role, p, style in rows:
        if "curve" not in p:
            continue
        c = p["curve"]
        label = f"{p['challenger']} - {p['baseline']}" + (f" ({role})" if role else "")
        line, = bx.plot(c["step"], c["mean"], style, label=label)
        lo_, hi_ = np.nan_to_num(c["lo"], neginf=np.nan), np.nan_to_num(c["hi"], posinf=np.nan)
        bx.fill_between(c["step"], lo_, hi_, alpha=0.15, color=line.get_color())
    bx.axhline(0, color="black", lw=0.8)
    bx.set(xlabel="training step", ylabel="paired difference in val loss (< 0: challenger better)",
           title="challenger - baseline, paired by seed (95% t band)")
    for x in (ax, bx):
        x.grid(alpha=0.3)
        x.legend(fontsize=7)
    import textwrap
    fig.suptitle(textwrap.fill(f"{res['config']['arch']}: " + a["verdict"][0], 150), fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda t: fig.savefig(t, dpi=110, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Reading and writing run directories.


def atomic_write(path, write):
    """train_tiny's atomic write (write a temporary file, then rename), so a reader never sees
    a half-written report. Imported when called: train_tiny imports this module."""
    from train_tiny import _atomic_write
    _atomic_write(path, write)


def load(run_dir):
    """A train_tiny --out directory -> the results dict, analysis recomputed. Uses results.json
    when present, else assembles the finished per-run files of a partial run."""
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if path.exists():
        res = json.loads(path.read_text())
    else:
        runs = [json.loads(p.read_text()) for p in sorted((run_dir / "runs").glob("*.json"))]
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="+", help="train_tiny --out directories")
    p.add_argument("--markdown", action="store_true", help="print results.md text")
    p.add_argument("--plot", default="", help="write the curves/differences figure here")
    p.add_argument("--write", action="store_true", help="recompute the analysis with this "
                   "compare.py and rewrite the directory's results.json, results.md, val_loss.png")
    args = p.parse_args(argv)
    for d in args.run_dir:
        try:
            res = load(d)
        except (OSError, ValueError, KeyError) as e:
            p.error(f"run_dir {d!r}: {e}")
        print(f"== {d}")
        print(markdown(res) if args.markdown else console_summary(res))
        if args.plot:
            plot(args.plot if len(args.run_dir) == 1 else Path(d) / Path(args.plot).name, res)
        if args.write:
            if not (Path(d) / "results.json").exists():
                p.error(f"--write: {d} has no results.json (the run has not finished)")
            res["analysis_by"] = "python compare.py --write (analysis recomputed after the run)"
            for name, text in (("results.json", json.dumps(res, indent=1)),
                               ("results.md", markdown(res))):
                atomic_write(Path(d) / name, lambda t, text=text: Path(t).write_text(text))
            plot(Path(d) / "val_loss.png", res)
            print(f"rewrote {d}/results.json, results.md, val_loss.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
