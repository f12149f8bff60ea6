"""lab/bench.py: command-line behaviour (clear errors, --quick vs explicit flags), the layers it times
(built from the router table, moe/routers.py) and the JSON it writes.

Timings are never asserted (they depend on the machine); only that every requested method was
timed and the report says how (device, dtype, timer, compile). Sizes are tiny: these run in seconds.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lab import bench
from moe.routers import ROUTERS

ROOT = Path(__file__).resolve().parent.parent

TINY = ["--tokens", "64", "--experts", "4", "--capacity-factors", "2", "--d-model", "16",
        "--d-expert", "32", "--repeats", "2", "--onehot-repeats", "1"]


def run_bench(argv, tmp_path):
    """bench.main(argv + --json) -> the JSON it wrote."""
    path = tmp_path / "bench.json"
    bench.main([*argv, "--json", str(path)])
    return json.loads(path.read_text())


def expect_usage_error(argv, capsys, *fragments):
    """bench.main(argv) exits with argparse's status 2 and a message containing every fragment."""
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err


# ----------------------------------------------------------------------------- bad flags
@pytest.mark.parametrize("argv, fragments", [
    (["--experts", "0"], ["--experts", "integer >= 2"]),
    (["--experts", "4", "1"], ["--experts", "integer >= 2"]),
    (["--tokens", "-5"], ["--tokens", "integer >= 1"]),
    (["--tokens", "many"], ["--tokens", "integer >= 1"]),
    (["--capacity-factors", "0"], ["--capacity-factors", "finite number > 0"]),
    (["--capacity-factors", "nan"], ["--capacity-factors", "finite number > 0"]),
    (["--d-model", "0"], ["--d-model", "integer >= 1"]),
    (["--d-expert", "0"], ["--d-expert", "integer >= 1"]),
    (["--repeats", "0"], ["--repeats", "integer >= 1"]),
    (["--onehot-repeats", "0"], ["--onehot-repeats", "integer >= 1"]),
    (["--onehot-max-gb", "-1"], ["--onehot-max-gb", "finite number >= 0"]),
    (["--onehot-max-gflop", "inf"], ["--onehot-max-gflop", "finite number >= 0"]),
    (["--threads", "-1"], ["--threads", "integer >= 0"]),
    (["--seed", "-1"], ["--seed", "integer >= 0"]),
    (["--dtype", "float8"], ["--dtype", "invalid choice"]),
    (["--methods", "bogus"], ["--methods", "invalid choice"]),
])
def test_bad_flag_is_a_usage_error_naming_the_flag(argv, fragments, capsys):
    """Every numeric flag out of range (or unparsable) is an argparse error naming it and the range."""
    expect_usage_error(argv, capsys, *fragments)


def test_bad_flag_from_the_command_line_prints_no_traceback():
    """`python -m lab.bench --experts 0` exits 2 with a one-line usage error, not a traceback."""
    proc = subprocess.run([sys.executable, "-m", "lab.bench", "--experts", "0"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "argument --experts" in proc.stderr and ">= 2" in proc.stderr


@pytest.mark.parametrize("extra", [[], ["--expert-parallel"]])
def test_help_answers_as_a_module(extra):
    """`python -m lab.bench --help` (and in --expert-parallel mode) prints usage and exits 0."""
    proc = subprocess.run([sys.executable, "-m", "lab.bench", *extra, "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m lab.bench")


# ----------------------------------------------------------------------------- the router table
def test_methods_time_the_router_tables_layers(monkeypatch):
    """ec/top1/top2 are layers of the router table (make_layer), at the case's c and group 'batch':
    the same class and options as moe/routers.py gives the name, nothing kept by hand here."""
    built = []
    original = bench.make_layer

    def spy(name, *args, **kwargs):
        layer = original(name, *args, **kwargs)
        built.append((name, layer, kwargs))
        return layer
    monkeypatch.setattr(bench, "make_layer", spy)
    cfg = bench.BenchConfig(tokens=[16], experts=[4], capacity_factors=[1.0], d_model=8, d_expert=8,
                            repeats=1, onehot_repeats=1, device="cpu", methods=list(bench.ROUTER_OF))
    row = bench.bench_case(cfg, 16, 4, 1.0, [])
    assert {name for name, _, _ in built} == set(bench.ROUTER_OF.values()) <= set(ROUTERS)
    for name, layer, kwargs in built:
        spec = ROUTERS[name]
        assert type(layer) is spec.layer and layer.capacity_factor == 1.0 and layer.group == "batch"
        assert all(getattr(layer, k) == v for k, v in spec.options.items())
    assert row["k"] == 4 and all(row[f"{m}_ms"] > 0 for m in bench.ROUTER_OF)
    # --expert-parallel's --router offers exactly the table's MoE routers
    assert set(bench.EP_FLAGS["router"][0]) == {r for r, s in ROUTERS.items() if s.layer is not None}
    assert bench.EPConfig().router in ROUTERS


def test_committed_bench_results_still_read():
    """assets/bench_cpu.json and assets/bench_ep_cpu.json (recorded by the earlier bench.py) keep the
    fields the report and docs read (per-case medians and ratios, per-W bytes and times), and
    check_targets gives the committed target verdicts from the committed rows."""
    cpu = json.loads((ROOT / "assets" / "bench_cpu.json").read_text())
    assert {"hardware", "config", "rows", "dtype", "targets"} <= set(cpu)
    # today's check_targets reads the committed rows to the committed verdicts
    assert [dict(target=t, met=ok) for t, ok in bench.check_targets(cpu["rows"])] == cpu["targets"]
    for row in cpu["rows"]:
        assert {"n", "e", "c", "k", "dense_ms"} <= set(row)
        for m in ("ec", "top1", "top2"):
            if f"{m}_ms" in row:
                assert row[f"{m}_vs_dense"] == pytest.approx(row[f"{m}_ms"] / row["dense_ms"])
    ep = json.loads((ROOT / "assets" / "bench_ep_cpu.json").read_text())
    for row in ep["rows"]:
        assert {"W", "bytes_per_exchange", "layer_ms", "in_layer_a2a_ms", "alone_a2a_ms"} <= set(row)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(capsys):
    """--device cuda where torch sees no GPU says so instead of a CUDA traceback."""
    expect_usage_error(["--quick", "--device", "cuda"], capsys, "--device cuda", "no CUDA device")


# ----------------------------------------------------------------------------- --quick
def test_quick_keeps_explicit_flags(tmp_path):
    """--quick only fills the flags that were not given: --experts/--tokens/--d-model win."""
    result = run_bench(["--quick", "--experts", "2", "--tokens", "32", "--d-model", "8",
                        "--methods", "ec", "--device", "cpu"], tmp_path)
    assert [(row["n"], row["e"]) for row in result["rows"]] == [(32, 2)]
    assert result["config"]["d_model"] == 8
    assert result["config"]["d_expert"] == bench.QUICK["d_expert"]  # not given: --quick's value


def test_quick_alone_uses_the_quick_config(tmp_path):
    """--quick with no other size flag runs exactly the QUICK sizes."""
    result = run_bench(["--quick", "--methods", "ec", "--device", "cpu"], tmp_path)
    config = result["config"]
    for name, value in bench.QUICK.items():
        if name != "methods":
            assert config[name] == value, name


# ----------------------------------------------------------------------------- the JSON report
def test_json_has_every_method_and_how_it_was_timed(tmp_path):
    """The JSON names device, dtype, timer and versions, and has a median per method per case."""
    result = run_bench([*TINY, "--device", "cpu"], tmp_path)
    assert {"hardware", "torch", "threads", "dtype", "timer", "config", "rows", "notes",
            "command", "wall_s"} <= set(result)
    assert result["dtype"] == "float32" and result["timer"] == "time.perf_counter"
    (row,) = result["rows"]
    assert (row["n"], row["e"], row["c"], row["k"]) == (64, 4, 2.0, 32)
    for name in ("dense", "ec", "top1", "top2", "onehot"):
        assert row[f"{name}_ms"] > 0, name
    for name in ("ec", "top1", "top2", "onehot"):
        assert row[f"{name}_vs_dense"] == pytest.approx(row[f"{name}_ms"] / row["dense_ms"])


def test_methods_flag_selects_methods(tmp_path):
    """--methods ec times dense (the yardstick, always) and EC only."""
    (row,) = run_bench([*TINY, "--device", "cpu", "--methods", "ec"], tmp_path)["rows"]
    assert {key[:-3] for key in row if key.endswith("_ms") and "_min" not in key} == {"dense", "ec"}


def test_bfloat16_autocast_runs(tmp_path):
    """--dtype bfloat16 runs every method under bf16 autocast (here on CPU) and says so."""
    result = run_bench([*TINY, "--device", "cpu", "--dtype", "bfloat16"], tmp_path)
    assert result["dtype"] == "bfloat16"
    assert "autocast" in result["precision"]
    assert result["rows"][0]["ec_ms"] > 0


@pytest.mark.slow
def test_compile_tiny_on_cpu(tmp_path):
    """--compile adds torch.compile'd variants (or skips them with a note saying why)."""
    result = run_bench(["--quick", "--device", "cpu", "--methods", "ec", "--tokens", "64",
                        "--repeats", "2", "--compile"], tmp_path)
    row = result["rows"][0]
    if "ec_compiled_ms" in row:
        assert row["ec_compiled_ms"] > 0 and row["ec_compiled_compile_s"] > 0
        assert "dense_compiled_ms" in row
    else:
        assert any("compile" in note for note in result["notes"]), result["notes"]


# ----------------------------------------------------------------------------- --expert-parallel
def test_expert_parallel_mode_counts_bytes_and_times_the_exchange(tmp_path):
    """--expert-parallel spawns W gloo processes: 4 all-to-alls per step, each sending
    e*k*d*4 B*(W-1)/W from every rank, timed in the layer and alone; W = 1 exchanges nothing."""
    path = tmp_path / "ep.json"
    result = bench.main(["--expert-parallel", "--quick", "--world-sizes", "1", "2",
                         "--json", str(path), "--txt", str(tmp_path / "ep.txt")])
    assert json.loads(path.read_text())["rows"] == result["rows"]
    one, two = result["rows"]
    e, k, d = result["config"]["experts"], result["k"], result["config"]["d_model"]
    assert one["exchanges_per_step"] == 0 and one["bytes_per_exchange"] == 0
    assert two["exchanges_per_step"] == 4 and two["slots"] == e * k
    assert two["bytes_per_exchange"] == e * k * d * 4 / 2 and two["bytes_per_step"] == 4 * two["bytes_per_exchange"]
    assert two["layer_ms"] > 0 and two["in_layer_a2a_ms"] > 0 and two["alone_a2a_ms"] > 0
    assert "MiB" in (tmp_path / "ep.txt").read_text()
