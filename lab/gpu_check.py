"""lab/gpu_check.py: one command that measures everything this repo needs from a CUDA GPU.

Stages (each a subprocess with its own time limit, logged, and recorded as passed / failed /
timeout / skipped with its output tail, so one failing stage never loses the others):
    env        Python, torch, CUDA, CuPy and library versions, the GPU torch sees
    nvidia-smi the driver's view of the GPU
    pytest     python -m pytest -m gpu -o addopts="" -p no:nbmake tests/   (the GPU tests; the
               override drops pytest.ini's notebook options and the plugin they need, so it runs
               where nbmake and jupyter are not installed)
    bench_*    python -m lab.bench on CUDA: float32, float32 with TF32 matmuls, bfloat16 autocast,
               and torch.compile'd variants (EC vs FLOP-matched dense, top-1/top-2, one-hot dispatch)
    train_d512, train_d1024
               train_tiny.py at the GPU rungs of the scale ladder (train_tiny.rung(512), the GPU
               preset, and rung(1024)), 200 steps of top2/ec2/dense (seed 0): s/step per router,
               and from it the projected wall time of each rung as the ladder runs it
               (train_tiny.LADDER_ROUTERS + top2_dropless, 600 steps, lab.stats.LADDER_SEEDS seeds)
Everything lands in --out (default assets/gpu): report.md (hardware, versions, commands, wall
times and every number), gpu_check.json (the same, machine-readable), logs/ (full output of each
stage) and the raw JSON the stages wrote. It needs only what requirements.txt lists minus the
notebook tools (torch, numpy, scipy, pytest, hypothesis, rich, matplotlib; CuPy if present).

    python -m lab.gpu_check               # on a machine with a CUDA GPU, within its --budget (460 s)
    python -m lab.gpu_check --dry-run     # the same plumbing on CPU with tiny sizes, into a temp dir
    python -m lab.gpu_check --dry-run --out /tmp/check   # ... into a chosen directory
Without a CUDA device (and without --dry-run) it says so and stops, writing nothing: nothing GPU
is measured until this runs on a GPU, and a --dry-run's numbers (CPU, tiny sizes) project nothing.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

from lab.files import read_json as read_json_strictly
from lab.files import strict, write_json, write_text

ROOT = Path(__file__).resolve().parent.parent   # the repo root: every stage runs there
PY = sys.executable
BUDGET_S = 460  # all stages together, in seconds: a margin under the 8 minutes we promise
TRAIN_ROUTERS = "top2,ec2,dense"
TRAIN_STEPS = 200
RUNGS = (512, 1024)  # the GPU rungs of the scale ladder (train_tiny.rung; lab.ladder on CUDA)
TRAIN_FILES = ("results.json", "results.md", "differences.png")  # what train_tiny.py writes into --out
# pytest of the GPU tests only (-m gpu), with pytest.ini's addopts (--nbmake ...) dropped and the
# nbmake plugin blocked: the GPU image has no nbmake or jupyter and nothing can be installed there.
# A test file that fails to import still fails the stage, but no longer hides the GPU tests' results.
PYTEST_OPTIONS = ("-m", "gpu", "-o", "addopts=", "-p", "no:nbmake", "-p", "no:cacheprovider",
                  "--continue-on-collection-errors", "-q", "-rs")

ENV_SCRIPT = r"""
import json, os, platform, importlib, importlib.metadata
info = dict(python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count())
try:
    from lab.runner import cpu_model   # run from the repo root: the project's one cpuinfo parser
    info["cpu"] = cpu_model()
except Exception as e:
    info["cpu"] = f"? ({type(e).__name__}: {e})"
for name in ("numpy", "scipy", "pytest", "hypothesis", "rich", "matplotlib", "transformers"):
    try:
        info[name] = importlib.metadata.version(name)   # rich has no __version__
    except Exception:
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception:
            info[name] = None
import torch
info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                compute_capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported())
try:
    import cupy
    info.update(cupy=cupy.__version__, cupy_cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                cupy_devices=cupy.cuda.runtime.getDeviceCount())
except Exception as e:
    info.update(cupy=None, cupy_error=f"{type(e).__name__}: {str(e)[:200]}")
print("ENV_JSON " + json.dumps(info))
"""


def rung_flags(d):
    """train_tiny.py flags of ladder rung d (train_tiny.rung(d): the widths, heads and lr)."""
    import train_tiny
    return [a for k, v in train_tiny.rung(d).items() for a in (f"--{k.replace('_', '-')}", str(v))]


def stages(dry_run, out, train_out):
    """(name, argv or None, time limit s, what it does) in run order; the sizes depend on --dry-run.
    train_out: the directory the train_d<D> stages write into, one subdirectory d<D> per rung."""
    out, train_out = rel(out), rel(train_out)  # the stages run in the repo root
    methods = ["--methods", "ec", "top1", "top2", "onehot"]
    if dry_run:  # CPU, tiny: seconds
        run = ["--device", "cpu", "--quick", "--repeats", "2"]
        sizes = ["--tokens", "64"]
        compile_sizes = ["--methods", "ec", "--tokens", "64"]
        train = ["--dry-run"]  # the rung's widths not applied: plumbing only
    else:  # one routing group of n tokens, d=256, f=1024 (bench's defaults), plus n=32768
        run = ["--device", "cuda", "--repeats", "10"]
        sizes = ["--tokens", "2048", "8192", "32768", "--experts", "8", "32", "--capacity-factors", "1", "2"]
        compile_sizes = ["--methods", "ec", "top2", "--tokens", "8192", "--experts", "32",
                         "--capacity-factors", "2"]
        train = ["--steps", str(TRAIN_STEPS)]
    bench = [PY, "-m", "lab.bench", *run]

    def train_stage(d):
        argv = [PY, "train_tiny.py", "--preset", "gpu", *([] if dry_run else rung_flags(d)), *train,
                "--seeds", "0", "--routers", TRAIN_ROUTERS, "--out", str(train_out / f"d{d}")]
        return (f"train_d{d}", argv, 150, f"train_tiny.py, ladder rung d={d}, {TRAIN_ROUTERS}, seed 0")
    smi = shutil.which("nvidia-smi")
    return [
        ("env", [PY, "-c", ENV_SCRIPT], 60, "versions and the GPU torch sees"),
        ("nvidia-smi", [smi] if smi else None, 20, "driver view of the GPU"),
        ("pytest", [PY, "-m", "pytest", *PYTEST_OPTIONS, f"--junitxml={out / 'pytest.xml'}", "tests/"],
         150, "the GPU tests"),
        ("bench_fp32", [*bench, *sizes, *methods, "--dtype", "float32", "--json", str(out / "bench_fp32.json")],
         60, "lab.bench, float32 (strict fp32 matmuls)"),
        ("bench_tf32", [*bench, *sizes, *methods, "--dtype", "float32", "--matmul-precision", "high",
                        "--json", str(out / "bench_tf32.json")], 60, "lab.bench, float32 with TF32 matmuls"),
        ("bench_bf16", [*bench, *sizes, *methods, "--dtype", "bfloat16", "--json", str(out / "bench_bf16.json")],
         60, "lab.bench, bfloat16 autocast"),
        *(train_stage(d) for d in RUNGS),
        ("bench_compile", [*bench, *compile_sizes, "--dtype", "bfloat16", "--compile",
                           "--json", str(out / "bench_compile.json")], 150,
         "lab.bench, bfloat16 autocast, eager vs torch.compile"),
    ]


def rel(path):
    """path relative to the repo root when it lies inside it (shorter commands in the report)."""
    path = Path(path).resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def show(argv):
    """A command as a reader would type it: `python` for this interpreter, the env script by name."""
    if argv is None:
        return None
    return shlex.join("python" if a == PY else "<ENV_SCRIPT of lab/gpu_check.py>" if a == ENV_SCRIPT else a
                      for a in argv)


def run_stage(name, argv, limit, log_path):
    """Run argv from the repo root with a time limit; the whole process group dies on timeout."""
    if argv is None:
        return dict(status="skipped", reason="not available on this machine", wall_s=0.0, tail="")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write(f"$ {show(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # own group: timeouts kill its workers too
        try:
            rc = proc.wait(timeout=limit)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, "timeout"
    text = Path(log_path).read_text(errors="replace")
    return dict(status=status, returncode=rc, wall_s=round(time.time() - t0, 1), limit_s=limit,
                tail="\n".join(text.splitlines()[-40:]))


# ----------------------------------------------------------------------------- reading results
def read_json(path):
    """The JSON object a stage wrote, or None if it is missing or unreadable (a failed stage)."""
    try:
        return read_json_strictly(path, "stage result")
    except ValueError:
        return None


def pytest_counts(xml_path):
    """tests / failures / errors / skipped from pytest's junit XML, or None."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["time_s"] = float(suite.get("time", 0))
    return counts


def train_summary(train_out, log_text):
    """s/step per router from results.json (analysis.routers[router].s_per_step), else from the
    per-run records, else from the progress log."""
    res = read_json(Path(train_out) / "results.json") or {}
    rows = {}
    for router, row in ((res.get("analysis") or {}).get("routers") or {}).items():
        if isinstance(row, dict) and isinstance(row.get("s_per_step"), (int, float)):
            final = row.get("final_val")
            rows[router] = dict(s_per_step=row["s_per_step"], tokens_per_s=row.get("tokens_per_s"),
                                final_val=final.get("mean") if isinstance(final, dict) else final,
                                n_params=row.get("n_params"), source="results.json")
    per_run = {}  # fallback: the per-run records (results.json "runs"), averaged over seeds
    for run in res.get("runs") or []:
        if isinstance(run, dict) and isinstance(run.get("s_per_step"), (int, float)) and "router" in run:
            per_run.setdefault(run["router"], []).append(run)
    for router, runs in per_run.items():
        if router not in rows:
            mean = lambda key: sum(r.get(key) or 0 for r in runs) / len(runs)  # noqa: E731
            rows[router] = dict(s_per_step=mean("s_per_step"), tokens_per_s=mean("tokens_per_s"),
                                final_val=mean("final_val"), n_params=runs[0].get("n_params"),
                                source="results.json runs")
    # a run cut short by the time limit still logged its progress: "[run 1/3  top2 s0] step 75/200 ... s/step"
    pattern = r"\[run\s+\d+/\d+\s+(\S+)\s+s\d+\]\s+step\s+(\d+)/\d+.*?([\d.]+) s/step"
    for router, step, s_per_step in re.findall(pattern, log_text):
        if router not in rows or rows[router]["source"] == "log":
            rows[router] = dict(s_per_step=float(s_per_step), source="log", last_step=int(step))
    return res, rows


def stand_in(router):
    """(measured router whose s/step we borrow, factor) for a router this check did not train."""
    if router.startswith("cap"):  # train_tiny: EC-CAP's LP solver makes a step 2-3.5x slower (CPU)
        return "ec2", 3.5
    for prefix, measured in (("top", "top2"), ("ec", "ec2"), ("et", "ec2"), ("dense", "dense")):
        if router.startswith(prefix):  # top1, top2_dropless, top2_aa, ec1, et2 (assumed), ...
            return measured, 1.0
    return None, None


def projection(d, rows, res, dry_run):
    """Projected time of ladder rung d as one GPU runs it (train_tiny.rung(d) with the GPU
    preset's routers and workers, the default config's steps and validations, lab.stats
    .LADDER_SEEDS seeds), from the s/step this check measured at that rung (rows) and, for an
    upper bound on the rest, its run's time outside training steps (res). Routers it did not
    train borrow a measured router's s/step (stand_in), named under "assumed"."""
    try:
        import train_tiny
        from lab import stats
        preset, default = dict(train_tiny.GPU_PRESET), train_tiny.Config()
        fields = dict(train_tiny.rung(d))
        n_seeds = int(stats.LADDER_SEEDS)
    except Exception as error:  # a file may be mid-rework; report what we can
        return dict(error=f"could not read the ladder (train_tiny.rung, GPU_PRESET, "
                          f"stats.LADDER_SEEDS): {type(error).__name__}: {error}")
    routers = [r for r in str(preset.get("routers", "")).split(",") if r]
    steps = int(fields.get("steps", default.steps))
    workers = int(preset.get("workers", 1))
    eval_every = int(fields.get("eval_every", default.eval_every))
    per_step, assumed = {}, {}
    for r in routers:
        if r in rows:
            per_step[r] = rows[r]["s_per_step"]
            continue
        measured, factor = stand_in(r)
        if measured in rows:
            per_step[r] = rows[measured]["s_per_step"] * factor
            assumed[r] = f"{factor:g}x {measured}"
        else:
            assumed[r] = "not projected (nothing comparable measured)"
    if not per_step or not steps:
        return dict(rung=d, error="no s/step measured")
    # seconds of training summed over runs, spread over the workers that run at once
    train_s = sum(per_step.values()) * steps * n_seeds / max(1, min(workers, len(routers) * n_seeds))
    proj = dict(rung=d, fields=fields, routers=routers, seeds=n_seeds, steps=steps, workers=workers,
                s_per_step=per_step, assumed=assumed, projected_train_s=train_s,
                projected_train_s_per_seed=train_s / n_seeds,
                note=("DRY RUN: s/step of a tiny model on CPU; it projects nothing about a GPU"
                      if dry_run else
                      f"measured: s/step of {', '.join(rows)} over their first {TRAIN_STEPS} steps "
                      f"at d={d} on this GPU (seed 0); projected: the sum over runs of s/step x "
                      f"steps / workers, training steps only"))
    # Upper estimate of the rest (start-up, data, validation): charge all of this check's time
    # outside training steps to its validations, and scale by the rung's validation count.
    wall, train_sum = res.get("wall_time_s"), res.get("train_time_sum_s")
    evals = sum(len(r.get("val_step") or []) for r in res.get("runs") or [] if isinstance(r, dict))
    if isinstance(wall, (int, float)) and isinstance(train_sum, (int, float)) and evals and eval_every:
        per_eval = max(0.0, wall - train_sum) / evals
        full_evals = (steps // eval_every + 1) * len(per_step) * n_seeds
        proj["overhead_s_per_validation"] = per_eval
        proj["projected_wall_upper_s"] = train_s + per_eval * full_evals / max(1, workers)
    return proj


# ----------------------------------------------------------------------------- the report
def bench_table(result):
    """Markdown table of one bench.py JSON: ms for dense, ratio to dense for every other method."""
    rows = result.get("rows") or []
    if not rows:
        return "(no rows)\n"
    names = []
    for row in rows:
        names += [k[:-3] for k in row if k.endswith("_ms") and not k.endswith("_min_ms")
                  and k != "dense_ms" and k[:-3] not in names]
    head = "| n | e | c | k | dense ms | " + " | ".join(f"{m} (x dense)" for m in names) + " |"
    lines = [head, "|" + "---|" * (5 + len(names))]
    for row in rows:
        cells = [f"{row[m + '_ms']:.3f} ms ({row[m + '_vs_dense']:.2f}x)" if m + "_ms" in row else "skip"
                 for m in names]
        lines.append(f"| {row['n']} | {row['e']} | {row['c']} | {row['k']} | {row['dense_ms']:.3f} | "
                     + " | ".join(cells) + " |")
    extra = []
    for row in rows:
        compile_s = {k[:-len("_compile_s")]: round(v, 1) for k, v in row.items() if k.endswith("_compile_s")}
        peak = {k[:-len("_peak_mb")]: round(v) for k, v in row.items() if k.endswith("_peak_mb")}
        if compile_s:
            extra.append(f"- n={row['n']} e={row['e']} c={row['c']}: first-call (compile) seconds {compile_s}, "
                         f"graph breaks {row.get('compiled_graph_breaks')}")
        if peak:
            extra.append(f"- n={row['n']} e={row['e']} c={row['c']}: peak CUDA memory MiB {peak}")
    notes = [f"- note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines + [""] + extra + notes) + "\n"


def train_lines(train, dry_run):
    """The report's lines for one rung: measured s/step per router, then the rung's projection."""
    lines = []
    if train.get("rows"):
        lines += ["| router | s/step | tokens/s | final val loss | params | source |", "|---|---|---|---|---|---|"]
        for r, v in train["rows"].items():
            num = lambda key, spec: format(v[key], spec) if isinstance(v.get(key), (int, float)) else "-"  # noqa: E731
            lines.append(f"| {r} | {v['s_per_step']:.4f} | {num('tokens_per_s', '.0f')} | "
                         f"{num('final_val', '.4f')} | {num('n_params', ',')} | {v['source']} |")
        wall = train.get("wall_time_s")
        lines.append(f"\ntrain_tiny wall time (this invocation): {wall:.1f} s" if isinstance(wall, (int, float))
                     else "\ntrain_tiny wall time: -")
    else:
        lines.append("(no s/step measured)")
    proj = train.get("projection") or {}
    if "projected_train_s" in proj:
        what = "DRY RUN, not a projection" if dry_run else "Projected"
        lines += ["", f"**{what}: ladder rung d={proj['rung']}** ({proj['fields']}; {len(proj['routers'])} "
                  f"routers x {proj['seeds']} seeds x {proj['steps']} steps, {proj['workers']} worker(s)): "
                  f"**{proj['projected_train_s'] / 60:.1f} min** of training, "
                  f"{proj['projected_train_s_per_seed'] / 60:.1f} min per seed ({proj['note']})"
                  + (f"; at most **{proj['projected_wall_upper_s'] / 60:.1f} min** wall, charging all of "
                     f"this check's time outside training steps ({proj['overhead_s_per_validation']:.1f} s per "
                     f"validation) to the rung's validations" if "projected_wall_upper_s" in proj else "")
                  + f". Assumed (not measured): {proj['assumed'] or 'nothing'}."]
    elif proj:
        lines += ["", f"projection: {proj.get('error')}"]
    return lines


def write_report(out, summary):
    env, st = summary.get("env") or {}, summary["stages"]
    lines = [f"# gpu_check report{' (DRY RUN on CPU: plumbing only, numbers meaningless)' if summary['dry_run'] else ''}",
             "", "Measured: what the stages below timed on this machine, nothing else; projected "
             "(named so): the ladder rungs' wall time from those s/step.",
             "", f"- command: `{summary['command']}`", f"- started: {summary['started_utc']} (UTC)",
             f"- total wall time: {summary['wall_s']:.0f} s (budget {summary['budget_s']} s)",
             f"- hardware: {env.get('gpu', 'no CUDA GPU')} ({env.get('gpu_memory_gib', '-')} GiB, "
             f"compute capability {env.get('compute_capability', '-')}); CPU {env.get('cpu', '?')}, "
             f"{env.get('cpu_count', '?')} cores",
             "- versions: " + ", ".join(f"{k} {env.get(k)}" for k in
                                        ("python", "torch", "torch_cuda", "cudnn", "cupy", "cupy_cuda_runtime",
                                         "numpy", "scipy", "pytest", "hypothesis", "transformers") if k in env),
             "", "## Stages", "", "| stage | status | wall s | limit s | what | command |", "|---|---|---|---|---|---|"]
    for name, s in st.items():
        cmd = f"`{s['command']}`" if s.get("command") else "-"
        lines.append(f"| {name} | {s['status']}{' (' + s['reason'] + ')' if s.get('reason') else ''} | "
                     f"{s['wall_s']} | {s.get('limit_s', '-')} | {s['what']} | {cmd} |")
    counts = summary.get("pytest_counts")
    lines += ["", "## pytest -m gpu", "", f"counts: {counts}" if counts else "counts: (no junit XML)"]
    for key, title in (("bench_fp32", "float32"), ("bench_tf32", "float32, TF32 matmuls"),
                       ("bench_bf16", "bfloat16 autocast"), ("bench_compile", "bfloat16 autocast, torch.compile")):
        result = summary.get("bench", {}).get(key)
        lines += ["", f"## lab.bench: {title}", ""]
        if result:
            lines += [f"`{result.get('command')}` on {result['hardware'].get('cuda') or result['hardware'].get('processor')}"
                      f", {result.get('precision')}, timer {result.get('timer')}, forward+backward median "
                      f"of {result['config']['repeats']} (d={result['config']['d_model']}, "
                      f"f={result['config']['d_expert']}), bench wall {result.get('wall_s', 0):.0f} s", "",
                      bench_table(result)]
        else:
            lines.append(f"(no result: stage {st.get(key, {}).get('status')})")
    for d, train in (summary.get("train") or {}).items():
        lines += ["", f"## train_tiny.py at ladder rung d={d}: s/step per router", ""]
        lines += train_lines(train, summary["dry_run"])
    lines += ["", "## Output tail of every stage", ""]
    for name, s in st.items():
        lines += [f"### {name}: {s['status']}", "", "```", s.get("tail", "").replace("```", "'''"), "```",
                  f"full log: `logs/{name}.log`" if s.get("command") else "", ""]
    write_text(out / "report.md", "\n".join(lines) + "\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m lab.gpu_check", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: test the plumbing")
    parser.add_argument("--out", default=None,
                        help="output directory (default assets/gpu; with --dry-run a new temp dir)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all stages together")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages (env always runs)")
    args = parser.parse_args(argv)
    if not args.budget > 0:
        parser.error(f"--budget must be > 0 seconds; got {args.budget}")
    t0 = time.time()
    out = Path(args.out).resolve() if args.out else \
        Path(tempfile.mkdtemp(prefix="gpu_check_dry_")) if args.dry_run else ROOT / "assets" / "gpu"
    # the real run trains in runs/ (git-ignored, checkpoints stay there); a dry run inside --out
    train_out = out / "train_tiny_runs" if args.dry_run else ROOT / "runs" / "gpu_check"
    rung_out = {d: train_out / f"d{d}" for d in RUNGS}
    plan = stages(args.dry_run, out, train_out)
    names = [p[0] for p in plan]
    if args.only and set(args.only) - set(names):
        parser.error(f"--only: unknown stage(s) {sorted(set(args.only) - set(names))}; choose from {names}")

    # env first, into a scratch log: without CUDA a real run stops here and writes nothing to --out
    with tempfile.TemporaryDirectory() as scratch:
        env_rec = run_stage("env", plan[0][1], plan[0][2], Path(scratch) / "env.log")
        env_log = (Path(scratch) / "env.log").read_text(errors="replace")
    match = re.search(r"^ENV_JSON (.*)$", env_log, re.M)
    env = json.loads(match.group(1)) if match else {}
    if not args.dry_run and not env.get("cuda_available"):
        print(env_log[-2000:], file=sys.stderr)
        parser.error("no GPU found: no CUDA device visible to torch (see above); nothing was "
                     "measured or written. Run on a GPU machine, or use --dry-run to test the "
                     "plumbing on CPU")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    write_text(out / "logs" / "env.log", env_log)
    write_json(out / "env.json", env)
    summary = dict(command=shlex.join(["python", "-m", "lab.gpu_check", *argv]), dry_run=args.dry_run,
                   started_utc=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
                   budget_s=args.budget, env=env, stages={}, bench={})
    print(f"gpu_check: {'DRY RUN (CPU, tiny) ' if args.dry_run else ''}writing to {out}", flush=True)
    stale = [out / f"{name}.json" for name in names if name.startswith("bench")]  # of an earlier check:
    stale += [out / "pytest.xml", out / "nvidia-smi.txt",
              *(rung_out[d] / f for d in RUNGS for f in TRAIN_FILES)]
    for path in stale:  # a stage that fails now must not leave the last run's numbers behind
        path.unlink(missing_ok=True)
    for d in RUNGS:
        shutil.rmtree(out / f"train_d{d}", ignore_errors=True)
    for i, (name, cmd, limit, what) in enumerate(plan):
        left = args.budget - (time.time() - t0) - 10 * (len(plan) - i - 1)  # keep 10 s for each later stage
        rec = dict(what=what, command=show(cmd))
        if name == "env":
            rec.update(env_rec)
        elif args.only and name not in args.only:
            rec.update(status="skipped", reason="not in --only", wall_s=0.0)
        elif left < 10:
            rec.update(status="skipped", reason="time budget spent", wall_s=0.0)
        else:
            rec.update(run_stage(name, cmd, round(min(limit, left)), out / "logs" / f"{name}.log"))
        summary["stages"][name] = rec
        print(f"  {name:<14} {rec['status']:<8} {rec['wall_s']:6.1f} s  {rec.get('reason', '')}", flush=True)
    if (out / "logs" / "nvidia-smi.log").exists():
        shutil.copy(out / "logs" / "nvidia-smi.log", out / "nvidia-smi.txt")
    for name in names:
        if name.startswith("bench") and summary["stages"][name]["status"] != "skipped":
            result = read_json(out / f"{name}.json")
            if result:
                summary["bench"][name] = result
    summary["pytest_counts"] = pytest_counts(out / "pytest.xml") \
        if summary["stages"]["pytest"]["status"] != "skipped" else None
    summary["train"] = {}
    for d in RUNGS:
        name = f"train_d{d}"
        ran = summary["stages"][name]["status"] != "skipped"
        log_text = (out / "logs" / f"{name}.log").read_text(errors="replace") if ran else ""
        res, rows = train_summary(rung_out[d], log_text) if ran else ({}, {})
        summary["train"][str(d)] = dict(rows=rows, wall_time_s=res.get("wall_time_s"),
                                        results_dir=str(rung_out[d]),
                                        projection=projection(d, rows, res, args.dry_run) if rows else {})
        for f in TRAIN_FILES:  # the run's own report next to ours
            if ran and (rung_out[d] / f).exists():
                (out / name).mkdir(exist_ok=True)
                shutil.copy(rung_out[d] / f, out / name / f)
    if args.dry_run:
        shutil.rmtree(train_out, ignore_errors=True)  # checkpoints of a 2-step run: not evidence
    summary["wall_s"] = time.time() - t0
    write_text(out / "gpu_check.json", json.dumps(strict(summary), indent=1, default=str, allow_nan=False))
    write_report(out, summary)
    failed = [n for n, s in summary["stages"].items() if s["status"] in ("failed", "timeout")]
    print(f"gpu_check: {summary['wall_s']:.0f} s; wrote {out / 'report.md'}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return summary


if __name__ == "__main__":
    summary = main()
    sys.exit(1 if any(s["status"] in ("failed", "timeout") for s in summary["stages"].values()) else 0)
