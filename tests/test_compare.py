"""Properties of the report (lab/compare.py) on synthetic run sets whose answer is known: the
verdict follows the analysis plan's controls, a one-seed set prints no nonsense, the markdown and
the figure name every pair, and a damaged run directory gives an error naming the file. The
statistics themselves are tested in test_stats.py."""
import json

import numpy as np
import pytest

from lab import compare

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
    res = dict(config=dict(dry_run=False, arch="lm", val_batches=8, eval_every=20,
                           seeds=",".join(map(str, seeds)), steps=1000, dec_layers=4, d_model=64,
                           d_ff=128, experts=16),
               runs=runs, seeds=seeds, command="synthetic", hardware=dict(summary="none"),
               wall_time_s=0.0, train_time_sum_s=0.0,
               corpus=dict(source="synthetic", total_bytes=0, sha256="0" * 64))
    res["analysis"] = compare.analyse(res)
    return res


def controls(moe_gain, aa_shift=0.0, seeds=5):
    rng = np.random.default_rng(2)
    runs = []
    for s in range(seeds):
        base = curve(STEPS) + 0.01 * rng.standard_normal()           # seed effect, shared
        runs += [run(rt, s, base - gain + 0.002 * rng.standard_normal(len(STEPS)), 0.05, rng)
                 for rt, gain in (("dense", 0.0), ("top2", moe_gain),
                                  ("top2_aa", moe_gain - aa_shift), ("ec2", moe_gain))]
    return result_set(runs, list(range(seeds)))


def test_verdict_follows_the_positive_control():
    """MoE 0.1 below dense: the control passes and the pairs are read. No gain, or MoE clearly
    worse than dense: the verdict says INCONCLUSIVE and no pair is interpreted."""
    good = controls(moe_gain=0.1)["analysis"]
    assert good["judgment"]["positive_control"]["passed"] and good["judgment"]["interpretable"]
    assert good["verdict"][0].startswith("Positive control top2 - dense") and "passed" in good["verdict"][0]
    for gain in (0.0, -0.1):
        bad = controls(moe_gain=gain)["analysis"]
        assert not bad["judgment"]["interpretable"]
        assert any(v.startswith("INCONCLUSIVE") for v in bad["verdict"])
        assert any("not interpretable" in v for v in bad["verdict"])


def test_verdict_follows_the_null_control():
    """An A/A pair that is in fact 0.05 worse fails the null control, and the pairs are then
    not interpretable."""
    a = controls(moe_gain=0.1, aa_shift=0.05)["analysis"]
    assert a["judgment"]["null_controls"][0]["passed"] is False
    assert any("FAILED" in v for v in a["verdict"]) and not a["judgment"]["interpretable"]


def test_one_seed_prints_no_infinite_interval_and_stays_strict_json():
    """One seed: no interval anywhere, said in words; no 'inf' or 'nan' in the text; the analysis
    is strict JSON."""
    res = controls(moe_gain=0.1, seeds=1)
    text = compare.markdown(res) + compare.console_summary(res)
    assert "one seed" in text and "inf" not in text.lower().replace("info", "") and "nan" not in text.lower()
    json.dumps(res["analysis"], allow_nan=False)


def test_markdown_and_plot_name_every_pair(tmp_path):
    """The report names both controls and every pair; the figure is written."""
    res = controls(moe_gain=0.1, seeds=3)
    md = compare.markdown(res)
    for name in ("top2 - dense", "top2_aa - top2", "ec2 - top2", "ec2 - dense"):
        assert name in md
    compare.plot(tmp_path / "f.png", res)
    assert (tmp_path / "f.png").stat().st_size > 10_000


def test_a_truncated_results_file_is_named(tmp_path):
    """A results.json cut short gives a ValueError naming the file, not a JSONDecodeError."""
    (tmp_path / "results.json").write_text('{"runs": [')
    with pytest.raises(ValueError, match="results.json"):
        compare.load(tmp_path)


def test_a_diverged_run_is_left_out_with_a_note():
    """A run whose loss diverged (final loss null in strict JSON) is left out of its pairs, and
    the judgment says so, instead of the report crashing."""
    res = controls(moe_gain=0.1)
    for r in res["runs"]:
        if r["router"] == "ec2" and r["seed"] == 0:
            r["final_val"], r["val_loss"][-1] = None, None
    a = compare.analyse(res)
    assert any("diverged" in n for n in a["judgment"]["notes"])
    assert {p["pair"]: p["n"] for p in a["judgment"]["pairs"]}["ec2 - top2"] == 4


def test_merge_adds_seeds_and_refuses_overlap_or_another_config(tmp_path):
    """Two run sets of one experiment (seeds 0-2, 3-4) merge into one of seeds 0-4 whose
    judgment equals the judgment of the whole set; the same seed twice, or another config, is
    refused with the directory named."""
    whole = controls(moe_gain=0.1)
    a, b = tmp_path / "a", tmp_path / "b"
    for d, seeds in ((a, [0, 1, 2]), (b, [3, 4])):
        part = result_set([r for r in whole["runs"] if r["seed"] in seeds], seeds)
        compare.write(d, part)
    merged = compare.merge([a, b])
    assert merged["seeds"] == [0, 1, 2, 3, 4] and len(merged["parts"]) == 2
    pair = {p["pair"]: p for p in merged["analysis"]["judgment"]["pairs"]}["ec2 - top2"]
    want = {p["pair"]: p for p in whole["analysis"]["judgment"]["pairs"]}["ec2 - top2"]
    assert pair["mean"] == pytest.approx(want["mean"]) and pair["n"] == 5
    with pytest.raises(ValueError, match="appears in two parts"):
        compare.merge([a, a])
    other = json.loads((b / "results.json").read_text())
    other["config"]["d_model"] = 32
    (b / "results.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="config differs"):
        compare.merge([a, b])


def relabelled(res, labels):
    """res with its routers renamed by {name: label}, its analysis recomputed."""
    runs = [dict(r, router=labels.get(r["router"], r["router"])) for r in res["runs"]]
    return result_set(runs, res["seeds"])


def test_labels_at_one_c_are_judged_as_the_plans_pairs():
    """A run set trained at --capacity-factor 1 carries labels ec2@c1, top2@c1, top2_aa@c1 (dense
    has no c): ec2@c1 - top2@c1 is judged as the plan's ec2 - top2 pair, with the same numbers as
    the same runs named without the suffix, the controls pair likewise, every sentence names the
    labels, and the paper's 2x claim (about c = 2) is not read at c = 1."""
    res = controls(moe_gain=0.1)
    plain = res["analysis"]["judgment"]
    at_c1 = relabelled(res, {"ec2": "ec2@c1", "top2": "top2@c1", "top2_aa": "top2_aa@c1"})
    j = at_c1["analysis"]["judgment"]
    assert j["family"] == ["ec2@c1 - top2@c1", "ec2@c1 - dense"]
    assert j["positive_control"]["pair"] == "top2@c1 - dense" and j["positive_control"]["passed"]
    assert [s["pair"] for s in j["null_controls"]] == ["top2_aa@c1 - top2@c1"]
    for a, b in zip(j["pairs"], plain["pairs"]):
        assert (a["mean"], a["lo"], a["hi"], a["p_holm"]) == (b["mean"], b["lo"], b["hi"], b["p_holm"])
        assert a["sentence"].startswith(a["pair"] + ":") and "top2 " not in a["sentence"]
    assert plain["claim_2x"] is not None and j["claim_2x"] is None
    assert any("2x claim" in n and "ec2@c1 - top2@c1" in n for n in j["notes"])
    assert "ec2@c1 - top2@c1" in compare.markdown(at_c1)


def test_labels_at_different_c_never_pair():
    """ec2@c1 and top2 (c = 2) are not the ec2 - top2 pair: a run set that mixes capacity
    factors pairs only the runs at the table's c, and says so; without "@c" labels the judgment
    is stats.judge's, unchanged."""
    res = controls(moe_gain=0.1)
    mixed = relabelled(res, {"ec2": "ec2@c1"})
    j = mixed["analysis"]["judgment"]
    assert not any("ec2@c1" in p for p in j["family"]) and j["positive_control"]["pair"] == "top2 - dense"
    assert any("several capacity factors" in n for n in j["notes"])
    names, note = compare.judged_names(["ec2", "top2", "dense"])
    assert note is None and names == {"ec2": "ec2", "top2": "top2", "dense": "dense"}
    assert compare.judge(res) == compare.stats.judge(res)
    assert compare.pair_labels(["ec2@c1", "top2@c1", "top2", "dense"], [("ec2", "top2"), ("ec2", "dense")]) \
        == [("ec2@c1", "top2@c1"), ("ec2@c1", "dense")]


def test_curves_figure_beside_the_differences(tmp_path):
    """write() puts curves.png (per-router validation loss, mean over seeds, band: the seed range)
    beside differences.png; a diverged seed is left out of its router's curve, not a crash; the
    command line writes it alone with --curves."""
    res = controls(moe_gain=0.1, seeds=3)
    res["runs"][0]["val_loss"][-1] = None       # a diverged run (strict JSON: null)
    res["runs"][0]["final_val"] = None
    res = result_set(res["runs"], res["seeds"])
    compare.write(tmp_path / "set", res)
    assert (tmp_path / "set" / "differences.png").stat().st_size > 10_000
    assert (tmp_path / "set" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert compare.main([str(tmp_path / "set"), "--curves", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 10_000
