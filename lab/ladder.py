"""lab/ladder.py: the scale ladder. Train every rung (a model width d) with train_tiny, judge each
rung alone under the analysis plan, then the trend of each pair's difference over model size.

    python -m lab.ladder --rungs 128,256 --seeds 0-4 --out assets/ladder          # CPU rungs
    python -m lab.ladder --rungs 128,256 --seeds 0-4 --out assets/ladder --resume # continue
    python -m lab.ladder --judge-only --out assets/ladder                         # re-judge
    python -m lab.ladder --dry-run --rungs 128,256                  # print the train_tiny commands
    python -m lab.ladder --out assets/ladder --resume               # on CUDA: rungs 512,1024

A rung d is train_tiny with the widths of train_tiny.rung(d) (d_model = d, d_ff = 2d, heads,
learning rate) and everything else the default config's (600 steps x 32 x 64 bytes: the tokens
are the same at every rung), the routers train_tiny.LADDER_ROUTERS (on CUDA also top2_dropless,
which the trend does not judge: the CPU rungs lack it), into OUT/d<D>/. A rung named
in --reuse (default: 64=assets/lm_after_ec, the committed 12-seed set of the default config) is
read from there and never trained. Training is resumable: --resume passes through to train_tiny,
which skips finished runs and continues checkpoints. Judging reads every rung found: OUT/d*/
results.json and the reused ones, so the GPU rungs extend the CPU figure. Writes OUT/ladder.json
(plan version, rungs, command, start time of each invocation), OUT/trend.json, OUT/trend.md and
OUT/trend.png. The trend rule is plan v4 (docs/analysis_plan.md, lab/stats.trend).
"""
import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import train_tiny
from lab import stats
from lab.files import atomic_write, read_json, write_json, write_text

REUSE_DEFAULT = "64=assets/lm_after_ec"
REUSED_NOTE = ("rung d64 reuses the committed 12-seed run set {path} (the default config = "
               "rung(64)); its results had been read under plans v1 and v2, before plan v4 "
               "existed, so that rung is not pre-registered. The sensitivity line gives the "
               "trend without it.")


def parse_seeds(text):
    """'0-4' or '0,1,2,3,4' (or a mix: '0-4,7') -> [0, 1, 2, 3, 4]; ValueError otherwise."""
    seeds = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"--seeds: {text!r} is not a list like 0-4 or 0,1,2")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"--seeds: range {part!r} runs backwards")
        seeds += range(lo, hi + 1)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: {text!r} names a seed twice")
    return seeds


def parse_rungs(text):
    """'128,256' -> [128, 256]; each must be a width train_tiny.LADDER_LR knows."""
    try:
        rungs = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--rungs: {text!r} is not a comma list of widths") from None
    bad = [d for d in rungs if d not in train_tiny.LADDER_LR]
    if bad or not rungs or len(set(rungs)) != len(rungs):
        raise ValueError(f"--rungs: {text!r}: each rung once, from {sorted(train_tiny.LADDER_LR)}")
    return rungs


def parse_reuse(text):
    """'64=assets/lm_after_ec,128=DIR' -> {64: Path}; '' -> {}."""
    out = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        d, sep, path = part.partition("=")
        if not sep or not d.strip().isdigit() or not path.strip():
            raise ValueError(f"--reuse: {part!r} is not D=DIR (e.g. {REUSE_DEFAULT})")
        out[int(d)] = Path(path.strip())
    return out


def rung_argv(d, seeds, out, routers=None, resume=False, extra=()):
    """The train_tiny argv of rung d: its widths (train_tiny.rung(d)), the ladder's routers and
    seeds, into OUT/d<D>; the flags of `extra` after them (workers, threads, device)."""
    flags = train_tiny.rung(d)
    argv = ["--routers", routers or train_tiny.LADDER_ROUTERS,
            "--seeds", ",".join(str(s) for s in seeds), "--out", str(Path(out) / f"d{d}")]
    for k, v in flags.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    return argv + (["--resume"] if resume else []) + list(extra)


def rung_dirs(out, reuse):
    """{d: directory} of every rung to judge: OUT/d<D> with a results.json, and the reused ones
    (a reused width wins over OUT/d<D>)."""
    found = {int(p.parent.name[1:]): p.parent for p in Path(out).glob("d*/results.json")
             if re.fullmatch(r"d\d+", p.parent.name)}
    found.update({d: p for d, p in reuse.items() if (p / "results.json").exists()})
    return dict(sorted(found.items()))


def judge_ladder(out, reuse, routers):
    """Judge every rung found and the trend across them -> the trend.json dict. Only the routers
    of `routers` that are in train_tiny.LADDER_ROUTERS are judged (top2_dropless, trained on the
    GPU rungs, never is), so every rung has the same family."""
    dirs = rung_dirs(out, reuse)
    keep = [r for r in routers.split(",") if r in train_tiny.LADDER_ROUTERS.split(",")]
    rungs, notes = [], []
    for d, path in dirs.items():
        res = read_json(path / "results.json", "results file", ("runs",))
        r = stats.rung_summary(res, f"d{d}", keep)
        r["dir"], r["reused"] = str(path), d in reuse
        r["command"], r["hardware"] = res.get("command"), res.get("hardware", {}).get("summary")
        r["wall_time_s"] = res.get("wall_time_s")
        rungs.append(r)
        if d in reuse:
            notes.append(REUSED_NOTE.format(path=path))
    t = stats.trend(rungs)
    for r, row in zip(sorted(rungs, key=lambda r: r["params"]), t["rungs"]):
        row.update({k: r[k] for k in ("dir", "reused", "command", "hardware", "wall_time_s")})
        row["judgment"] = {k: r["judgment"][k] for k in ("why", "family")}
        row["sentences"] = [s["sentence"] for s in r["judgment"]["pairs"]]
    fresh = [r for r in rungs if not r["reused"]]
    sens = stats.trend(fresh) if len(fresh) >= 2 and len(fresh) < len(rungs) else None
    return stats.strict_json(dict(trend=t, sensitivity_without_reused=sens, notes=notes,
                                  routers=keep, plan_version=stats.PLAN_VERSION))


def markdown(j):
    """trend.md: each rung's verdicts (judged alone), the trend table, the reuse disclosure."""
    t = j["trend"]
    out = ["# The scale ladder (`python -m lab.ladder`)", ""]
    for r in t["rungs"]:
        out += [f"## Rung {r['rung']}: {r['params']:,} parameters ({stats.SIZE_ROUTER}), "
                f"{len(r['seeds'])} seeds" + (" (reused)" if r["reused"] else ""), "",
                f"- `{r['command']}` ({r['hardware']})",
                f"- Judged alone under plan v{r['plan_version']}: {r['why']}; family of "
                f"{len(r['family'])} (Holm)."] + [f"- {s}" for s in r["sentences"]] + [""]
    out.append(stats.trend_markdown(t))
    if j["sensitivity_without_reused"]:
        out += ["## Sensitivity: the trend without the reused rung", ""]
        out += [f"- {row['sentence']}" for row in j["sensitivity_without_reused"]["pairs"]]
        out.append("")
    out += [f"- {n}" for n in j["notes"]]
    return "\n".join(out) + "\n"


def plot(path, j):
    """trend.png: one panel per pair, its difference at each rung (mean, 95% CI) against the
    rung's parameters (log axis), the fitted line, the zero line; title: the word."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = j["trend"]
    rows = [*t["pairs"], t["positive_control"], t["null_control"]]
    rows = [r for r in rows if r["points"]]
    if not rows:
        return
    cols = 3
    fig, axes = plt.subplots((len(rows) + cols - 1) // cols, cols, squeeze=False,
                             figsize=(4.2 * cols, 3.2 * ((len(rows) + cols - 1) // cols)))
    for ax, row in zip(axes.flat, rows):
        pts = row["points"]
        p = np.array([q["params"] for q in pts], dtype=float)
        m = np.array([q["mean"] for q in pts])
        lo = np.array([q["mean"] if q["lo"] is None else q["lo"] for q in pts])
        hi = np.array([q["mean"] if q["hi"] is None else q["hi"] for q in pts])
        color = "tab:purple" if row["role"] == "family" else "tab:gray"
        ax.errorbar(p, m, yerr=[m - lo, hi - m], fmt="o", color=color, capsize=3)
        f = row["fit"]
        if f:
            ax.plot([p.min(), p.max()], [f["at_min"], f["at_max"]], color=color, lw=1, ls="--")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        role = "" if row["role"] == "family" else f" ({row['role']})"
        ax.set_title(f"{row['pair']}{role}\n{row['word']}", fontsize=9)
        ax.set_xlabel("parameters", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    axes[0][0].set_ylabel("final val loss, challenger - baseline\n(nats; < 0: challenger better)",
                          fontsize=8)
    fig.suptitle(f"The scale ladder: difference at each rung (mean, 95% CI over seeds) and the "
                 f"least-squares trend, analysis plan v{t['plan_version']}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def record(out, entry):
    """Append this invocation to OUT/ladder.json (plan version, rungs, command, start time)."""
    path = Path(out) / "ladder.json"
    book = read_json(path, "ladder file") if path.exists() else dict(invocations=[])
    book["invocations"].append(entry)
    book["plan_version"] = stats.PLAN_VERSION
    write_json(path, book)


def build_parser():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m lab.ladder", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rungs", default="512,1024" if cuda else "128,256",
                   help="widths d to train (reused rungs are read, never trained); default "
                        "512,1024 on CUDA, 128,256 on CPU")
    p.add_argument("--seeds", default="0-4", help="seeds of every rung trained: 0-4 or 0,1,2,...")
    p.add_argument("--routers", default=train_tiny.GPU_PRESET["routers"] if cuda else
                   train_tiny.LADDER_ROUTERS, help="routers of every rung trained (default on "
                   "CUDA: the ladder's and top2_dropless). Judged: those of them in "
                   "train_tiny.LADDER_ROUTERS, so every rung has the same family")
    p.add_argument("--out", default="assets/ladder", help="the ladder's directory (OUT/d<D>/...)")
    p.add_argument("--reuse", default=REUSE_DEFAULT, help="D=DIR,...: rungs read from a committed "
                   "run set instead of trained ('' = none)")
    p.add_argument("--resume", action="store_true", help="passed to train_tiny: skip finished "
                   "runs, continue checkpoints (without it train_tiny restarts a rung's runs)")
    p.add_argument("--judge-only", action="store_true", help="train nothing: judge what exists")
    p.add_argument("--dry-run", action="store_true", help="print each rung's train_tiny command; "
                   "train, judge and write nothing")
    p.add_argument("--workers", type=int, help="passed to train_tiny (default: its own)")
    p.add_argument("--threads", type=int, help="passed to train_tiny (default: its own)")
    p.add_argument("--device", help="passed to train_tiny (default: its own, auto)")
    p.add_argument("--train-flags", default="", help="more train_tiny flags for every rung, "
                   "e.g. '--steps 2' for a smoke test; recorded in ladder.json. Not for ladder "
                   "runs: the rungs must differ in width only")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = build_parser()
    a = p.parse_args(argv)
    try:
        rungs, seeds, reuse = parse_rungs(a.rungs), parse_seeds(a.seeds), parse_reuse(a.reuse)
    except ValueError as e:
        p.error(str(e))
    extra = [x for k in ("workers", "threads", "device") if getattr(a, k) is not None
             for x in ("--" + k, str(getattr(a, k)))] + shlex.split(a.train_flags)
    train = [] if a.judge_only else [d for d in rungs if d not in reuse]
    commands = {d: rung_argv(d, seeds, a.out, a.routers, a.resume, extra) for d in train}
    if a.dry_run:
        for d in rungs:
            print(f"d{d}: reused from {reuse[d]}" if d in reuse else
                  "python train_tiny.py " + shlex.join(commands.get(d) or rung_argv(
                      d, seeds, a.out, a.routers, a.resume, extra)))
        return 0
    Path(a.out).mkdir(parents=True, exist_ok=True)
    record(a.out, dict(command=shlex.join(["python", "-m", "lab.ladder", *argv]),
                       started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       plan_version=stats.PLAN_VERSION, rungs=rungs, trained=train, seeds=seeds,
                       routers=a.routers, reuse={str(d): str(x) for d, x in reuse.items()},
                       judge_only=a.judge_only, train_flags=a.train_flags,
                       code_sha256=train_tiny.code_sha256(),
                       train_tiny_argv={f"d{d}": c for d, c in commands.items()}))
    for d, cmd in commands.items():
        print(f"lab.ladder: rung d{d}: python train_tiny.py {shlex.join(cmd)}", flush=True)
        if train_tiny.main(cmd) is None:          # --stop-after: the rung is not finished
            print(f"lab.ladder: rung d{d} stopped early; continue with --resume")
            return 1
    j = judge_ladder(a.out, reuse, a.routers)
    if not j["trend"]["rungs"]:
        print(f"lab.ladder: no rung with a results.json in {a.out} (or --reuse)")
        return 1
    out = Path(a.out)
    write_json(out / "trend.json", j)
    write_text(out / "trend.md", markdown(j))
    plot(out / "trend.png", j)
    print(stats.trend_markdown(j["trend"]))
    print(f"wrote {out / 'trend.json'}, {out / 'trend.md'}, {out / 'trend.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
