"""lab/stats.py (the analysis plan) checked by simulation from the committed runs.

Each simulated experiment draws validation curves from the shape and noise of a committed run set:
the truth is the committed mean curve of top2 and top2_aa (the same router, so the same truth),
and every run adds noise with the committed per-point sd of a run (the sd over seeds of the A/A
paired difference at that point / sqrt 2), correlated from one point to the next (AR(1), rho 0.5:
the committed A/A difference curves show a lag-1 correlation of 0.1 to 0.6). The rates these
tests measure are printed: run with -s to see them. Fixed seeds: the numbers are deterministic.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from lab import stats

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "assets" / "lm_pretrain" / "results.json"
SHAPES = ("lm_pretrain", "lm_long", "t5_controls")     # 600-step LM, 1,600-step LM, T5 plateau
RHO = 0.5


def load(name):
    return json.loads((ROOT / "assets" / name / "results.json").read_text())


def committed(name, router="top2"):
    """-> steps [m], truth curve [m] (mean of router and router_aa over seeds), per-run point
    noise sd [m] (sd over seeds of the A/A difference / sqrt 2)."""
    by = stats.runs_by_router(load(name))
    seeds = sorted(by[router])
    A = np.array([by[router + "_aa"][s]["val_loss"] for s in seeds])    # [seeds, m]
    B = np.array([by[router][s]["val_loss"] for s in seeds])
    steps = np.array(by[router][seeds[0]]["val_step"], dtype=float)
    return steps, np.concatenate([A, B]).mean(0), (A - B).std(0, ddof=1) / math.sqrt(2)


def truth(steps, curve):
    """The committed curve as a function of the step: linear in log-step between validation
    points, extended with its end slopes, so that it can be rescaled in time (g(t / r))."""
    u, y = np.log(steps), np.minimum.accumulate(curve)
    s0, s1 = (y[1] - y[0]) / (u[1] - u[0]), (y[-1] - y[-2]) / (u[-1] - u[-2])

    def g(t):
        x = np.log(np.asarray(t, dtype=float))
        return np.where(x < u[0], y[0] + s0 * (x - u[0]),
                        np.where(x > u[-1], y[-1] + s1 * (x - u[-1]), np.interp(x, u, y)))
    return g


def noisy(rng, clean, sigma, shape):
    """clean [m] + AR(1) noise with per-point sd sigma [m] -> [*shape, m]."""
    z = rng.standard_normal(shape + (len(clean),))
    e = np.empty_like(z)
    e[..., 0] = z[..., 0]
    for i in range(1, len(clean)):
        e[..., i] = RHO * e[..., i - 1] + math.sqrt(1 - RHO ** 2) * z[..., i]
    return clean + sigma * e


def runs(steps, curves):
    """[seeds, m] curves -> list of run dicts as train_tiny writes them (the fields used here)."""
    return [dict(val_step=steps.tolist(), val_loss=c.tolist(), final_val=float(c[-1]))
            for c in curves]


# ----------------------------------------------------------------------------------------------
# Controls.


@pytest.mark.parametrize("n_seeds", [5, 3])
def test_null_control_false_alarm_is_about_5_percent(n_seeds):
    """2,000 simulated A/A experiments (both curves from the same truth): the null control fails
    in 2-8% of them (the plan's single test at alpha = 0.05)."""
    steps, curve, sigma = committed("lm_pretrain")
    rng = np.random.default_rng(17 + n_seeds)
    A = noisy(rng, curve, sigma, (2000, n_seeds))                 # [experiments, seeds, m]
    B = noisy(rng, curve, sigma, (2000, n_seeds))
    diffs = A[:, :, -1] - B[:, :, -1]                              # final validation loss
    rate = np.mean([stats.null_control(d)["passed"] is False for d in diffs])
    print(f"\nnull control, {n_seeds} seeds: false alarm {rate:.3f} over 2000 A/A experiments "
          f"(simulated paired sd {diffs.std():.4f}; committed A/A paired sd "
          f"{sigma[-1] * math.sqrt(2):.4f})")
    assert 0.02 <= rate <= 0.08


def test_positive_control_false_pass_and_power():
    """MoE - dense with no true difference passes <= 5% of the time; with the committed effect
    (top2 - dense, its paired sd) it passes nearly always at 5 seeds, and the simulated rate
    matches the exact power of the rule."""
    by = stats.runs_by_router(load("lm_pretrain"))
    _, d = stats.final_diffs(by["top2"], by["dense"])
    effect, sd = float(np.mean(d)), float(np.std(d, ddof=1))
    seed_sd = float(np.std([r["final_val"] for r in by["dense"].values()], ddof=1))
    rng = np.random.default_rng(5)
    for n in (5, 3):
        for true in (0.0, effect):
            shared = seed_sd * rng.standard_normal((2000, n))       # what a seed's runs share
            dense = 1.73 + shared + sd / math.sqrt(2) * rng.standard_normal((2000, n))
            moe = 1.73 + true + shared + sd / math.sqrt(2) * rng.standard_normal((2000, n))
            rate = np.mean([stats.positive_control(x)["passed"] for x in moe - dense])
            # the rule passes when the upper end of the 95% interval is below 0: one tail
            exact = stats.power(true, sd, n) if true else 0.025
            print(f"\npositive control, {n} seeds, true MoE - dense {true:+.4f} (paired sd "
                  f"{sd:.4f}): passes {rate:.3f} (exact one-sided rate {exact:.3f})")
            if true == 0.0:
                assert rate <= 0.05
            else:
                assert abs(rate - exact) < 0.03
                assert rate > (0.99 if n == 5 else 0.8)


# ----------------------------------------------------------------------------------------------
# Power: the MDE, by simulation.


@pytest.mark.parametrize("n", [3, 5, 10])
def test_mde_has_80_percent_power_by_simulation(n):
    """A true difference equal to mde(sd, n) is found (paired t, p < 0.05) in 80% +- 5% of 2,000
    simulated experiments; seeds_needed gives the smallest n whose MDE meets the goal."""
    sd = 0.0083                                       # the committed A/A paired sd (lm_pretrain)
    effect = stats.mde(sd, n)
    rng = np.random.default_rng(n)
    diffs = effect + sd * rng.standard_normal((2000, n))
    found = np.mean([stats.paired_t(x)["p"] < 0.05 for x in diffs])
    approx = (scipy.stats.t.ppf(0.975, n - 1) + scipy.stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
    print(f"\nMDE at {n} seeds, sd {sd}: {effect:.4f} nats (approximation {approx:.4f}); "
          f"simulated power {found:.3f}")
    assert abs(found - 0.8) <= 0.05
    k = stats.seeds_needed(sd, 0.015)
    assert stats.mde(sd, k) <= 0.015 < stats.mde(sd, k - 1)


# ----------------------------------------------------------------------------------------------
# Steps to target: known time-scale ratios, both directions, A/A coverage.


def simulate_ratio(name, ratio, n_exp, rng, n_seeds=5):
    """n_exp experiments: challenger curves g(t / ratio), baseline g(t) -> list of steps_table
    dicts (challenger vs baseline) and of the same with roles swapped (first 10 experiments)."""
    steps, curve, sigma = committed(name)
    g = truth(steps, curve)
    A = noisy(rng, g(steps / ratio), sigma, (n_exp, n_seeds))
    B = noisy(rng, g(steps), sigma, (n_exp, n_seeds))
    fwd = [stats.steps_table(runs(steps, a), runs(steps, b)) for a, b in zip(A, B)]
    rev = [stats.steps_table(runs(steps, b), runs(steps, a)) for a, b in zip(A[:10], B[:10])]
    return fwd, rev


@pytest.mark.parametrize("name", SHAPES)
def test_steps_ratio_recovers_known_time_scales_both_ways(name):
    """Challenger = baseline on a clock 0.5x, 0.8x, 1x, 1.25x or 2x as fast: where the plan reads
    a target, the geometric mean of the estimates is within 5% of the true ratio (|log error|
    <= 0.05), and swapping the roles gives exactly the reciprocal."""
    rng = np.random.default_rng(3)
    print(f"\nsteps to target, {name}, 5 seeds, 100 experiments per ratio: "
          "log bias (read fraction)")
    for ratio in (0.5, 0.8, 1.0, 1.25, 2.0):
        fwd, rev = simulate_ratio(name, ratio, 100, rng)
        line = f"  true {ratio:<4}:"
        for f in stats.TARGET_FRACTIONS:
            got = [t[str(f)]["ratio"] for t in fwd if t[str(f)]["read"]]
            read = len(got) / len(fwd)
            if read < 0.5:            # a plateau: the plan does not read this target
                line += f"  {f:.0%} plateau ({read:.2f})"
                continue
            bias = float(np.mean(np.log(got)) - math.log(ratio))
            line += f"  {f:.0%} {bias:+.3f} ({read:.2f})"
            assert abs(bias) <= 0.05, (name, ratio, f, bias)
            for a, b in zip(fwd, rev):
                x, y = a[str(f)], b[str(f)]
                assert x["read"] == y["read"]
                if x["read"]:
                    assert x["ratio"] * y["ratio"] == pytest.approx(1.0, rel=1e-9)
                    assert x["lo"] * y["hi"] == pytest.approx(1.0, rel=1e-9)
        print(line)
    if name == "lm_pretrain":     # the headline shape: every target is read
        assert all(t[str(f)]["read"] for t in fwd for f in stats.TARGET_FRACTIONS)


@pytest.mark.parametrize("name", SHAPES)
def test_steps_ratio_a_a_interval_excludes_1_rarely(name):
    """A/A (true ratio 1): the 95% interval of the ratio excludes 1 in at most 8% of 600
    simulated experiments, at every target that is read; nothing is censored."""
    rng = np.random.default_rng(11)
    fwd, _ = simulate_ratio(name, 1.0, 600, rng)
    line = f"\nsteps to target, {name}, A/A: interval excludes 1 in"
    for f in stats.TARGET_FRACTIONS:
        read = [t[str(f)] for t in fwd if t[str(f)]["read"]]
        if len(read) < 300:
            line += f"  {f:.0%}: plateau"
            continue
        assert all(e["n_read"] == e["n"] for e in read)
        miss = np.mean([not e["lo"] <= 1.0 <= e["hi"] for e in read])
        reached = np.mean([e["reached"] / e["n"] for e in read])
        line += f"  {f:.0%}: {miss:.3f} (challenger reaches the target in {reached:.0%} of seeds)"
        assert miss <= 0.08, (name, f, miss)
    print(line)


def test_a_single_censored_seed_does_not_decide_the_2x_claim():
    """EC is 2.5x faster in four seeds and a hair slower in one (it never reaches top-2's final
    loss there): the claim is unresolved, not 'does not hold' (v0 said it failed)."""
    steps, curve, sigma = committed("lm_pretrain")
    g, rng = truth(steps, curve), np.random.default_rng(0)
    rows = []
    for seed in range(5):
        base = g(steps) + 0.002 * rng.standard_normal(len(steps))
        ec = g(steps / 0.4) if seed < 4 else base + 0.001
        for router, c in (("top2", base), ("ec2", ec), ("dense", base + 0.05),
                          ("top2_aa", base + 0.003 * (-1) ** seed)):
            rows.append(dict(runs(steps, [c])[0], router=router, seed=seed))
    j = stats.judge(dict(runs=rows, seeds=list(range(5)), config={}))
    e = next(p for p in j["pairs"] if p["pair"] == "ec2 - top2")["steps"]["1.0"]
    assert j["interpretable"] and e["reached"] == 4 and e["n_read"] == 5
    assert j["claim_2x"]["verdict"] == "unresolved", j["claim_2x"]


# ----------------------------------------------------------------------------------------------
# The small pieces, bad input, and judge() on every committed run set.


def test_paired_t_and_holm_on_hand_cases():
    """paired_t agrees with scipy's one-sample t-test; Holm on [0.01, 0.04, 0.03] is
    [0.03, 0.06, 0.06]; the issue's example: the smallest of 21 p-values, 0.005, becomes 0.105."""
    x = [0.021, 0.0005, 0.0079, -0.011, 0.0306]
    s = stats.paired_t(x)
    ref = scipy.stats.ttest_1samp(x, 0.0)
    assert s["p"] == pytest.approx(ref.pvalue) and s["lo"] < s["mean"] < s["hi"]
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([None, 0.02]) == [None, 0.02]
    assert stats.holm([0.005] + [0.5] * 20)[0] == pytest.approx(0.105)
    one = stats.paired_t([0.01])
    assert one["lo"] is None and one["p"] is None and one["n"] == 1


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="non-empty"):
        stats.paired_t([])
    with pytest.raises(ValueError, match="NaN"):
        stats.paired_t([0.1, float("nan")])
    run = dict(final_val=1.0)
    with pytest.raises(ValueError, match="seeds do not match"):
        stats.final_diffs({0: run}, {1: run})
    with pytest.raises(ValueError, match="non-finite"):
        stats.final_diffs({0: run}, {0: dict(final_val=float("nan"))})
    with pytest.raises(ValueError, match="n >= 2"):
        stats.mde(0.01, 1)
    with pytest.raises(ValueError, match="runs"):
        stats.judge({})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.holm([0.5, 1.2])


@pytest.mark.parametrize("path", sorted(ROOT.glob("assets/**/results.json")),
                         ids=lambda p: str(p.parent.relative_to(ROOT / "assets")))
def test_judge_runs_on_every_committed_results_json(path):
    """Strict JSON out (no NaN, no Infinity) for every committed run set."""
    j = stats.judge(json.loads(path.read_text()))
    json.dumps(j, allow_nan=False)
    assert j["plan_version"] == stats.PLAN_VERSION
    for s in j["pairs"]:
        assert s["resolved"] == (s["p_holm"] is not None and s["p_holm"] < 0.05)
        assert s["sentence"].startswith(s["pair"])


def test_judge_lm_pretrain_and_seeds_report():
    """The headline run set: controls pass, four pairs in the family, EC-CF1 beats top-1, EC-CF2
    - top-2 is not resolved; the seeds report reaches the MDE goal with the seeds it names."""
    j = stats.judge(load("lm_pretrain"))
    assert j["positive_control"]["passed"] and [s["passed"] for s in j["null_controls"]] == [True]
    assert j["family"] == ["ec1 - top1", "ec2 - top2", "ec2 - top2_dropless", "ec2 - dense"]
    res = {s["pair"]: s["resolved"] for s in j["pairs"]}
    assert res["ec1 - top1"] and not res["ec2 - top2"]
    report = stats.seeds_report(load("lm_pretrain"))
    print("\nseeds report, assets/lm_pretrain:")
    for pair, r in report.items():
        print(f"  {pair}: n {r['n']}, paired sd {r['sd']:.4f}, MDE {r['mde']:.4f}, "
              f"seeds for MDE <= {stats.MDE_GOAL}: {r['seeds_needed']}")
        assert stats.mde(r["sd"], r["seeds_needed"]) <= stats.MDE_GOAL


def test_judge_one_seed_says_so_and_stays_strict_json(capsys):
    """One seed: no interval anywhere, the controls cannot pass, and the output is strict JSON."""
    steps = np.arange(50, 601, 50, dtype=float)
    rows = [dict(runs(steps, [2.5 - 0.1 * np.log(steps / 50) + k])[0], router=rt, seed=0)
            for rt, k in (("top2", 0.0), ("ec2", 0.01), ("dense", 0.03), ("top2_aa", 0.002))]
    j = stats.judge(dict(runs=rows, seeds=[0], config={}))
    json.dumps(j, allow_nan=False)
    assert j["positive_control"]["passed"] is None and not j["interpretable"]
    for s in j["pairs"]:
        assert s["lo"] is None and s["p_holm"] is None and "one seed: no interval" in s["sentence"]
    assert "one seed" in stats.markdown(j)
    assert stats.main([str(PRETRAIN)]) == 0
    assert f"plan v{stats.PLAN_VERSION}" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Plan v3: does a conclusion hold at length?


def judged(pairs, interpretable=True):
    """A judge()-shaped dict for length_change from {pair: per-seed differences}, one family."""
    rows = [dict(pair=name, mde=stats.mde(np.std(d, ddof=1), len(d)), **stats.paired_t(d))
            for name, d in pairs.items()]
    for s, ph in zip(rows, stats.holm([s["p"] for s in rows])):
        s.update(p_holm=ph, resolved=ph < 0.05)
    return dict(pairs=rows, interpretable=interpretable)


def test_welch_equals_scipy_both_ways_round():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.02, 0.01, 5), rng.normal(0.0, 0.004, 12)
    w = stats.welch(a.mean(), a.std(ddof=1), 5, b.mean(), b.std(ddof=1), 12)
    ref = scipy.stats.ttest_ind(a, b, equal_var=False)
    assert w["p"] == pytest.approx(ref.pvalue, rel=1e-10)
    ci = ref.confidence_interval(0.95)
    assert (w["lo"], w["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-10)
    back = stats.welch(b.mean(), b.std(ddof=1), 12, a.mean(), a.std(ddof=1), 5)
    assert back["p"] == pytest.approx(w["p"]) and back["lo"] == pytest.approx(-w["hi"])
    with pytest.raises(ValueError, match="n >= 2"):
        stats.welch(0.0, 0.01, 1, 0.0, 0.01, 5)


def test_length_change_words_on_hand_cases():
    """One constructed case per word (sd ~0.001: every resolved/unresolved call is unambiguous)."""
    wiggle = np.array([-1.0, 1.0, -0.5, 0.5, 0.0]) * 1e-3
    short = judged({"a - b": -0.03 + wiggle, "c - d": -0.03 + wiggle, "e - f": -0.03 + wiggle,
                    "g - h": -0.03 + wiggle, "i - j": -0.03 + wiggle, "k - l": wiggle, "m - n": wiggle})
    long_ = judged({"a - b": 0.03 + wiggle,            # resolved the other way: flips
                    "c - d": -0.06 + wiggle,           # further from 0: grows
                    "e - f": -0.01 + wiggle,           # still resolved, nearer 0: shrinks
                    "g - h": -0.03 + 0.2 * wiggle,     # same: holds
                    "i - j": -0.03 + np.array([-40.0, 40.0, -20.0, 20.0, 0.0]) * 1e-3,  # too noisy
                    "k - l": 0.02 + wiggle,            # resolved only at length: appears
                    "m - n": wiggle})                  # null at both lengths
    words = {r["pair"]: r["word"] for r in stats.length_change(short, long_)}
    assert words == {"a - b": "flips", "c - d": "grows", "e - f": "shrinks", "g - h": "holds",
                     "i - j": "not decided", "k - l": "appears", "m - n": "not resolved at either length"}
    assert set(words.values()) | {"not judged (controls)"} == set(stats.LENGTH_WORDS)
    rows = stats.length_change(short, judged({"a - b": 0.03 + wiggle}, interpretable=False))
    assert [r["word"] for r in rows] == ["not judged (controls)"]
    md = stats.length_markdown(stats.length_change(short, long_))
    assert "**flips**" in md and "**grows**" in md
    json.dumps(stats.length_change(short, long_), allow_nan=False)


@pytest.mark.parametrize("truth", ["same", "doubled"])
def test_length_change_false_alarm_and_power_by_simulation(truth):
    """Run the other way round: a true difference of -0.03 at both lengths (12 short seeds of sd
    0.01, 5 long seeds of sd 0.015, the scale of the committed runs) is called "grows", "shrinks"
    or "flips" in about 5% of 2,000 experiments, at most; doubled at length (-0.06) it is called
    "grows" most of the time."""
    rng = np.random.default_rng(1)
    long_truth = -0.03 if truth == "same" else -0.06
    words = []
    for _ in range(2000):
        short = judged({"x - y": rng.normal(-0.03, 0.01, 12)})
        long_ = judged({"x - y": rng.normal(long_truth, 0.015, 5)})
        words.append(stats.length_change(short, long_)[0]["word"])
    rate = {w: words.count(w) / len(words) for w in set(words)}
    print(f"\n{truth}: {rate}")
    if truth == "same":
        assert rate.get("grows", 0) + rate.get("shrinks", 0) + rate.get("flips", 0) < 0.075
        assert rate.get("holds", 0) > 0.8
    else:
        assert rate.get("grows", 0) > 0.5 and rate.get("shrinks", 0) + rate.get("flips", 0) == 0


def test_length_change_on_the_committed_long_run(capsys):
    """The committed 2,400-step run set against the 600-step one, through the command line: both
    run sets' controls pass, and EC-CF1 - top-1 holds (resolved at both lengths, same sign)."""
    long_path = ROOT / "assets" / "lm_long2400_all" / "results.json"
    short_path = ROOT / "assets" / "lm_after_ec" / "results.json"
    rows = {r["pair"]: r for r in stats.length_change(stats.judge(load("lm_after_ec")),
                                                      stats.judge(load("lm_long2400_all")))}
    assert rows["ec1 - top1"]["word"] == "holds" and len(rows) == 8
    assert stats.main([str(long_path), "--against", str(short_path)]) == 0
    assert "| ec1 - top1 |" in capsys.readouterr().out
