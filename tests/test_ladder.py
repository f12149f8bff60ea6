"""lab/ladder.py on synthetic result files: nothing is trained here.

The rung results are results.json-shaped dicts with the fields lab.stats reads (router, seed,
n_params, val_step, val_loss, final_val); train_tiny.main is replaced where a test needs the
ladder to "train".
"""
import json
import math

import numpy as np
import pytest

import train_tiny
from lab import ladder, stats

ROUTERS = train_tiny.LADDER_ROUTERS.split(",")
PARAMS = {64: 674_752, 128: 2_627_328, 256: 10_366_336, 512: 41_179_904}


def fake_results(d, seeds=range(5), effects=None, sd=0.002, rng=None):
    """A rung's results.json: each router's final loss = 1.7 + its effect at this rung + noise
    (per seed, shared by the routers of a seed, plus per run); the curves end at it."""
    rng = rng or np.random.default_rng(d)
    x = math.log2(PARAMS[d]) - math.log2(PARAMS[64])
    effects = effects or {}
    runs = []
    for s in seeds:
        shared = 0.01 * rng.standard_normal()
        for r in ROUTERS:
            e = effects.get(r, (0.0, 0.0))
            final = 1.7 + e[0] + e[1] * x + shared + sd * rng.standard_normal()
            curve = [final + 0.5 / k for k in range(1, 12)] + [final]
            runs.append(dict(router=r, seed=s, n_params=PARAMS[d] // (3 if r == "dense" else 1),
                             val_step=list(range(50, 601, 50)), val_loss=curve, final_val=final))
    return dict(command=f"python train_tiny.py (synthetic d={d})", config={}, seeds=list(seeds),
                hardware=dict(summary="synthetic"), wall_time_s=1.0, runs=runs)


# (level, slope per doubling) of each router's loss: dense well behind (the positive control
# passes), ec1 ahead of top1 by a gap that widens with size, ec2 = top2 at every size
EFFECTS = {"dense": (0.03, 0.0), "top1": (0.02, 0.0), "ec1": (0.0, -0.005)}


def write_rung(path, results):
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(results))


def test_parse_arguments_and_their_errors():
    assert ladder.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert ladder.parse_seeds("0,1,2") == [0, 1, 2] and ladder.parse_seeds("0-1,7") == [0, 1, 7]
    for bad in ("4-0", "a", "0,0", "1-"):
        with pytest.raises(ValueError, match="--seeds"):
            ladder.parse_seeds(bad)
    assert ladder.parse_rungs("128,256") == [128, 256]
    for bad in ("100", "128,128", "", "x"):
        with pytest.raises(ValueError, match="--rungs"):
            ladder.parse_rungs(bad)
    assert ladder.parse_reuse("64=assets/lm_after_ec") == {64: ladder.Path("assets/lm_after_ec")}
    assert ladder.parse_reuse("") == {}
    with pytest.raises(ValueError, match="--reuse"):
        ladder.parse_reuse("64:assets")


def test_rung_argv_is_the_rung_config_and_dry_run_trains_nothing(tmp_path, capsys, monkeypatch):
    """The train_tiny argv of a rung carries rung(d)'s widths and lr, the ladder's routers and
    seeds, its own directory, --resume when asked; train_tiny parses it into exactly that config
    (d_model, d_ff, n_heads, lr; steps and tokens the default's). --dry-run prints the commands and
    writes nothing."""
    argv = ladder.rung_argv(128, [0, 1, 2, 3, 4], tmp_path, resume=True, extra=["--workers", "2"])
    assert argv[:6] == ["--routers", train_tiny.LADDER_ROUTERS, "--seeds", "0,1,2,3,4", "--out",
                        str(tmp_path / "d128")]
    assert "--resume" in argv and argv[-2:] == ["--workers", "2"]
    cfg, _ = train_tiny.parse_config(argv + ["--device", "cpu"])
    assert {k: getattr(cfg, k) for k in train_tiny.rung(128)} == train_tiny.rung(128)
    default, _ = train_tiny.parse_config(["--device", "cpu"])
    for k in ("steps", "batch_size", "chunk_bytes", "experts", "dec_layers", "warmup", "cooldown"):
        assert getattr(cfg, k) == getattr(default, k), k
    monkeypatch.setattr(train_tiny, "main", lambda *a: pytest.fail("--dry-run trained"))
    out = tmp_path / "ladder"
    assert ladder.main(["--dry-run", "--rungs", "64,128,256", "--seeds", "0-4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "d64: reused from assets/lm_after_ec" in printed
    assert f"--out {out / 'd256'} --d-model 256 --d-ff 512" in printed
    assert not out.exists()


def test_cuda_defaults_are_the_gpu_rungs_with_top2_dropless(monkeypatch):
    monkeypatch.setattr(ladder.torch.cuda, "is_available", lambda: True)
    a = ladder.build_parser().parse_args([])
    assert a.rungs == "512,1024" and a.routers == train_tiny.LADDER_ROUTERS + ",top2_dropless"
    assert a.routers == train_tiny.GPU_PRESET["routers"]  # what gpu_check projects the rungs with
    monkeypatch.setattr(ladder.torch.cuda, "is_available", lambda: False)
    a = ladder.build_parser().parse_args([])
    assert a.rungs == "128,256" and a.routers == train_tiny.LADDER_ROUTERS


def test_judge_only_writes_the_trend_and_records_the_plan(tmp_path):
    """Three synthetic rungs (d64 reused from another directory, d128 and d256 in OUT): each is
    judged alone, the trend finds ec1's widening lead and no ec2 - top2 trend, the reused rung is
    disclosed with a sensitivity line, and ladder.json records the plan version and the command."""
    out, reused = tmp_path / "ladder", tmp_path / "committed"
    write_rung(reused, fake_results(64, seeds=range(12), effects=EFFECTS))
    for d in (128, 256):
        write_rung(out / f"d{d}", fake_results(d, effects=EFFECTS))
    assert ladder.main(["--judge-only", "--out", str(out), "--reuse", f"64={reused}"]) == 0
    j = json.loads((out / "trend.json").read_text())
    t = j["trend"]
    assert j["plan_version"] == t["plan_version"] == stats.PLAN_VERSION == "4"
    assert [r["rung"] for r in t["rungs"]] == ["d64", "d128", "d256"]
    assert [r["reused"] for r in t["rungs"]] == [True, False, False]
    assert all(r["interpretable"] for r in t["rungs"]) and t["judged"]
    words = {row["pair"]: row["word"] for row in t["pairs"]}
    assert words["ec1 - top1"] == "grows with size", t["pairs"][0]["sentence"]
    assert words["ec2 - top2"] == "no trend detected"
    assert t["null_control"]["passed"]
    assert j["sensitivity_without_reused"]["rungs"][0]["rung"] == "d128"
    md = (out / "trend.md").read_text()
    assert "reuses the committed 12-seed run set" in md and "Sensitivity" in md
    assert "| ec1 - top1 |" in md and (out / "trend.png").stat().st_size > 10_000
    book = json.loads((out / "ladder.json").read_text())
    entry = book["invocations"][-1]
    assert book["plan_version"] == entry["plan_version"] == "4" and entry["judge_only"]
    assert entry["command"].startswith("python -m lab.ladder --judge-only") and entry["started"]
    json.dumps(j, allow_nan=False)


def test_top2_dropless_is_trained_on_cuda_but_not_judged(tmp_path):
    """Rungs that also hold top2_dropless runs (the GPU rungs) are judged on the ladder's routers
    only: the same family at every rung, no pair with top2_dropless in a rung or in the trend."""
    out = tmp_path / "ladder"
    for d in (128, 256):
        res = fake_results(d, effects=EFFECTS)
        res["runs"] += [dict(r, router="top2_dropless", final_val=r["final_val"] - 0.05)
                        for r in res["runs"] if r["router"] == "top2"]
        write_rung(out / f"d{d}", res)
    routers = train_tiny.GPU_PRESET["routers"]
    assert "top2_dropless" in routers
    assert ladder.main(["--judge-only", "--out", str(out), "--reuse", "", "--routers", routers]) == 0
    j = json.loads((out / "trend.json").read_text())
    assert j["routers"] == train_tiny.LADDER_ROUTERS.split(",")
    named = [s for r in j["trend"]["rungs"] for s in r["sentences"]] + \
        [row["pair"] for row in j["trend"]["pairs"]]
    assert named and not any("dropless" in s for s in named)


def test_training_calls_train_tiny_per_rung_then_judges(tmp_path, monkeypatch):
    """Without --judge-only the ladder runs train_tiny.main once per rung not reused, with the
    rung's argv (--resume passed through), then judges what exists; a second invocation is
    appended to ladder.json."""
    calls = []

    def fake_main(argv):
        calls.append(argv)
        d = int(argv[argv.index("--d-model") + 1])
        write_rung(ladder.Path(argv[argv.index("--out") + 1]), fake_results(d, effects=EFFECTS))
        return {}
    monkeypatch.setattr(train_tiny, "main", fake_main)
    out = tmp_path / "ladder"
    args = ["--rungs", "64,128,256", "--seeds", "0-4", "--out", str(out), "--reuse", "", "--resume"]
    with pytest.raises(SystemExit):          # 64 is not reused here, and is trained
        ladder.main(args + ["--seeds", "0-x"])
    assert ladder.main(args) == 0
    assert [c[c.index("--d-model") + 1] for c in calls] == ["64", "128", "256"]
    assert all("--resume" in c for c in calls)
    assert json.loads((out / "trend.json").read_text())["sensitivity_without_reused"] is None
    calls.clear()
    assert ladder.main(args[:1] + ["128"] + args[2:] + ["--reuse", f"64={out / 'd64'}"]) == 0
    assert len(calls) == 1 and calls[0][calls[0].index("--out") + 1] == str(out / "d128")
    book = json.loads((out / "ladder.json").read_text())
    assert len(book["invocations"]) == 2
    assert book["invocations"][1]["trained"] == [128]


def test_a_stopped_rung_and_an_empty_ladder(tmp_path, monkeypatch, capsys):
    """train_tiny stopped early (--stop-after: it returns None): the ladder stops and says
    --resume; nothing to judge: exit status 1 with a message."""
    monkeypatch.setattr(train_tiny, "main", lambda argv: None)
    assert ladder.main(["--rungs", "128", "--out", str(tmp_path / "a"), "--reuse", ""]) == 1
    assert "--resume" in capsys.readouterr().out
    assert ladder.main(["--judge-only", "--out", str(tmp_path / "b"), "--reuse", ""]) == 1
    assert "no rung" in capsys.readouterr().out
