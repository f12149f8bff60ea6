"""lab/sweep.py runs the trainer once per value (dry-run sizes here) and reports every value's
paired differences and positive control; --report-only rebuilds the report; it can vary the
capacity factor; bad flags name the flag."""
import json

import pytest

from lab import sweep


def test_sweep_runs_every_value_and_reports(tmp_path, capsys):
    out = tmp_path / "sw"
    sweep.main(["--flag", "experts", "--values", "4,8", "--out", str(out), "--",
                "--dry-run", "--routers", "top2,ec2,dense", "--seeds", "0,1"])
    s = json.loads((out / "sweep.json").read_text())
    assert [p["value"] for p in s["points"]] == ["4", "8"]
    for p in s["points"]:
        assert set(p["pairs"]) == {"ec2 vs top2", "top2 vs dense", "ec2 vs dense"}
        assert "passed" in p["positive_control"]
        res = json.loads((out / f"experts_{p['value']}" / "results.json").read_text())
        assert res["config"]["experts"] == int(p["value"])
    assert (out / "sweep.png").stat().st_size > 10_000 and "| 8 |" in (out / "sweep.md").read_text()
    again = sweep.main(["--out", str(out), "--report-only"])
    assert again == 0 and json.loads((out / "sweep.json").read_text())["points"] == s["points"]


@pytest.mark.parametrize("argv,named", [(["--flag", "expertz", "--values", "4"], "--flag"),
                                        (["--values", "4"], "--flag"),
                                        (["--flag", "experts", "--values", "4,,8"], "--values"),
                                        (["--flag", "experts", "--values", "4,4"], "--values"),
                                        (["--report-only"], "--out")])
def test_sweep_bad_flags(tmp_path, capsys, argv, named):
    with pytest.raises(SystemExit):
        sweep.main(argv + ["--out", str(tmp_path / "none")])
    assert named in capsys.readouterr().err


def test_dense_from_must_be_the_same_experiment(tmp_path, capsys):
    """--dense-from runs that differ in anything but the swept flag (here --steps) are refused,
    and --report-only remembers the --dense-from of the sweep."""
    dense = tmp_path / "dense"
    import train_tiny
    train_tiny.main(["--dry-run", "--routers", "dense", "--seeds", "0,1", "--out", str(dense)])
    out = tmp_path / "sw"
    sweep.main(["--flag", "experts", "--values", "4", "--out", str(out), "--dense-from", str(dense),
                "--", "--dry-run", "--routers", "top2,ec2", "--seeds", "0,1"])
    assert "top2 vs dense" in json.loads((out / "sweep.json").read_text())["points"][0]["pairs"]
    sweep.main(["--out", str(out), "--report-only"])            # dense_from from sweep_meta.json
    assert "top2 vs dense" in json.loads((out / "sweep.json").read_text())["points"][0]["pairs"]
    other = tmp_path / "sw_other"
    with pytest.raises(SystemExit):
        sweep.main(["--flag", "experts", "--values", "4", "--out", str(other), "--dense-from",
                    str(dense), "--", "--dry-run", "--routers", "top2,ec2", "--seeds", "0,1",
                    "--steps", "3"])
    err = capsys.readouterr().err
    assert "differ from" in err and "'steps'" in err


def test_sweep_varies_the_capacity_factor(tmp_path):
    """--flag capacity_factor: each value trains every MoE router at that c (the dense runs are
    the same at every value), recorded in the runs' configs and in their labels ("ec2@c1"); the
    report drops the point's "@cC", so every value has the pairs "ec2 vs top2", "ec2 vs dense"."""
    out = tmp_path / "sw"
    sweep.main(["--flag", "capacity_factor", "--values", "1,1.5", "--out", str(out), "--",
                "--dry-run", "--routers", "top2,ec2,dense", "--seeds", "0,1"])
    s = json.loads((out / "sweep.json").read_text())
    assert [p["value"] for p in s["points"]] == ["1", "1.5"]
    for p in s["points"]:
        v = p["value"]
        res = json.loads((out / f"capacity_factor_{v}" / "results.json").read_text())
        c = {r["router"]: r["capacity_factor"] for r in res["runs"]}
        assert c == {f"top2@c{v}": float(v), f"ec2@c{v}": float(v), "dense": None}
        assert p["labels"] == {"top2": f"top2@c{v}", "ec2": f"ec2@c{v}"}
        assert {"ec2 vs top2", "top2 vs dense", "ec2 vs dense"} <= set(p["pairs"])
    assert "| 1.5 |" in (out / "sweep.md").read_text()


def test_unlabelled_keeps_names_unique():
    """The report drops "@cC" only where the names stay unique: "ec2@c1" and "ec2" in one
    point keep their labels."""
    run = dict(seed=0, final_val=1.0, config={})
    res = dict(runs=[dict(run, router="ec2@c1"), dict(run, router="ec2")])
    assert sweep.unlabelled(res) == (res, {})


def test_sweep_help(capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main(["--help"])
    assert e.value.code == 0 and "--flag" in capsys.readouterr().out
