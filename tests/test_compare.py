"""Properties of compare.py's statistics, on synthetic curves whose answer is known: identical
curves plus noise come out null both ways round, a curve shifted by a known number of steps gives
that shift back, swapping roles gives the reciprocal, and the controls pass or fail as they must."""
import math

import numpy as np
import pytest

import compare

STEPS = np.arange(20, 1001, 20)                  # validation every 20 steps, 1000 steps


def curve(t):
    """A smooth, decreasing loss curve in training steps t."""
    return 1.5 + 3.0 / np.sqrt(np.asarray(t, float) + 20.0)


def run(router, seed, losses, batch_noise=0.0, rng=None):
    losses = [float(x) for x in losses]
    r = dict(router=router, seed=seed, val_step=STEPS.tolist(), val_loss=losses,
             final_val=losses[-1], s_per_step=0.1, tokens_per_s=1.0, n_params=1, moe_layers=[],
             stats={}, train_time=1.0)
    if rng is not None:   # 8 validation batches around the final point
        r["val_batch_loss"] = [list(losses[-1] + batch_noise * rng.standard_normal(8))]
    return r


def result_set(runs, seeds):
    return dict(config=dict(dry_run=False, arch="lm", val_batches=8, eval_every=20, seeds="",
                            dec_layers=4, d_model=64, d_ff=128, experts=16),
                runs=runs, seeds=seeds)


def test_isotonic_fit_pools_violators_and_keeps_monotone_curves():
    """PAV on a hand case: [3, 1, 2, 0] -> [3, 1.5, 1.5, 0]; a decreasing curve is unchanged."""
    assert np.allclose(compare.isotonic_decreasing([3, 1, 2, 0]), [3, 1.5, 1.5, 0])
    y = curve(STEPS)
    assert np.array_equal(compare.isotonic_decreasing(y), y)


def test_identical_curves_plus_noise_are_null_both_ways():
    """30 seeds of the same curve with independent noise: the final-loss CI covers 0 and every
    steps-to-target CI (50% / 75%) covers 1, forward and reverse."""
    rng = np.random.default_rng(0)
    a = {s: run("a", s, curve(STEPS) + 0.01 * rng.standard_normal(len(STEPS))) for s in range(30)}
    b = {s: run("b", s, curve(STEPS) + 0.01 * rng.standard_normal(len(STEPS))) for s in range(30)}
    p = compare.paired(a, b)
    assert p["final_diff"]["lo"] < 0 < p["final_diff"]["hi"]
    for direction in ("forward", "reverse"):
        for f in ("0.5", "0.75"):
            r = p[direction][f]
            assert r["reached"] == 30 and r["lo"] < 1 < r["hi"], (direction, f, r)


def test_the_old_statistic_was_biased_and_ours_is_not():
    """First raw point below the other's single final point: on identical noisy curves both
    directions come out 'early' (< 1). Ours, at 75%, is centred on 1 in both directions."""
    rng = np.random.default_rng(1)
    old, new = [], []
    for _ in range(20):
        x = curve(STEPS) + 0.01 * rng.standard_normal(len(STEPS))
        y = curve(STEPS) + 0.01 * rng.standard_normal(len(STEPS))
        for p, q in ((x, y), (y, x)):
            hit = np.nonzero(p <= q[-1])[0]
            old.append(STEPS[hit[0]] / STEPS[-1] if len(hit) else 1.0)
            new.append(compare.steps_ratio(STEPS, p, STEPS, q, 0.75))
    assert np.mean(old) < 0.95                       # both directions "win": an artifact
    assert abs(np.mean(np.log(new))) < 0.02          # centred on ratio 1


@pytest.mark.parametrize("shift", [50, 100, 200])
def test_a_known_shift_in_steps_is_recovered(shift):
    """Challenger a(t) = L(t + shift): it reaches the baseline's loss at step q*T after
    q*T - shift steps, so the ratio is (q*T - shift) / (q*T) at every target."""
    a = {0: run("a", 0, curve(STEPS + shift))}
    b = {0: run("b", 0, curve(STEPS))}
    p = compare.paired(a, b)
    for f in compare.TARGET_FRACTIONS:
        qT = f * STEPS[-1]
        got = p["forward"][str(f)]["per_seed"][0]
        assert got == pytest.approx((qT - shift) / qT, abs=0.01)
    assert p["reverse"]["1.0"]["per_seed"] == [None]     # the slower curve never gets there


def test_swapped_roles_give_the_reciprocal():
    """a(t) = L(2t) is twice as fast: forward ratio 0.5, reverse ratio 2.0 at the 50% target."""
    a = {0: run("a", 0, curve(2 * STEPS))}
    b = {0: run("b", 0, curve(STEPS))}
    p = compare.paired(a, b)
    fwd, rev = p["forward"]["0.5"]["per_seed"][0], p["reverse"]["0.5"]["per_seed"][0]
    assert fwd == pytest.approx(0.5, abs=0.02) and rev == pytest.approx(2.0, abs=0.04)
    assert fwd * rev == pytest.approx(1.0, abs=0.02)


def test_t_interval_matches_a_hand_computation():
    """[1, 2, 3]: mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321 = 2.4841."""
    mean, lo, hi, sd, n = compare.t_interval([1.0, 2.0, 3.0])
    assert (mean, sd, n) == (2.0, 1.0, 3)
    assert hi - mean == pytest.approx(2.4841, abs=1e-4) and mean - lo == pytest.approx(2.4841, abs=1e-4)
    assert compare.t_interval([1.0])[1] == -math.inf


def _controls(moe_gain, aa_noise=0.003, seeds=5):
    rng = np.random.default_rng(2)
    runs = []
    for s in range(seeds):
        base = curve(STEPS) + 0.01 * rng.standard_normal()           # seed effect, shared
        runs += [run("dense", s, base + 0.002 * rng.standard_normal(len(STEPS)), 0.05, rng),
                 run("top2", s, base - moe_gain + 0.002 * rng.standard_normal(len(STEPS)), 0.05, rng),
                 run("top2_aa", s, base - moe_gain + aa_noise * rng.standard_normal(len(STEPS)),
                     0.05, rng),
                 run("ec2", s, base - moe_gain + 0.002 * rng.standard_normal(len(STEPS)), 0.05, rng)]
    return compare.analyse(result_set(runs, list(range(seeds))))


def test_positive_control_passes_only_when_moe_beats_dense_clearly():
    """MoE 0.1 below dense: passed, and the verdict's headline says so. No gain, or MoE clearly
    worse than dense: the headline is INCONCLUSIVE and no comparison is interpreted."""
    good = _controls(moe_gain=0.1)
    assert good["positive"]["passed"] and good["verdict"][0].startswith("Positive control passed")
    bad = _controls(moe_gain=0.0)
    assert not bad["positive"]["passed"]
    assert not _controls(moe_gain=-0.1)["positive"]["passed"]    # a clear gap the wrong way
    assert bad["verdict"][0].startswith("INCONCLUSIVE")
    assert any("not interpretable" in v for v in bad["verdict"])


def test_null_control_is_null_for_an_aa_pair_and_fails_for_a_real_gap():
    """top2_aa (same curve, other noise) passes the null control; an A/A pair that is in fact
    0.05 worse fails it."""
    assert all(p["passed"] for p in _controls(moe_gain=0.1)["null"].values())
    rng = np.random.default_rng(3)
    runs = []
    for s in range(5):
        runs += [run("top2", s, curve(STEPS) + 0.002 * rng.standard_normal(len(STEPS))),
                 run("top2_aa", s, curve(STEPS) + 0.05 + 0.002 * rng.standard_normal(len(STEPS)))]
    a = compare.analyse(result_set(runs, list(range(5))))
    assert not a["null"]["top2_aa"]["passed"]


def test_markdown_and_plot_of_a_synthetic_set(tmp_path):
    """The report names both controls and every pair; the figure is written."""
    rng = np.random.default_rng(4)
    runs = [run(rt, s, curve(STEPS) + 0.01 * rng.standard_normal(len(STEPS)), 0.05, rng)
            for s in range(3) for rt in ("top2", "ec2", "dense", "top2_aa")]
    res = result_set(runs, [0, 1, 2])
    res.update(command="synthetic", hardware=dict(summary="none"), wall_time_s=0.0,
               train_time_sum_s=0.0, corpus=dict(source="synthetic", total_bytes=0, sha256="0" * 64))
    res["config"].update(seeds="0,1,2", steps=1000)
    res["analysis"] = compare.analyse(res)
    md = compare.markdown(res)
    assert "positive control" in md and "null control" in md and "ec2 vs top2" in md
    compare.plot(tmp_path / "f.png", res)
    assert (tmp_path / "f.png").stat().st_size > 10_000
