"""GPU checks at realistic sizes, and the plumbing of lab/gpu_check.py.

- the NumPy reference run on CuPy arrays equals the router table's layers (ecmoe.MoE, token
  choice) on CUDA in float64 (n=2048, e=16, d=256);
- their forward+backward on CUDA in float32 and under bf16 autocast matches CPU float64;
- lab.bench times on CUDA with CUDA events, in float32 and bf16 autocast;
- lab.gpu_check --dry-run writes a report listing every stage, without touching assets/; its
  pytest stage runs without the nbmake plugin (the GPU image has none); without a GPU it refuses;
  it trains the GPU rungs of the scale ladder (train_tiny.rung(512), rung(1024)) and projects each
  rung's wall time from the s/step it measured.
The GPU tests are marked `gpu` and skip cleanly without CUDA / CuPy (tests/conftest.py); the small
models of tests/test_ecmoe.py and tests/test_reference.py already cover CuPy on tiny shapes.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ecmoe
import reference_numpy as ref
from conftest import requires_cuda, requires_cupy
from lab import bench, gpu_check
from moe.routers import ROUTERS, is_token_choice, make_layer

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- GPU: CuPy reference
@pytest.mark.gpu
@requires_cuda
@requires_cupy
@pytest.mark.parametrize("router, capacity_factor", [("ec2", 2.0), ("top1", 1.0), ("top2", 2.0)])
def test_cupy_reference_equals_cuda_layer_at_realistic_size(router, capacity_factor):
    """Reference on CuPy == the router table's layer on CUDA in float64 (n=2048, e=16, d=256):
    routing exactly, y to 1e-10."""
    import cupy as cp
    n, e, d, f = 2048, 16, 256, 512
    torch.manual_seed(0)
    layer = make_layer(router, d, f, e, capacity_factor=capacity_factor, group="batch")
    layer = layer.double().cuda()
    x = torch.randn(1, n, d, dtype=torch.float64, device="cuda")  # one group of n tokens
    y_module = layer(x).y[0]  # [n, d]
    index_module = layer.route(ecmoe.router_probs(x, layer.w_router)).token_index  # [1, e, k]

    torch.cuda.synchronize()  # CuPy reads torch's memory directly (zero-copy views)
    w = {name: cp.asarray(p.detach()) for name, p in layer.named_parameters()}
    x_cp = cp.asarray(x[0])
    probs = ref.router_probs(x_cp, w["w_router"])  # [n, e]
    k = ref.expert_capacity(n, e, capacity_factor)
    if is_token_choice(router):
        gates, index = ref.token_choice(probs, ROUTERS[router].options["top_k"], k)
    else:
        gates, index = ref.expert_choice(probs, k)
    y = ref.moe_ffn(x_cp, gates, index, w["w_in"], w["w_out"])
    assert isinstance(y, cp.ndarray) and isinstance(index, cp.ndarray)  # CuPy in, CuPy out
    np.testing.assert_array_equal(index_module[0].cpu().numpy(), cp.asnumpy(index))
    np.testing.assert_allclose(y_module.detach().cpu().numpy(), cp.asnumpy(y), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- GPU: fp32 / bf16
def forward_backward(layer, x, grad_y, autocast=False):
    """(y, {name: grad}) of sum(y * grad_y), the forward under CUDA bf16 autocast if asked."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    (out.y.float() * grad_y).sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    grads["x"] = x.grad
    return out.y.detach(), grads


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("router", ["ec2", "top2"])
@pytest.mark.parametrize("precision", ["float32", "bf16_autocast"])
def test_cuda_forward_backward_matches_cpu_float64(router, precision):
    """A MoE layer on CUDA (fp32, or bf16 autocast) gives the CPU float64 outputs and gradients, loosely."""
    torch.manual_seed(0)
    B, T, d, f, e = 4, 128, 128, 256, 8
    truth = make_layer(router, d, f, e, capacity_factor=2.0, group="batch").double()
    x = torch.randn(B, T, d, dtype=torch.float64)
    grad_y = torch.randn(B, T, d, dtype=torch.float64)
    y64, g64 = forward_backward(truth, x, grad_y)
    layer = make_layer(router, d, f, e, capacity_factor=2.0, group="batch").cuda()
    layer.load_state_dict({k: v.float() if v.is_floating_point() else v  # thresholds' count: long
                           for k, v in truth.state_dict().items()})
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: compare plain fp32
    try:
        # routing runs in float32 even under autocast: it must pick the same tokens as float64
        index64 = truth.route(ecmoe.router_probs(truth.group_tokens(x), truth.w_router)).token_index
        x32 = x.float().cuda()
        index32 = layer.route(ecmoe.router_probs(layer.group_tokens(x32), layer.w_router)).token_index
        assert torch.equal(index32.cpu(), index64), "fp32 routing differs from fp64 (a near-tie?)"
        y, grads = forward_backward(layer, x32, grad_y.float().cuda(), autocast=precision != "float32")
    finally:
        torch.set_float32_matmul_precision(old)
    rel_y, rel_grad = (1e-4, 1e-4) if precision == "float32" else (3e-2, 5e-2)  # of the largest value
    torch.testing.assert_close(y.double().cpu(), y64, rtol=0, atol=rel_y * float(y64.abs().max()))
    for name, g in g64.items():
        torch.testing.assert_close(grads[name].double().cpu(), g, rtol=0, atol=rel_grad * float(g.abs().max()),
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_on_cuda(dtype, tmp_path):
    """lab.bench --device cuda times every method with CUDA events and records peak memory."""
    path = tmp_path / "bench.json"
    bench.main(["--quick", "--device", "cuda", "--dtype", dtype, "--methods", "ec", "top1", "top2",
                "onehot", "--json", str(path)])
    result = json.loads(path.read_text())
    assert result["timer"] == "cuda events" and result["dtype"] == dtype
    assert result["hardware"]["cuda"] == torch.cuda.get_device_name(0)
    (row,) = result["rows"]
    for name in ("dense", "ec", "top1", "top2", "onehot"):
        assert row[f"{name}_ms"] > 0 and row[f"{name}_peak_mb"] > 0, name


# ----------------------------------------------------------------------------- gpu_check plumbing
@pytest.mark.parametrize("d", gpu_check.RUNGS)
def test_projection_of_a_ladder_rung_borrows_measured_routers(d):
    """The projection of GPU rung d is the ladder's run of it: the GPU preset's routers (the
    ladder's + top2_dropless), the default steps, lab.stats.LADDER_SEEDS seeds, rung(d)'s widths;
    it uses the measured s/step and names every borrowed one."""
    import train_tiny
    from lab import stats
    rows = {"top2": dict(s_per_step=0.2), "ec2": dict(s_per_step=0.1), "dense": dict(s_per_step=0.05)}
    res = dict(wall_time_s=100.0, train_time_sum_s=50.0, runs=[dict(val_step=[75, 150, 200])] * 3)
    proj = gpu_check.projection(d, rows, res, dry_run=False)
    routers = [r for r in train_tiny.GPU_PRESET["routers"].split(",") if r]
    assert routers == train_tiny.LADDER_ROUTERS.split(",") + ["top2_dropless"]
    assert proj["routers"] == routers and proj["rung"] == d and proj["fields"] == train_tiny.rung(d)
    assert proj["seeds"] == stats.LADDER_SEEDS and proj["steps"] == train_tiny.Config().steps == 600
    for r in routers:
        measured, factor = gpu_check.stand_in(r)
        expected = rows[r]["s_per_step"] if r in rows else rows[measured]["s_per_step"] * factor
        assert proj["s_per_step"][r] == pytest.approx(expected), r
        assert (r in proj["assumed"]) == (r not in rows)
    runs = proj["seeds"] * len(routers)
    expected = sum(proj["s_per_step"].values()) * proj["steps"] * proj["seeds"] / min(proj["workers"], runs)
    assert proj["projected_train_s"] == pytest.approx(expected)
    assert proj["projected_train_s_per_seed"] == pytest.approx(expected / proj["seeds"])
    assert proj["overhead_s_per_validation"] == pytest.approx(50.0 / 9)
    assert proj["projected_wall_upper_s"] > proj["projected_train_s"]
    assert "measured" in proj["note"] and "projected" in proj["note"]
    assert "projects nothing" in gpu_check.projection(d, rows, res, dry_run=True)["note"]


def test_report_says_what_is_measured_and_what_projected(tmp_path):
    """The report names each rung's projection as projected (a dry run: as no projection at all)
    and says what was measured."""
    rows = {"top2": dict(s_per_step=0.2, source="log"), "ec2": dict(s_per_step=0.1, source="log")}
    for dry_run, word in ((False, "**Projected: ladder rung d=1024**"),
                          (True, "**DRY RUN, not a projection: ladder rung d=1024**")):
        summary = dict(dry_run=dry_run, command="x", started_utc="now", wall_s=1.0, budget_s=460,
                       env={}, stages={}, bench={},
                       train={"1024": dict(rows=rows, projection=gpu_check.projection(
                           1024, rows, {}, dry_run))})
        gpu_check.write_report(tmp_path, summary)
        text = (tmp_path / "report.md").read_text()
        assert word in text and "ladder rung d=1024: s/step per router" in text
        assert "Measured: what the stages below timed" in text and "Assumed (not measured)" in text


def test_train_summary_reads_progress_of_a_cut_run(tmp_path):
    """A train_tiny run stopped by the time limit still yields s/step from its progress lines."""
    log = ("[run  1/3          top2 s0] step    75/200 train 3.1  val 3.2  0.120 s/step  elapsed 0:09\n"
           "[run  1/3          top2 s0] step   150/200 train 2.9  val 3.0  0.110 s/step  elapsed 0:17\n"
           "[run  2/3           ec2 s0] step    75/200 train 3.0  val 3.1  0.090 s/step  elapsed 0:26\n")
    _, rows = gpu_check.train_summary(tmp_path, log)
    assert rows["top2"]["s_per_step"] == 0.110 and rows["top2"]["last_step"] == 150
    assert rows["ec2"]["s_per_step"] == 0.090 and set(rows) == {"top2", "ec2"}


def test_stage_records_failure_and_timeout_with_output(tmp_path):
    """A stage that exits non-zero is 'failed', one over its limit is killed and 'timeout'; both keep output."""
    failed = gpu_check.run_stage("x", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], 60,
                                 tmp_path / "failed.log")
    assert failed["status"] == "failed" and failed["returncode"] == 3 and "boom" in failed["tail"]
    slow = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    timeout = gpu_check.run_stage("y", slow, 2, tmp_path / "timeout.log")
    assert timeout["status"] == "timeout" and "started" in timeout["tail"] and timeout["wall_s"] < 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal on a machine without CUDA")
def test_gpu_check_without_cuda_refuses_and_writes_nothing(tmp_path, capsys):
    """Without --dry-run and without CUDA, gpu_check stops with a clear error and writes nothing."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        gpu_check.main(["--out", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "no GPU found" in err and "no CUDA device" in err
    assert "nothing was measured or written" in err
    assert not out.exists()


def test_help_answers_as_a_module():
    """`python -m lab.gpu_check --help` prints usage from the repo root and exits 0."""
    proc = subprocess.run([sys.executable, "-m", "lab.gpu_check", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m lab.gpu_check") and "--dry-run" in proc.stdout


def test_stages_run_the_lab_tools_and_only_the_gpu_tests(tmp_path):
    """The stages run lab.bench as a module and train_tiny.py from the repo root, at each GPU rung
    of the ladder with rung(d)'s flags (a dry run: tiny, the plumbing only); pytest selects the
    GPU tests (-m gpu) and overrides pytest.ini's addopts and blocks nbmake (the GPU image has no
    nbmake or jupyter)."""
    import train_tiny
    assert gpu_check.RUNGS == (512, 1024) and train_tiny.GPU_PRESET["d_model"] == 512
    for dry_run in (False, True):
        plan = {name: cmd for name, cmd, _, _ in gpu_check.stages(dry_run, tmp_path, tmp_path / "train")}
        for name, cmd in plan.items():
            if name.startswith("bench"):
                assert cmd[1:3] == ["-m", "lab.bench"], cmd
        for d in gpu_check.RUNGS:
            cmd = plan[f"train_d{d}"]
            assert cmd[1] == "train_tiny.py" and (ROOT / "train_tiny.py").exists()
            assert cmd[cmd.index("--out") + 1] == str(tmp_path / "train" / f"d{d}")
            for k, v in (train_tiny.rung(d).items() if not dry_run else ()):
                assert cmd[cmd.index(f"--{k.replace('_', '-')}") + 1] == str(v), (d, k)
            assert ("--dry-run" in cmd) == dry_run
        pytest_cmd = plan["pytest"]
        assert pytest_cmd[1:3] == ["-m", "pytest"] and pytest_cmd[-1] == "tests/"
        joined = " ".join(pytest_cmd)
        assert "-m gpu" in joined and "-o addopts=" in joined and "-p no:nbmake" in joined
    assert gpu_check.ROOT == ROOT


def test_pytest_stage_options_work_without_nbmake():
    """pytest.ini's addopts need nbmake; with the stage's options pytest collects the GPU tests of a
    file with nbmake blocked (as on the GPU image, where it is not installed), and nothing else."""
    opts = [o for o in gpu_check.PYTEST_OPTIONS if o not in ("-q", "-rs")]
    proc = subprocess.run([sys.executable, "-m", "pytest", *opts, "--collect-only", "-q", "tests/test_gpu.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert collected and all("cupy" in line or "cuda" in line for line in collected), collected


def test_report_reads_the_committed_bench_results(tmp_path):
    """The report's bench table renders assets/bench_cpu.json (written by the earlier bench.py): one
    row per case, every timed method as ms and x dense."""
    result = json.loads((ROOT / "assets" / "bench_cpu.json").read_text())
    table = gpu_check.bench_table(result)
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(result["rows"])
    assert "ec (x dense)" in table and "top2 (x dense)" in table


@pytest.mark.slow
def test_gpu_check_dry_run_writes_a_report_with_every_stage(tmp_path):
    """`python -m lab.gpu_check --dry-run` runs every stage on CPU and writes report.md + raw results."""
    committed = ROOT / "assets" / "gpu"
    before = {p: p.stat().st_mtime for p in committed.rglob("*")} if committed.exists() else None
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, "-m", "lab.gpu_check", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    summary = json.loads((out / "gpu_check.json").read_text())
    names = [stage[0] for stage in gpu_check.stages(True, out, out / "train")]
    assert list(summary["stages"]) == names
    for name in names:
        assert f"| {name} |" in report and f"### {name}:" in report, name
        status = summary["stages"][name]["status"]
        assert status == "passed" or name == "nvidia-smi", (name, status)  # no GPU: smi may fail
    for name in ("bench_fp32", "bench_tf32", "bench_bf16", "bench_compile"):
        assert summary["bench"][name]["rows"], name
    assert summary["pytest_counts"]["failures"] == 0 and summary["pytest_counts"]["errors"] == 0
    for d in gpu_check.RUNGS:
        assert set(summary["train"][str(d)]["rows"]) == set(gpu_check.TRAIN_ROUTERS.split(","))
        assert (out / f"train_d{d}" / "results.json").exists()
        assert "projects nothing" in summary["train"][str(d)]["projection"]["note"]
    assert (out / "env.json").exists() and summary["env"]["cpu"]
    after = {p: p.stat().st_mtime for p in committed.rglob("*")} if committed.exists() else None
    assert after == before  # the dry run leaves assets/gpu alone
