"""lab/stats.py: the statistics of a train_tiny run set, under a written, versioned analysis plan.

    python -m lab.stats assets/lm_pretrain/results.json          # the judgment as markdown
    python -m lab.stats assets/lm_pretrain/results.json --json   # the same as strict JSON
    python -m lab.stats LONG/results.json --against SHORT/results.json   # v3: hold, flip or grow?
    python -m lab.ladder --judge-only --out assets/ladder                # v4: the trend over sizes

The plan is docs/analysis_plan.md (version PLAN_VERSION); the constants below are its numbers.
In short: the primary statistic of a pair is the paired difference of final validation loss,
challenger - baseline, paired by seed (mean, 95% t interval, two-sided paired-t p). The positive
control (MoE - dense) passes when the MoE is better and that interval excludes 0. The null control
(ROUTER_aa - ROUTER) fails when its interval excludes 0: one test, nothing else. The comparisons of
a run set form one family, Holm-corrected. Every pair reports its minimum detectable effect (MDE).
Steps-to-target ratios are secondary and descriptive; only the paper's 2x claim reads one.

Input: the dict train_tiny writes as results.json ("runs": one dict per (router, seed) with
router, seed, val_step, val_loss, final_val). Output of judge(): a strict-JSON dict (None, never
NaN or Infinity). Depends only on numpy, scipy and the standard library.
"""
import argparse
import json
import math
import sys

import numpy as np
import scipy.optimize
import scipy.stats

PLAN_VERSION = "4"            # v2 = v1 + the four issue-18 pairs; v3 = v2 + length_change;
#                               v4 = v3 + trend() over model sizes (docs/analysis_plan.md)
ALPHA = 0.05                  # two-sided level of every interval and test
POWER = 0.8                   # the power at which the MDE is quoted
MDE_GOAL = 0.015              # nats: the resolution seeds_needed() plans for
COMPARISONS = (("ec1", "top1"), ("ec2", "top2"), ("cap2", "top2"), ("cap3", "top2"),
               ("ec2", "top2_dropless"), ("ec2", "top2_gshard"), ("top2_gshard", "top2"),
               ("ec2", "dense"),
               # v2: after expert choice (issue 18)
               ("et2", "ec2"), ("et2", "top2"), ("et1", "top1"), ("top2_lossfree", "top2_dropless"))
# (challenger, baseline): the family, where both routers are present
POSITIVE_CONTROLS = (("top2", "dense"), ("ec2", "dense"))   # the first one present is THE control
NULL_SUFFIX = "_aa"           # ROUTER_aa: ROUTER again, same initial weights, other data order
TARGET_FRACTIONS = (0.5, 0.75, 1.0)
PLATEAU_DROP = 0.02           # nats both curves must still fall between 0.75 f T and f T
CLAIM_PAIR, CLAIM_RATIO = ("ec2", "top2"), 0.5   # the paper: EC-CF2 needs < half top-2's steps
LENGTH_WORDS = ("flips", "grows", "shrinks", "holds", "not decided", "appears", "not resolved at either length",
                "not judged (controls)")   # v3: length_change(), in the order the rules are tried
# v4: the trend of a pair's difference over model sizes (a ladder of rungs), trend()
TREND_PAIRS = (("ec1", "top1"), ("ec2", "top2"), ("et2", "top2"), ("ec2", "dense"))   # Holm family
TREND_POSITIVE = ("top2", "dense")    # reported beside the family, never gates, not in Holm
TREND_NULL = ("top2_aa", "top2")      # its slope's 95% CI excluding 0 gates every trend word
SIZE_ROUTER = "top2"                  # a rung's size: log2 of this router's n_params (all of it)
TREND_WORDS = ("grows with size", "shrinks with size", "no trend detected",
               "not judged (controls)", "fewer than 2 rungs: no trend")
LADDER_SEEDS, LADDER_MAX_SEEDS = 5, 12    # v4: every rung starts with 5 seeds; added: up to 12
SEED_RULE_PAIR = ("ec2", "top2")          # ... decided from this pair's 5-seed paired sd alone


# ----------------------------------------------------------------------------------------------
# Primary statistic: paired differences, p-values, Holm, power.


def finite_1d(x, name="x"):
    """x as a 1-D float array [n], n >= 1; ValueError if empty, not 1-D or not finite."""
    x = np.asarray(x, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name}: need a non-empty 1-D list of numbers, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: contains NaN or infinity: {x.tolist()}")
    return x


def paired_t(diffs, alpha=ALPHA):
    """Per-seed differences [n] -> dict(n, mean, lo, hi, sd, p): mean, two-sided (1 - alpha) t
    interval and paired-t p-value. With one seed lo, hi, sd and p are None (no interval)."""
    d = finite_1d(diffs, "paired differences")
    n, mean = len(d), float(d.mean())
    if n < 2:
        return dict(n=1, mean=mean, lo=None, hi=None, sd=None, p=None)
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    half = float(scipy.stats.t.ppf(1 - alpha / 2, n - 1)) * se
    if se == 0:       # every seed gave the same difference: no noise to test against
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * scipy.stats.t.sf(abs(mean) / se, n - 1))
    return dict(n=n, mean=mean, lo=mean - half, hi=mean + half, sd=sd, p=p)


def holm(pvalues):
    """Holm-Bonferroni adjusted p-values [m] -> [m], in the input order (None stays None and is
    not counted in the family)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    ps = finite_1d([pvalues[i] for i in idx], "p-values") if idx else np.zeros(0)
    if np.any((ps < 0) | (ps > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {ps.tolist()}")
    out, m, running = list(pvalues), len(idx), 0.0
    for rank, j in enumerate(np.argsort(ps, kind="stable")):
        running = max(running, min(1.0, (m - rank) * float(ps[j])))   # step-down, monotone
        out[idx[j]] = running
    return out


def t_power(ncp, df, alpha=ALPHA):
    """Power of a two-sided t-test at level alpha with df degrees of freedom when the true
    effect is `ncp` standard errors (noncentral t; df need not be an integer)."""
    crit = scipy.stats.t.ppf(1 - alpha / 2, df)
    near = float(scipy.stats.nct.sf(crit, df, abs(ncp)))    # rejecting on the effect's side
    far = float(scipy.stats.nct.cdf(-crit, df, abs(ncp)))   # ... and on the wrong side
    return near + (far if math.isfinite(far) else 0.0)      # scipy: NaN for tails below ~1e-30


def power(effect, sd, n, alpha=ALPHA):
    """Power of the two-sided paired t-test at level alpha for a true mean difference `effect`,
    paired sd `sd` and n seeds (exact: noncentral t with n - 1 degrees of freedom)."""
    if n < 2 or not sd > 0:
        raise ValueError(f"power needs n >= 2 and sd > 0, got n={n}, sd={sd}")
    return t_power(abs(effect) * math.sqrt(n) / sd, n - 1, alpha)


def mde(sd, n, alpha=ALPHA, power_goal=POWER):
    """Minimum detectable paired effect (nats): the true difference that the two-sided paired
    t-test at level alpha finds with probability power_goal, for paired sd `sd` and n seeds.
    Exact (noncentral t), not the (t_{1-a/2} + t_power) sd / sqrt(n) approximation."""
    if n < 2:
        raise ValueError(f"mde needs n >= 2 seeds (one seed has no test), got n={n}")
    if not (math.isfinite(sd) and sd >= 0):
        raise ValueError(f"mde needs a finite sd >= 0, got {sd}")
    if sd == 0:
        return 0.0
    hi = sd
    while power(hi, sd, n, alpha) < power_goal:           # bracket the answer
        hi *= 2
    return float(scipy.optimize.brentq(lambda e: power(e, sd, n, alpha) - power_goal, 0.0, hi,
                                       xtol=1e-12 * hi))


def seeds_needed(sd, mde_target, alpha=ALPHA, power_goal=POWER, max_seeds=100000):
    """Smallest number of seeds n >= 2 whose MDE (paired sd `sd`) is <= mde_target."""
    if not (math.isfinite(sd) and sd >= 0) or not mde_target > 0:
        raise ValueError(f"seeds_needed needs sd >= 0 and mde_target > 0, got {sd}, {mde_target}")
    z = scipy.stats.norm.ppf(1 - alpha / 2) + scipy.stats.norm.ppf(power_goal)
    n = max(2, int((z * sd / mde_target) ** 2))    # the normal approximation never overshoots
    while mde(sd, n, alpha, power_goal) > mde_target:
        n += 1
        if n > max_seeds:
            raise ValueError(f"more than {max_seeds} seeds needed for sd={sd}, mde={mde_target}")
    return n


def positive_control(diffs, alpha=ALPHA):
    """MoE - dense per seed [n] -> paired_t dict plus passed: True when the MoE is better
    (mean < 0) and the 95% interval excludes 0; None with one seed (cannot be judged)."""
    s = paired_t(diffs, alpha)
    s["passed"] = None if s["hi"] is None else bool(s["mean"] < 0 and s["hi"] < 0)
    return s


def null_control(diffs, alpha=ALPHA):
    """ROUTER_aa - ROUTER per seed [n] -> paired_t dict plus passed: False exactly when the 95%
    interval excludes 0 (one test; step ratios are not part of it); None with one seed."""
    s = paired_t(diffs, alpha)
    s["passed"] = None if s["lo"] is None else bool(s["lo"] <= 0 <= s["hi"])
    return s


# ----------------------------------------------------------------------------------------------
# Secondary statistic: steps to target, read two ways round on isotonic fits.


def isotonic_decreasing(y):
    """Least-squares non-increasing fit of y (pool adjacent violators). [m] -> [m]."""
    means, counts = [], []                        # pooled blocks of neighbours
    for v in finite_1d(y, "loss curve").tolist():
        means.append(v)
        counts.append(1)
        while len(means) > 1 and means[-2] < means[-1]:     # a rise: pool the two blocks
            m, c = means.pop(), counts.pop()
            means[-1] = (means[-1] * counts[-1] + m * c) / (counts[-1] + c)
            counts[-1] += c
    return np.repeat(means, counts)


def first_crossing(log_steps, fit, target):
    """First log-step at which the non-increasing piecewise-linear curve (log_steps, fit) [m] is
    <= target; None if it never gets there or is already below it at its first point."""
    below = np.nonzero(np.asarray(fit) <= target)[0]
    if len(below) == 0 or below[0] == 0:
        return None
    i = int(below[0])
    u0, u1, y0, y1 = log_steps[i - 1], log_steps[i], fit[i - 1], fit[i]
    return float(u0 + (y0 - target) / (y0 - y1) * (u1 - u0))


def steps_ratio(steps_a, loss_a, steps_b, loss_b, fraction):
    """Time-scale ratio of curve a to curve b at a target (< 1: a is faster), read both ways:
    a reaching b's fitted loss at fraction * b's last step, and b reaching a's at fraction * a's
    (inverted), averaged in log where both exist. -> dict(ratio, reached): reached = a got to
    b's target by a's last step. ratio is None only if neither reading exists."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    ua, ub = np.log(finite_1d(steps_a, "steps_a")), np.log(finite_1d(steps_b, "steps_b"))
    fa, fb = isotonic_decreasing(loss_a), isotonic_decreasing(loss_b)
    if len(ua) != len(fa) or len(ub) != len(fb):
        raise ValueError("steps and losses of a curve must have the same length")
    ta, tb = ua[-1] + math.log(fraction), ub[-1] + math.log(fraction)
    target_b = float(np.interp(tb, ub, fb))
    logs = []
    hit_a = first_crossing(ua, fa, target_b)
    if hit_a is not None:
        logs.append(hit_a - tb)
    hit_b = first_crossing(ub, fb, float(np.interp(ta, ua, fa)))
    if hit_b is not None:
        logs.append(ta - hit_b)
    return dict(ratio=math.exp(sum(logs) / len(logs)) if logs else None,
                reached=bool(fa[-1] <= target_b))


def curve_drop(steps, loss, fraction):
    """How much the isotonic fit of one curve falls between 0.75 * fraction and fraction of its
    last step (log-step interpolation), in nats: the plateau test of a target."""
    u, fit = np.log(finite_1d(steps, "steps")), isotonic_decreasing(loss)
    at = u[-1] + math.log(fraction)
    return float(np.interp(at + math.log(0.75), u, fit) - np.interp(at, u, fit))


def ratio_summary(ratios, alpha=ALPHA):
    """Per-seed ratios [n] (None = no reading) -> dict(n_read, ratio, lo, hi): geometric mean
    and (1 - alpha) t interval of the log ratios over the seeds with a reading."""
    got = [r for r in ratios if r is not None]
    if not got:
        return dict(n_read=0, ratio=None, lo=None, hi=None)
    s = paired_t(np.log(got), alpha)
    return dict(n_read=len(got), ratio=math.exp(s["mean"]),
                lo=None if s["lo"] is None else math.exp(s["lo"]),
                hi=None if s["hi"] is None else math.exp(s["hi"]))


def steps_table(a_runs, b_runs, fractions=TARGET_FRACTIONS):
    """Challenger runs a vs baseline runs b (lists of run dicts, same seed order) -> {fraction:
    dict(read, drop, per_seed, reached, n, n_read, ratio, lo, hi)}. A target is read only where
    both routers' curves, averaged over seeds, fall by PLATEAU_DROP nats over its last quarter."""
    out = {}
    for f in fractions:
        drops = [np.mean([curve_drop(r["val_step"], r["val_loss"], f) for r in runs])
                 for runs in (a_runs, b_runs)]
        row = [steps_ratio(a["val_step"], a["val_loss"], b["val_step"], b["val_loss"], f)
               for a, b in zip(a_runs, b_runs)]
        entry = dict(read=bool(min(drops) >= PLATEAU_DROP), drop=float(min(drops)),
                     per_seed=[x["ratio"] for x in row], reached=sum(x["reached"] for x in row),
                     n=len(row))
        entry.update(ratio_summary(entry["per_seed"]) if entry["read"] else
                     dict(n_read=0, ratio=None, lo=None, hi=None))
        out[str(f)] = entry
    return out


# ----------------------------------------------------------------------------------------------
# Applying the plan to one results.json.


def runs_by_router(results):
    """results dict -> {router: {seed: run}}; ValueError on no runs or a duplicated run."""
    if not isinstance(results, dict) or not results.get("runs"):
        raise ValueError("results: need a dict with a non-empty 'runs' list (a results.json)")
    by = {}
    for r in results["runs"]:
        if r["seed"] in by.setdefault(r["router"], {}):
            raise ValueError(f"results: router {r['router']} seed {r['seed']} appears twice")
        by[r["router"]][r["seed"]] = r
    return by


def final_diffs(a_runs, b_runs):
    """{seed: run} of challenger a and baseline b -> (seeds, a final_val - b final_val per
    seed); ValueError if the seed sets differ or a final loss is not finite."""
    if set(a_runs) != set(b_runs) or not a_runs:
        raise ValueError(f"seeds do not match: {sorted(a_runs)} vs {sorted(b_runs)}")
    seeds = sorted(a_runs)
    diffs = [a_runs[s]["final_val"] - b_runs[s]["final_val"] for s in seeds]
    if not all(math.isfinite(d) for d in diffs):
        raise ValueError(f"non-finite final_val in seeds {seeds}: differences {diffs}")
    return seeds, diffs


def describe(stat, fmt="{:+.4f}"):
    """'+0.0098 [-0.0106, +0.0302]' from a paired_t dict, or '+0.0098 (one seed: no interval)'."""
    if stat["lo"] is None:
        return fmt.format(stat["mean"]) + " (one seed: no interval)"
    return f"{fmt.format(stat['mean'])} [{fmt.format(stat['lo'])}, {fmt.format(stat['hi'])}]"


def pair_sentence(name, s, interpretable):
    """The plan's verdict sentence for one pair of the family (s: paired_t + p_holm + mde)."""
    if s["n"] < 2:
        return f"{name}: one seed: no interval ({s['mean']:+.4f}); nothing resolved."
    tail = f"({s['n']} seeds, p = {s['p']:.3g}, Holm p = {s['p_holm']:.3g})"
    if not interpretable:
        return f"{name}: not interpretable (controls): {describe(s)} {tail}."
    if s["resolved"]:
        a, b = name.split(" - ")
        word = "better" if s["mean"] < 0 else "worse"
        return (f"{name}: resolved: {a} {word} than {b} by {abs(s['mean']):.4f} "
                f"[{abs(s['lo']) if s['mean'] > 0 else abs(s['hi']):.4f}, "
                f"{abs(s['hi']) if s['mean'] > 0 else abs(s['lo']):.4f}] nats {tail}.")
    after = " (unadjusted p < 0.05, not after Holm)" if s["p"] < ALPHA else ""
    m = s.get("family_size", 1)
    level = "unadjusted alpha 0.05" if m == 1 else f"alpha 0.05/{m}, where Holm resolves a pair " \
        "whatever the others do"
    return (f"{name}: not resolved{after}: {describe(s)} {tail}; a difference between "
            f"-{s['mde_family']:.4f} and +{s['mde_family']:.4f} (the MDE at {POWER:.0%} power and "
            f"{level}) could still hide.")


def judge(results):
    """Apply plan PLAN_VERSION to one results.json dict -> strict-JSON dict: the controls, every
    pair of the family (n, mean, CI, sd, p, Holm p, MDE, seeds for MDE_GOAL, resolved, sentence,
    steps-to-target table) and the paper's 2x claim."""
    by, notes = runs_by_router(results), []

    def pair(a, b):
        seeds = sorted(set(by[a]) & set(by[b]))
        left_out = sorted(set(by[a]) ^ set(by[b]))
        diverged = [x for x in seeds if not all(isinstance(by[r][x]["final_val"], (int, float)) and
                                                math.isfinite(by[r][x]["final_val"]) for r in (a, b))]
        seeds = [x for x in seeds if x not in diverged]
        if not seeds:
            raise ValueError(f"{a} and {b} share no seed with a finite final loss")
        if left_out:
            notes.append(f"{a} - {b}: seeds {left_out} have only one of the two routers: left out")
        if diverged:
            notes.append(f"{a} - {b}: seeds {diverged} diverged (no finite final loss): left out")
        A, B = {s: by[a][s] for s in seeds}, {s: by[b][s] for s in seeds}
        _, d = final_diffs(A, B)
        s = dict(pair=f"{a} - {b}", challenger=a, baseline=b, seeds=seeds, **paired_t(d))
        s["mde"] = None if s["n"] < 2 else mde(s["sd"], s["n"])
        s["seeds_for_goal"] = None if s["n"] < 2 else seeds_needed(s["sd"], MDE_GOAL)
        s["steps"] = steps_table([A[x] for x in seeds], [B[x] for x in seeds])
        return s, d

    pos = next(((a, b) for a, b in POSITIVE_CONTROLS if a in by and b in by), None)
    positive = None
    if pos:
        positive, d = pair(*pos)
        positive["passed"] = positive_control(d)["passed"]
    nulls = []
    for rt in by:
        if rt.endswith(NULL_SUFFIX) and rt[:-len(NULL_SUFFIX)] in by:
            s, d = pair(rt, rt[:-len(NULL_SUFFIX)])
            s["passed"] = null_control(d)["passed"]
            nulls.append(s)
    if positive is None:
        why = "no positive control (needs dense and top2 or ec2) in this run set"
    elif positive["passed"] is not True:
        why = f"positive control {positive['pair']} " + (
            "has one seed" if positive["passed"] is None else "failed")
    elif any(s["passed"] is not True for s in nulls):
        why = "; ".join(f"null control {s['pair']} " + ("failed" if s["passed"] is False
                                                         else "has one seed")
                        for s in nulls if s["passed"] is not True)
    else:
        why = "controls passed" + ("" if nulls else " (no null control in this run set)")
    interpretable = why.startswith("controls passed")

    family = [pair(a, b)[0] for a, b in COMPARISONS if a in by and b in by and (a, b) != pos]
    m = sum(s["p"] is not None for s in family)
    for s, ph in zip(family, holm([s["p"] for s in family])):
        s["p_holm"] = ph
        s["family_size"] = m       # v4 text: the sentence quotes the MDE at alpha / m
        s["mde_family"] = None if s["n"] < 2 else mde(s["sd"], s["n"], ALPHA / max(m, 1))
        s["resolved"] = bool(ph is not None and ph < ALPHA)
        s["interpretable"] = interpretable
        s["sentence"] = pair_sentence(s["pair"], s, interpretable)

    claim = None
    for s in family:
        if (s["challenger"], s["baseline"]) == CLAIM_PAIR:
            e = s["steps"]["1.0"]
            if not interpretable:
                word = "not judged (controls)"
            elif not e["read"]:
                word = "not read (the curves are on a plateau at the end)"
            elif e["lo"] is None:
                word = "unresolved (one seed: no interval)"
            elif e["lo"] >= CLAIM_RATIO:
                word = "does not hold"
            elif e["hi"] < CLAIM_RATIO and s["resolved"] and s["mean"] < 0:
                word = "holds"          # the steps say so, and the final loss agrees
            else:
                word = "unresolved"
            claim = dict(pair=s["pair"], ratio=e["ratio"], lo=e["lo"], hi=e["hi"], verdict=word,
                         sentence=f"The paper's 2x claim ({s['challenger']} reaches "
                                  f"{s['baseline']}'s final loss in < {CLAIM_RATIO} of its steps): "
                                  f"{word}.")
    if results.get("config", {}).get("dry_run"):
        notes.append("dry run: the numbers test the plumbing, no verdict")
    if len(results.get("seeds", [])) == 1:
        notes.append("one seed: no interval anywhere; every difference is anecdotal")
    return dict(plan_version=PLAN_VERSION, alpha=ALPHA, power=POWER, mde_goal=MDE_GOAL,
                positive_control=positive, null_controls=nulls, interpretable=interpretable,
                why=why, family=[s["pair"] for s in family], pairs=family, claim_2x=claim,
                notes=notes)


def welch(mean_a, sd_a, n_a, mean_b, sd_b, n_b, alpha=ALPHA):
    """Difference of two independent means, a - b, from their summaries -> dict(mean, lo, hi, p,
    df): Welch's t (unequal variances, Welch-Satterthwaite degrees of freedom), two-sided."""
    if min(n_a, n_b) < 2 or sd_a is None or sd_b is None:
        raise ValueError(f"welch needs n >= 2 and an sd on both sides, got n = {n_a}, {n_b}")
    va, vb = sd_a ** 2 / n_a, sd_b ** 2 / n_b
    mean, se = mean_a - mean_b, math.sqrt(va + vb)
    if se == 0:
        return dict(mean=mean, lo=mean, hi=mean, p=1.0 if mean == 0 else 0.0, df=None)
    df = (va + vb) ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1))
    half = float(scipy.stats.t.ppf(1 - alpha / 2, df)) * se
    return dict(mean=mean, lo=mean - half, hi=mean + half, df=df,
                p=float(2 * scipy.stats.t.sf(abs(mean) / se, df)))


def length_change(short, long):
    """Plan v3: for each pair judged in both run sets, does the conclusion of the shorter run
    (`short`, a judge() dict) hold, flip, grow or shrink in the longer one (`long`)?

    change = long mean - short mean, with a Welch 95% interval (the two run sets train separate
    models; seeds they share are not paired), its p-values Holm-corrected over the pairs here.
    dir = the sign of a pair's mean where its own run set resolves it (Holm), else 0. In order:
      flips    dir_short != 0 and dir_long = -dir_short
      grows    dir_short != 0, dir_long = dir_short, and the change is resolved away from 0
      shrinks  dir_short != 0 and the change is resolved towards 0
      holds    dir_short != 0 and dir_long = dir_short (the change not resolved)
      not decided                      dir_short != 0, dir_long = 0, the change not resolved
      appears                          dir_short = 0, dir_long != 0
      not resolved at either length    dir_short = dir_long = 0
    Both run sets' controls must pass, else every pair reads "not judged (controls)".
    -> list of dicts (pair, short, long: their mean/lo/hi/n/resolved, change: welch + p_holm +
    resolved, word, sentence)."""
    def direction(x):
        return int(math.copysign(1, x["mean"])) if x["resolved"] else 0

    pairs_long = {s["pair"]: s for s in long["pairs"]}
    both = [(s, pairs_long[s["pair"]]) for s in short["pairs"] if s["pair"] in pairs_long]
    changes = [welch(l["mean"], l["sd"], l["n"], s["mean"], s["sd"], s["n"])
               if min(s["n"], l["n"]) >= 2 else None for s, l in both]
    holm_p = holm([c["p"] if c else None for c in changes])
    judged = short["interpretable"] and long["interpretable"]
    out = []
    for (s, l), c, ph in zip(both, changes, holm_p):
        d_s, d_l = direction(s), direction(l)
        moved = 0 if c is None or ph is None or ph >= ALPHA else int(math.copysign(1, c["mean"]))
        if not judged:
            word = "not judged (controls)"
        elif d_s and d_l == -d_s:
            word = "flips"
        elif d_s and d_l == d_s and moved == d_s:
            word = "grows"
        elif d_s and moved == -d_s:
            word = "shrinks"
        elif d_s and d_l == d_s:
            word = "holds"
        elif d_s:
            word = "not decided"
        else:
            word = "appears" if d_l else "not resolved at either length"
        row = dict(pair=s["pair"], word=word,
                   short={k: s[k] for k in ("n", "mean", "lo", "hi", "resolved")},
                   long={k: l[k] for k in ("n", "mean", "lo", "hi", "resolved", "mde")},
                   change=None if c is None else dict(c, p_holm=ph, resolved=bool(moved)))
        change = "" if c is None else f"; change {describe(c)} (Holm p = {ph:.3g})"
        row["sentence"] = (f"{s['pair']}: {word}: {describe(s)} ({s['n']} seeds) -> {describe(l)} "
                           f"({l['n']} seeds){change}.")
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------
# Plan v4: the trend of a pair's difference over model sizes (a ladder of rungs).


def slope_fit(x, means, sds, ns, alpha=ALPHA):
    """The slope of a pair's paired difference over rungs: x [R] (log2 parameters of each rung),
    means, sds, ns [R] (each rung's mean, sd and number of per-seed differences) -> dict(slope,
    lo, hi, se, df, p, at_min, at_max).

    The slope is the least-squares line through every seed's difference, which is the per-rung
    means weighted by their seed counts: slope = sum_r c_r mean_r with fixed c_r (from x and n
    only). Rungs are independent sets of runs, so var = sum_r c_r^2 sd_r^2 / n_r, each rung
    with its own sd; the interval is t with Welch-Satterthwaite degrees of freedom (two rungs:
    Welch's test of the two means, divided by their distance in x). at_min / at_max: the line at
    the smallest / largest x."""
    x, m = finite_1d(x, "x (log2 parameters)"), finite_1d(means, "means")
    sd, n = finite_1d(sds, "sds"), finite_1d(ns, "ns")
    if not len(x) == len(m) == len(sd) == len(n) or len(x) < 2:
        raise ValueError(f"slope_fit needs >= 2 rungs and equal lengths, got {len(x)}, {len(m)}, "
                         f"{len(sd)}, {len(n)}")
    if np.any(n < 2) or np.any(sd < 0) or np.ptp(x) == 0:
        raise ValueError(f"slope_fit needs n >= 2 seeds and sd >= 0 at every rung and two "
                         f"different sizes, got n = {n.tolist()}, sd = {sd.tolist()}, x = {x.tolist()}")
    xbar = float((n * x).sum() / n.sum())
    c = n * (x - xbar) / float((n * (x - xbar) ** 2).sum())
    slope, level = float(c @ m), float((n * m).sum() / n.sum())
    v = c ** 2 * sd ** 2 / n
    se = math.sqrt(float(v.sum()))
    out = dict(slope=slope, at_min=level + slope * (x.min() - xbar),
               at_max=level + slope * (x.max() - xbar))
    if se == 0:
        return dict(out, lo=slope, hi=slope, se=0.0, df=None, p=1.0 if slope == 0 else 0.0)
    df = float(v.sum() ** 2 / (v ** 2 / (n - 1)).sum())
    half = float(scipy.stats.t.ppf(1 - alpha / 2, df)) * se
    return dict(out, lo=slope - half, hi=slope + half, se=se, df=df,
                p=float(2 * scipy.stats.t.sf(abs(slope) / se, df)))


def slope_critical(x, sds, ns, alpha=ALPHA, draws=20000, seed=0):
    """What the slope test of slope_fit needs to see, in true standard errors: x, sds, ns [R]
    (the rungs' log2 parameters, true paired sds, seeds) -> (se, k [draws]). The test rejects
    when |slope estimate| > t_crit(df_hat) * se_hat; se_hat and df_hat come from the rungs'
    estimated sds (sd_r^2 chi^2_{n_r - 1} / (n_r - 1), `draws` fixed-seed draws, independent
    of the mean), and k = t_crit(df_hat) * se_hat / se per draw."""
    x, sd, n = (finite_1d(v, name) for v, name in ((x, "x"), (sds, "sds"), (ns, "ns")))
    xbar = float((n * x).sum() / n.sum())
    c = n * (x - xbar) / float((n * (x - xbar) ** 2).sum())
    v = c ** 2 * sd ** 2 / n                                           # [R]
    se = math.sqrt(float(v.sum()))
    if se == 0:
        return 0.0, np.zeros(1)
    rng = np.random.default_rng(seed)
    w = rng.chisquare(np.broadcast_to(n - 1, (draws, len(n)))) / (n - 1)   # [draws, R]
    vh = v * w
    df = vh.sum(1) ** 2 / np.maximum((vh ** 2 / (n - 1)).sum(1), 1e-300)
    return se, scipy.stats.t.ppf(1 - alpha / 2, df) * np.sqrt(vh.sum(1)) / se


def slope_power(slope, x, sds, ns, alpha=ALPHA, draws=20000):
    """Power of the slope test (slope_fit, two-sided, level alpha) at a true slope, with the
    rungs' true paired sds: the slope estimate is normal (mean slope, sd se) and independent of
    the sds estimated beside it, so power = mean over draws of Phi(d - k) + Phi(-d - k), d =
    slope / se (k: slope_critical). Exact up to the draws' integration (about +-0.003)."""
    se, k = slope_critical(x, sds, ns, alpha, draws)
    if se == 0:
        return 1.0 if slope else float(alpha)
    d = abs(slope) / se
    return float(np.mean(scipy.stats.norm.cdf(d - k) + scipy.stats.norm.cdf(-d - k)))


def slope_mde(x, sds, ns, alpha=ALPHA, power_goal=POWER, draws=20000):
    """The smallest true slope (nats per doubling) that the slope test at level alpha finds with
    probability power_goal, taking the measured sds as the truth (as mde() does for a pair)."""
    se, k = slope_critical(x, sds, ns, alpha, draws)
    if se == 0:
        return 0.0

    def gap(d):
        return float(np.mean(scipy.stats.norm.cdf(d - k) + scipy.stats.norm.cdf(-d - k))) - power_goal
    hi = 1.0
    while gap(hi) < 0:
        hi *= 2
    return se * float(scipy.optimize.brentq(gap, 0.0, hi, xtol=1e-10))


def seeds_rule(sd_first, goal=MDE_GOAL, start=LADDER_SEEDS, cap=LADDER_MAX_SEEDS):
    """Plan v4: how many seeds a rung ends with, from the paired sd of SEED_RULE_PAIR over its
    first `start` seeds alone (never from the difference): `start` if their MDE is <= goal,
    else seeds_needed(sd_first, goal), capped at `cap`; seeds are added once, in one step."""
    if not (math.isfinite(sd_first) and sd_first >= 0):
        raise ValueError(f"seeds_rule needs a finite sd >= 0, got {sd_first}")
    if mde(sd_first, start) <= goal:
        return start
    return min(cap, seeds_needed(sd_first, goal))


def rung_summary(results, name, routers=None):
    """One rung of a ladder for trend(): a results.json dict -> dict(rung, params, log2_params,
    seeds, judgment, interpretable, why, stats, seed_rule). Only the runs of `routers` (None:
    all) are judged, so every rung has the same family; judge() applies the plan to the rung
    alone (its controls, its Holm family). params: the n_params of SIZE_ROUTER's runs."""
    if routers is not None:
        keep = set(routers)
        results = dict(results, runs=[r for r in results.get("runs", []) if r["router"] in keep])
    by = runs_by_router(results)
    sizes = {r.get("n_params") for r in by.get(SIZE_ROUTER, {}).values()}
    if len(sizes) != 1 or not isinstance(next(iter(sizes)), int):
        raise ValueError(f"rung {name}: need {SIZE_ROUTER} runs with one n_params, got {sizes}")
    params = sizes.pop()
    seeds = sorted({s for runs in by.values() for s in runs})
    results = dict(results, seeds=seeds)
    j = judge(results)
    rows = ([j["positive_control"]] if j["positive_control"] else []) + j["null_controls"] + \
        j["pairs"]
    stats = {s["pair"]: {k: s.get(k) for k in ("n", "mean", "lo", "hi", "sd", "p", "p_holm",
                                                 "resolved", "seeds")} for s in rows}
    rule = None
    a, b = SEED_RULE_PAIR
    if a in by and b in by:
        first = sorted(set(by[a]) & set(by[b]))[:LADDER_SEEDS]
        if len(first) == LADDER_SEEDS:
            d = [by[a][x]["final_val"] - by[b][x]["final_val"] for x in first]
            if all(math.isfinite(v) for v in d):
                sd = float(np.std(d, ddof=1))
                rule = dict(pair=f"{a} - {b}", seeds=first, sd=sd, mde=mde(sd, LADDER_SEEDS),
                            goal=MDE_GOAL, seeds_to=seeds_rule(sd), seeds_have=len(seeds))
    return dict(rung=name, params=params, log2_params=math.log2(params), seeds=seeds,
                plan_version=j["plan_version"], interpretable=j["interpretable"], why=j["why"],
                family=j["family"], stats=stats, seed_rule=rule, judgment=j)


def trend(rungs, alpha=ALPHA, power_goal=POWER):
    """Plan v4: does each pair's difference grow or shrink with model size? rungs: list of
    rung_summary() dicts (any order) -> strict-JSON dict(plan_version, rungs, judged, why,
    pairs, notes).

    For each pair (challenger - baseline; negative = challenger better) present with >= 2 seeds
    at >= 2 rungs: slope_fit() of its per-rung differences on log2(parameters), in nats per
    doubling. The pairs of TREND_PAIRS form one Holm family; TREND_POSITIVE and TREND_NULL are
    reported as controls, outside it. Words (family pairs):
      not judged (controls)   a rung's own controls failed, or the trend null control's slope
                              interval excludes 0
      grows with size         Holm p < alpha and the slope moves the line at the largest rung
                              away from 0: the gap in favour of the pair's leader there widens
      shrinks with size       Holm p < alpha and the slope moves it towards 0: the gap narrows
      no trend detected       otherwise; with the smallest slope detected with power_goal at
                              the level alpha / m (m: the pairs in the family), the level
                              at which Holm resolves a pair whatever the other pairs do."""
    rungs = sorted(rungs, key=lambda r: r["params"])
    if len({r["params"] for r in rungs}) != len(rungs):
        raise ValueError(f"trend: two rungs have the same size: {[r['params'] for r in rungs]}")
    notes, names = [], [r["rung"] for r in rungs]

    def fit(pair):
        pts = [dict(rung=r["rung"], params=r["params"], log2_params=r["log2_params"],
                    **{k: r["stats"][pair][k] for k in ("n", "mean", "lo", "hi", "sd")})
               for r in rungs if pair in r["stats"] and r["stats"][pair]["n"] >= 2]
        row = dict(pair=pair, points=pts, n_rungs=len(pts), fit=None)
        if len(pts) >= 2:
            row["fit"] = slope_fit([q["log2_params"] for q in pts], [q["mean"] for q in pts],
                                   [q["sd"] for q in pts], [q["n"] for q in pts], alpha)
        left = sorted({r["rung"] for r in rungs} - {q["rung"] for q in pts}, key=names.index)
        if pts and left:
            notes.append(f"{pair}: left out at rung(s) {left} (its routers or 2 seeds missing)")
        return row

    name = " - ".join
    family = [dict(fit(name(p)), role="family") for p in TREND_PAIRS]
    family = [row for row in family if row["n_rungs"] > 0]
    positive = dict(fit(name(TREND_POSITIVE)), role="positive control")
    null = dict(fit(name(TREND_NULL)), role="null control")
    bad = [r["rung"] for r in rungs if not r["interpretable"]]
    if null["fit"] is None:
        null["passed"] = None
    else:
        null["passed"] = bool(null["fit"]["lo"] <= 0 <= null["fit"]["hi"])
    if bad:
        why = f"rung(s) {bad} failed their own controls"
    elif null["passed"] is False:
        why = f"the null control's slope ({name(TREND_NULL)}) excludes 0"
    else:
        why = "controls passed" + ("" if null["passed"] else " (no trend null control: fewer "
                                   "than 2 rungs have it)")
    judged = why.startswith("controls passed")
    fitted = [row for row in family if row["fit"]]
    m = len(fitted)
    for row, ph in zip(fitted, holm([row["fit"]["p"] for row in fitted])):
        row["fit"]["p_holm"] = ph
    for row in [*family, positive, null]:
        f = row["fit"]
        a, b = row["pair"].split(" - ")
        if f is None:
            row.update(word=TREND_WORDS[4], mde_slope=None,
                       sentence=f"{row['pair']}: {TREND_WORDS[4]} ({row['n_rungs']} rung(s) with "
                                "2 or more seeds).")
            continue
        level = alpha / m if row["role"] == "family" else alpha
        row["mde_slope"] = slope_mde([q["log2_params"] for q in row["points"]],
                                     [q["sd"] for q in row["points"]],
                                     [q["n"] for q in row["points"]], level, power_goal)
        row["mde_level"] = level
        p_word = f["p_holm"] if row["role"] == "family" else f["p"]
        if row["role"] == "family" and not judged:
            word = TREND_WORDS[3]
        elif p_word < alpha:
            word = TREND_WORDS[0] if f["slope"] * f["at_max"] > 0 else TREND_WORDS[1]
        else:
            word = TREND_WORDS[2]
        row["word"] = word
        slope = (f"slope {describe(dict(f, mean=f['slope']))} nats per doubling of parameters, {row['n_rungs']} rungs, "
                 f"p = {f['p']:.3g}" + (f", Holm p = {f['p_holm']:.3g}" if "p_holm" in f else ""))
        role = "" if row["role"] == "family" else f" ({row['role']}, unadjusted, outside the family)"
        if word in TREND_WORDS[:2]:
            lead = a if f["at_max"] < 0 else b
            change = "widens" if word == TREND_WORDS[0] else "narrows"
            cross = (" The fitted line crosses 0 between the smallest and the largest rung."
                     if f["at_min"] * f["at_max"] < 0 else "")
            row["sentence"] = (f"{row['pair']}{role}: {word}: the gap in favour of {lead} "
                               f"{change} by {abs(f['slope']):.4f} nats per doubling of parameters "
                               f"({slope}).{cross}")
        else:
            mde_txt = ("" if row["mde_slope"] is None else
                       f"; the smallest slope these rungs detect with {power_goal:.0%} power at "
                       f"alpha {level:.3g} is {row['mde_slope']:.4f} per doubling")
            pre = f"not judged ({why})" if word == TREND_WORDS[3] else word
            row["sentence"] = f"{row['pair']}{role}: {pre} ({slope}{mde_txt})."
    if null["fit"] is not None:
        null["sentence"] += " " + ("Passed." if null["passed"] else "FAILED: no trend word is said.")
    for r in rungs:
        rule = r.get("seed_rule")
        if rule and rule["seeds_have"] < rule["seeds_to"]:
            notes.append(f"rung {r['rung']}: the seed rule asks for {rule['seeds_to']} seeds "
                         f"({rule['pair']} sd {rule['sd']:.4f} over seeds {rule['seeds']}: MDE "
                         f"{rule['mde']:.4f} > {rule['goal']}); it has {rule['seeds_have']}")
    return strict_json(dict(
        plan_version=PLAN_VERSION, alpha=alpha, power=power_goal, family_size=m,
        rungs=[{k: r[k] for k in ("rung", "params", "log2_params", "seeds", "plan_version",
                                  "interpretable", "why", "family", "seed_rule")} for r in rungs],
        judged=judged, why=why, pairs=family, positive_control=positive, null_control=null,
        notes=notes))


def strict_json(x):
    """Floats that are NaN or infinite -> None, recursively (what judge() promises too)."""
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def trend_markdown(t):
    """The dict of trend() as markdown: the rungs, then one row per pair."""
    out = [f"## The trend over model sizes (analysis plan v{t['plan_version']})", "",
           "Difference = challenger - baseline final validation loss (nats), paired by seed "
           "within a rung; negative = the challenger is better. Slope: nats per doubling of "
           f"parameters ({SIZE_ROUTER}'s n_params), least squares over every seed, each rung "
           "with its own sd (Welch-Satterthwaite df).", "",
           "| rung | parameters | seeds | plan | controls | seed rule (ec2 - top2, first 5 seeds) |",
           "|---|---|---|---|---|---|"]
    for r in t["rungs"]:
        rule = r["seed_rule"]
        rule = "-" if rule is None else (f"sd {rule['sd']:.4f}, MDE {rule['mde']:.4f}: "
                                         f"{rule['seeds_to']} seeds")
        out.append(f"| {r['rung']} | {r['params']:,} | {len(r['seeds'])} | v{r['plan_version']} | "
                   f"{r['why']} | {rule} |")
    names = [r["rung"] for r in t["rungs"]]
    out += ["", f"Trend family: {t['family_size']} pair(s), Holm; {t['why']}.", "",
            "| pair | " + " | ".join(names) + " | slope per doubling [95% CI] | p | Holm p | "
            "smallest detectable slope (80%) | word |", "|---" * (len(names) + 6) + "|"]
    for row in [*t["pairs"], t["positive_control"], t["null_control"]]:
        at = {q["rung"]: q for q in row["points"]}
        cells = [f"{describe(at[n])} ({at[n]['n']})" if n in at else "-" for n in names]
        f = row["fit"]
        role = "" if row["role"] == "family" else f" ({row['role']})"
        mde_s = "-" if row.get("mde_slope") is None else (
            f"{row['mde_slope']:.4f} (alpha {row['mde_level']:.3g})")
        out.append(f"| {row['pair']}{role} | " + " | ".join(cells) + " | "
                   + ("-" if f is None else describe(dict(f, mean=f["slope"]))) + " | "
                   + ("-" if f is None else f"{f['p']:.3g}") + " | "
                   + ("-" if f is None or f.get("p_holm") is None else f"{f['p_holm']:.3g}")
                   + f" | {mde_s} | **{row['word']}** |")
    out += [""] + [f"- {row['sentence']}" for row in
                   [*t["pairs"], t["positive_control"], t["null_control"]]]
    out += [f"- Note: {n}" for n in t["notes"]]
    return "\n".join(out) + "\n"


def seeds_report(results, goal=MDE_GOAL):
    """For the controls and the family of a results dict -> {pair: dict(n, sd, mde,
    seeds_needed)}: the measured paired sd and what it takes to resolve `goal` nats."""
    j = judge(results)
    rows = ([j["positive_control"]] if j["positive_control"] else []) + j["null_controls"] + \
        j["pairs"]
    return {s["pair"]: dict(n=s["n"], sd=s["sd"], mde=s["mde"],
                            seeds_needed=None if s["sd"] is None else seeds_needed(s["sd"], goal))
            for s in rows}


# ----------------------------------------------------------------------------------------------
# Markdown and the command line.


def ratio_text(e):
    """'0.98 [0.94, 1.02] (5/5 reached)' from one steps_table entry."""
    if not e["read"]:
        return f"plateau ({e['reached']}/{e['n']} reached)"
    if e["ratio"] is None:
        return f"no reading ({e['reached']}/{e['n']} reached)"
    ci = "" if e["lo"] is None else f" [{e['lo']:.2f}, {e['hi']:.2f}]"
    read = "" if e["n_read"] == e["n"] else f", {e['n_read']}/{e['n']} read"
    return f"{e['ratio']:.2f}{ci} ({e['reached']}/{e['n']} reached{read})"


def markdown(j):
    """The judgment dict of judge() as a short markdown text."""
    out = [f"## Judgment under analysis plan v{j['plan_version']} (`python -m lab.stats`)", ""]
    pc = j["positive_control"]
    if pc:
        out.append(f"- Positive control {pc['pair']} = {describe(pc)}"
                   + ("" if pc["p"] is None else f", p = {pc['p']:.3g}") + ": "
                   + {True: "passed", False: "FAILED", None: "not judged (one seed)"}[pc["passed"]])
    for s in j["null_controls"]:
        out.append(f"- Null control {s['pair']} = {describe(s)}: "
                   + {True: "passed", False: "FAILED", None: "not judged (one seed)"}[s["passed"]])
    out.append(f"- Family ({len(j['family'])} pair(s), Holm): " + (", ".join(j["family"]) or "none")
               + f"; pairs are {'interpretable' if j['interpretable'] else 'NOT interpretable'}: "
               + j["why"] + ".")
    out += [f"- {s['sentence']}" for s in j["pairs"]]
    if j["claim_2x"]:
        out.append(f"- {j['claim_2x']['sentence']}")
    out += [f"- Note: {n}" for n in j["notes"]]
    m = len(j["family"])
    out += ["", "| pair | n | mean [95% CI] | sd | p | Holm p | MDE (unadjusted alpha) | MDE at "
            f"alpha/{m} | seeds for MDE <= {j['mde_goal']} (unadjusted) | steps ratio 50% | 75% | "
            "100% |", "|---" * 12 + "|"]
    rows = ([pc] if pc else []) + j["null_controls"] + j["pairs"]

    def num(x, f="{:.4f}"):
        return "-" if x is None else f.format(x)
    roles = {id(pc): " (positive control)", **{id(s): " (null control)" for s in j["null_controls"]}}
    for s in rows:
        out.append(f"| {s['pair']}{roles.get(id(s), '')} | {s['n']} | {describe(s)} | {num(s['sd'])} | "
                   f"{num(s['p'], '{:.3g}')} | {num(s.get('p_holm'), '{:.3g}')} | "
                   f"{num(s['mde'])} | {num(s.get('mde_family'))} | "
                   f"{num(s['seeds_for_goal'], '{}')} | "
                   + " | ".join(ratio_text(s["steps"][str(f)]) for f in TARGET_FRACTIONS) + " |")
    return "\n".join(out) + "\n"


def length_markdown(rows):
    """The rows of length_change() as a short markdown text."""
    out = [f"## Does each conclusion hold at length? (analysis plan v{PLAN_VERSION}, `python -m "
           "lab.stats LONG --against SHORT`)", "", "| pair | short run | long run | change "
           "(long - short) [95% Welch CI] | Holm p | long-run MDE | verdict |", "|---" * 7 + "|"]
    for r in rows:
        c, mde_l = r["change"], r["long"]["mde"]
        out.append(f"| {r['pair']} | {describe(r['short'])} | {describe(r['long'])} | "
                   f"{'-' if c is None else describe(c)} | "
                   f"{'-' if c is None else format(c['p_holm'], '.3g')} | "
                   f"{'-' if mde_l is None else format(mde_l, '.4f')} | **{r['word']}** |")
    return "\n".join(out) + "\n"


def main(argv=None):
    """Print the judgment of each results.json given on the command line."""
    p = argparse.ArgumentParser(prog="python -m lab.stats", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.json files (train_tiny --out DIR)")
    p.add_argument("--json", action="store_true", help="print strict JSON instead of markdown")
    p.add_argument("--against", metavar="SHORT", help="a shorter run set's results.json: say for "
                   "each pair whether its conclusion holds, flips, grows or shrinks in each run set given")
    args = p.parse_args(argv)
    if args.against:
        with open(args.against) as fh:
            short = judge(json.load(fh))
        for path in args.results:
            with open(path) as fh:
                rows = length_change(short, judge(json.load(fh)))
            print(json.dumps(rows, indent=1, allow_nan=False) if args.json else
                  f"# {path} against {args.against}\n\n" + length_markdown(rows))
        return 0
    for path in args.results:
        with open(path) as fh:
            j = judge(json.load(fh))
        print(json.dumps(j, indent=1, allow_nan=False) if args.json else f"# {path}\n\n"
              + markdown(j))
    return 0


if __name__ == "__main__":
    sys.exit(main())
