"""lab/bench.py and lab/bench_parallel.py: command-line behaviour (clear errors, --quick vs explicit
flags), the layers they time (built from the router table, moe/routers.py, under the router name
whose c the case uses) and the JSON they write.

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

from lab import bench, bench_parallel
from lab.model import DenseFFN
from moe.routers import ROUTERS, resolve

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


@pytest.mark.parametrize("module", ["lab.bench", "lab.bench_parallel"])
def test_help_answers_as_a_module(module):
    """`python -m lab.bench --help` and `python -m lab.bench_parallel --help` print usage, exit 0."""
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: python -m {module}")


def test_expert_parallel_flag_points_to_its_tool(capsys):
    """The old `lab.bench --expert-parallel` stops with a usage error naming lab.bench_parallel."""
    expect_usage_error(["--expert-parallel"], capsys, "--expert-parallel", "lab.bench_parallel")


# ----------------------------------------------------------------------------- the router table
@pytest.mark.parametrize("c, labels", [
    (1.0, dict(ec="ec1", top1="top1", top2="top2@c1", et="et1")),
    (2.0, dict(ec="ec2", top1="top1@c2", top2="top2", et="et2")),
    (1.5, dict(ec="ec2@c1.5", top1="top1@c1.5", top2="top2@c1.5", et="et2@c1.5")),
])
def test_methods_time_the_router_named_for_the_case(c, labels):
    """Each method times the router-table layer named for the case's c (ec1 at c = 1, ec2 at
    c = 2, top2@c1: the label says the c), recorded in the row; its class, options and c are
    resolve(label)'s, and its weights are those the bench drew before names carried the c
    (the table's "ec2"/"et2" layer at the case's c, built in the same order)."""
    cfg = bench.BenchConfig(tokens=[16], experts=[4], capacity_factors=[c], d_model=8, d_expert=8,
                            repeats=1, onehot_repeats=1, device="cpu", methods=list(bench.ROUTER_OF))
    assert {m: bench.router_label(m, c) for m in bench.ROUTER_OF} == labels
    row = bench.bench_case(cfg, 16, 4, c, [])
    assert row["routers"] == labels and all(row[f"{m}_ms"] > 0 for m in bench.ROUTER_OF)
    torch.manual_seed(cfg.seed)
    torch.randn(1, 16, 8)                                # the input, drawn first
    old = {m: resolve(name, c).build(8, 8, 4, group="batch")   # the names the bench used to time
           for m, name in dict(ec="ec2", top1="top1", top2="top2", et="et2").items()}
    torch.manual_seed(cfg.seed)
    torch.randn(1, 16, 8)
    new = bench.router_layers(8, 8, 4, c, "cpu")
    for m, layer in new.items():
        spec = resolve(labels[m])
        assert type(layer) is spec.layer is type(old[m]) and layer.capacity_factor == c == spec.capacity_factor
        assert all(getattr(layer, k) == v for k, v in spec.options.items())
        for (name, a), b in zip(layer.state_dict().items(), old[m].state_dict().values()):
            assert torch.equal(a, b), (m, name)


def test_dense_is_the_trainers_dense_ffn_with_the_benchs_init():
    """The yardstick is lab.model.DenseFFN (one dense FFN in the project), with the weights the
    bench always drew: N(0, 1/fan-in), w_in then w_out."""
    torch.manual_seed(3)
    ffn = bench.dense_ffn(8, 24)
    torch.manual_seed(3)
    w_in, w_out = torch.randn(8, 24) / 8 ** 0.5, torch.randn(24, 8) / 24 ** 0.5
    assert type(ffn) is DenseFFN
    assert torch.equal(ffn.w_in, w_in) and torch.equal(ffn.w_out, w_out)


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


# ----------------------------------------------------------------------------- lab.bench_parallel
def test_expert_parallel_counts_bytes_and_times_the_exchange(tmp_path):
    """lab.bench_parallel spawns W gloo processes: 4 all-to-alls per step, each sending
    e*k*d*4 B*(W-1)/W from every rank, timed in the layer and alone; W = 1 exchanges nothing."""
    path = tmp_path / "ep.json"
    result = bench_parallel.main(["--quick", "--world-sizes", "1,2", "--json", str(path),
                                  "--txt", str(tmp_path / "ep.txt")])
    assert json.loads(path.read_text())["rows"] == result["rows"]
    assert result["config"]["world_sizes"] == [1, 2] and result["config"]["router"] == "ec2"
    one, two = result["rows"]
    e, k, d = result["config"]["experts"], result["k"], result["config"]["d_model"]
    assert one["exchanges_per_step"] == 0 and one["bytes_per_exchange"] == 0
    assert two["exchanges_per_step"] == 4 and two["slots"] == e * k
    assert two["bytes_per_exchange"] == e * k * d * 4 / 2 and two["bytes_per_step"] == 4 * two["bytes_per_exchange"]
    assert two["layer_ms"] > 0 and two["in_layer_a2a_ms"] > 0 and two["alone_a2a_ms"] > 0
    assert "MiB" in (tmp_path / "ep.txt").read_text()


def test_expert_parallel_names_the_router_with_its_c():
    """--capacity-factor other than the router's own puts the c in the label ("ec2@c1"), --quick
    keeps the flags given, and the run dict carries the resolved c."""
    cfg, _, run = bench_parallel.parse_config(["--quick", "--capacity-factor", "1", "--tokens", "32"])
    assert run["router"] == "ec2@c1" and run["capacity_factor"] == 1.0
    assert run["tokens"] == 32 and run["experts"] == bench_parallel.QUICK["experts"]
    assert run["world_sizes"] == [1, 2] and "quick" not in run
    assert bench_parallel.parse_config(["--router", "ec1"])[2]["capacity_factor"] == 1.0


@pytest.mark.parametrize("argv, fragments", [
    (["--world-sizes", "3"], ["--world-sizes", "must divide --experts"]),
    (["--world-sizes", "1,x"], ["--world-sizes", "integers >= 1"]),
    (["--world-sizes", "0"], ["--world-sizes", "integers >= 1"]),
    (["--tokens", "0"], ["--tokens", "integer >= 1"]),
    (["--repeats", "0"], ["--repeats", "integer >= 1"]),
    (["--router", "dense"], ["--router", "no experts"]),
    (["--router", "bogus"], ["--router", "unknown router"]),
    (["--router", "ec2@c1", "--capacity-factor", "2"], ["--capacity-factor", "states c = 1"]),
    (["--capacity-factor", "0"], ["--capacity-factor", "> 0"]),
])
def test_expert_parallel_bad_flag_is_a_usage_error(argv, fragments, capsys):
    """Bad flags of lab.bench_parallel stop with argparse's status 2, naming the flag and range."""
    with pytest.raises(SystemExit) as info:
        bench_parallel.parse_config(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
