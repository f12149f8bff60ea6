"""lab/bench_parallel.py: what does the expert-parallel exchange cost? Bytes and time of its all-to-alls.

How many bytes the expert-parallel layer (moe.parallel.shard_layer of a router-table layer) moves
and how long its all-to-alls take against the whole layer, for W processes on CPU (gloo). Weak
scaling: every rank has the same n tokens (one routing group) and all ranks together hold e
experts, so every rank runs the same expert work n*c slots whatever W is. W = 1 is the plain layer.
Per rank and step (forward + backward) the layer makes 4 all-to-alls of [W, e/W, m, d] (m = G*k
slots per expert): 2 in the forward (slots out, results back), 2 in the backward. Two timings of
the exchange: "in layer" = the wall time of the 4 all-to-alls inside the layer's step (waiting
for the slowest rank included), "alone" = the same 4 exchanges of the same tensors after a barrier
(the transfer itself). Times are the slowest rank's median. The router is named by its label
(moe/routers.py): --router ec2 at --capacity-factor 1 is "ec2@c1".

    python -m lab.bench_parallel                           # W = 1, 2, 4; n=2048, e=16, EC-CF2
    python -m lab.bench_parallel --quick                   # tiny sizes, W = 1, 2 (seconds)
    python -m lab.bench_parallel --json out.json --txt out.txt   # also write the results
    python -m lab.bench_parallel --help                    # every flag with its default
(assets/bench_ep_cpu.* were written by its predecessor, `python bench.py --expert-parallel`.)
"""
from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

import ecmoe
from lab.cli import dataclass_parser, flag, given_flags
from lab.files import read_json, write_json, write_text
from lab.runner import cpu_model
from moe import parallel
from moe.capped import CappedMoE
from moe.routers import ROUTERS, resolve


@dataclass
class Config:
    world_sizes: str = flag("1,2,4", "comma list of process counts W (each must divide --experts)")
    tokens: int = flag(2048, "tokens n per rank (one routing group)")
    experts: int = flag(16, "experts e in total")
    capacity_factor: float | None = flag(None, "capacity factor c; None: the router's own "
                                         "(ec2: 2); the label names it when it differs")
    d_model: int = flag(256, "model width d")
    d_expert: int = flag(512, "expert width f")
    router: str = flag("ec2", "a MoE router of moe/routers.py (NAME or NAME@cC; not dense)")
    repeats: int = flag(7, "repeats (median reported)")
    seed: int = flag(0, "weight/input seed")
    quick: bool = flag(False, "tiny sizes for a smoke test (QUICK); flags given explicitly win")
    json: str = flag("", "write results as JSON to this path")
    txt: str = flag("", "write the printed report to this path")


# --quick fills only the flags that are not given on the command line
QUICK = dict(world_sizes="1,2", tokens=64, experts=4, d_model=16, d_expert=32, repeats=2)

# The paper's scale, on paper (assumptions stated; nothing here is measured): GLaM-8B dims,
# 64 experts on 64 devices (one per device), c = 2, bfloat16 activations.
PAPER_SCALE = dict(d_model=4096, d_expert=16384, experts=64, world_size=64, capacity_factor=2.0,
                   tokens_per_device=8192, bytes_per_elem=2, moe_layers=16)


def exchange_bytes(slots, d, W, bytes_per_elem):
    """Bytes one all-to-all sends from a rank to the OTHER ranks: slots*d*bytes*(W-1)/W, where
    slots = G*e*k (= n*c for expert choice: e and k only enter through their product)."""
    return slots * d * bytes_per_elem * (W - 1) / W


class _TimedAllToAll(torch.autograd.Function):
    """moe.parallel's all-to-all with a stopwatch around each exchange (gloo on CPU is synchronous)."""
    seconds, calls = 0.0, 0

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _TimedAllToAll.exchange(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _TimedAllToAll.exchange(grad, ctx.group), None

    @staticmethod
    def exchange(x, group):
        import torch.distributed as dist
        x, t0 = x.contiguous(), time.perf_counter()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        _TimedAllToAll.seconds += time.perf_counter() - t0
        _TimedAllToAll.calls += 1
        return out


def _ep_worker(rank, W, init_file, cfg, out_dir):
    """One rank of the benchmark: the layer's step, its exchanges, and the exchanges alone."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    group = None
    if W > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
        group = dist.group.WORLD
        parallel.all_to_all = lambda x, g: _TimedAllToAll.apply(x, g)  # time the layer's own calls
    torch.manual_seed(cfg["seed"])
    n, d = cfg["tokens"], cfg["d_model"]
    spec = resolve(cfg["router"], cfg["capacity_factor"])
    layer = spec.build(d, cfg["d_expert"], cfg["experts"], group="batch",
                       **(dict(max_iter=100) if spec.layer is CappedMoE else {}))
    if W > 1:
        parallel.shard_layer(layer, group)  # this rank keeps experts [r e/W, (r+1) e/W)
    x = torch.randn(1, n, d, generator=torch.Generator().manual_seed(cfg["seed"] + rank),
                    requires_grad=True)
    with torch.no_grad():  # the slots per expert this layer uses (s = k for expert choice)
        probs = ecmoe.router_probs(layer.group_tokens(x), layer.w_router)
        slots = layer.route(probs)[0].shape[-1]
    layer_s, in_layer_s, alone_s = [], [], []
    for r in range(cfg["repeats"] + 1):  # the first is a warm-up
        if W > 1:
            dist.barrier()
        _TimedAllToAll.seconds, _TimedAllToAll.calls = 0.0, 0
        t0 = time.perf_counter()
        layer(x).y.square().mean().backward()
        step = time.perf_counter() - t0
        calls, exchanged = _TimedAllToAll.calls, _TimedAllToAll.seconds
        alone = 0.0
        if W > 1:  # the same 4 exchanges of the same tensor, after a barrier
            buf = torch.randn(W, cfg["experts"] // W, slots, d)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(4):
                out = torch.empty_like(buf)
                dist.all_to_all_single(out, buf, group=group)
            alone = time.perf_counter() - t0
        if r:
            layer_s.append(step)
            in_layer_s.append(exchanged)
            alone_s.append(alone)
    result = dict(rank=rank, slots_per_expert=slots, calls=calls, layer_s=layer_s,
                  in_layer_s=in_layer_s, alone_s=alone_s)
    write_json(os.path.join(out_dir, f"W{W}_rank{rank}.json"), result)
    if W > 1:
        dist.destroy_process_group()


def measure(cfg, out_dir):
    """One spawn of W processes per world size -> rows of the table (slowest rank's medians).
    cfg: a dict of the run (run_config): world_sizes a list, router its label, c its number."""
    import torch.multiprocessing as tmp
    rows = []
    for W in cfg["world_sizes"]:
        if cfg["experts"] % W:
            raise ValueError(f"--world-sizes: {W} does not divide --experts {cfg['experts']}")
        tmp.spawn(_ep_worker, args=(W, os.path.join(out_dir, f"init{W}"), cfg, out_dir),
                  nprocs=W, join=True)
        ranks = [read_json(os.path.join(out_dir, f"W{W}_rank{r}.json"), "rank result") for r in range(W)]
        s = ranks[0]["slots_per_expert"]
        slots = cfg["experts"] * s  # G*e*s with G = 1 group per rank
        sent = exchange_bytes(slots, cfg["d_model"], W, 4)
        med = lambda key: max(statistics.median(r[key]) for r in ranks)  # noqa: E731
        row = dict(W=W, experts_per_rank=cfg["experts"] // W, slots_per_expert=s, slots=slots,
                   exchanges_per_step=ranks[0]["calls"] if W > 1 else 0,
                   bytes_per_exchange=sent, bytes_per_step=4 * sent if W > 1 else 0,
                   layer_ms=1e3 * med("layer_s"), in_layer_a2a_ms=1e3 * med("in_layer_s"),
                   alone_a2a_ms=1e3 * med("alone_s"))
        row["in_layer_a2a_fraction"] = row["in_layer_a2a_ms"] / row["layer_ms"]
        row["alone_a2a_fraction"] = row["alone_a2a_ms"] / row["layer_ms"]
        # bytes leaving one rank per second during the exchanges alone (4 per step)
        row["alone_GB_per_s"] = row["bytes_per_step"] / row["alone_a2a_ms"] / 1e6 if W > 1 else 0.0
        rows.append(row)
    return rows


def paper_scale_lines():
    """The exchange at the paper's 64-expert scale, on paper (PAPER_SCALE's assumptions)."""
    p = PAPER_SCALE
    slots = p["tokens_per_device"] * p["capacity_factor"]  # e*k = n*c per device
    sent = exchange_bytes(slots, p["d_model"], p["world_size"], p["bytes_per_elem"])
    per_layer = 4 * sent
    flops = 3 * slots * 2 * 2 * p["d_model"] * p["d_expert"]  # fwd+bwd ~ 3x fwd; 2 matmuls
    return [
        f"On paper, the paper's scale (assumed: GLaM-8B dims d={p['d_model']}, f={p['d_expert']}; "
        f"e={p['experts']} experts on W={p['world_size']} devices; n={p['tokens_per_device']} tokens "
        f"per device; c={p['capacity_factor']:g}; bfloat16; {p['moe_layers']} MoE layers):",
        f"  per all-to-all each device sends n*c*d*2 B*(W-1)/W = {sent / 2**20:.0f} MiB to the others; "
        f"x4 per MoE layer per step = {per_layer / 2**20:.0f} MiB; x{p['moe_layers']} layers = "
        f"{p['moe_layers'] * per_layer / 2**30:.1f} GiB per device per step",
        f"  expert work per device per MoE layer (fwd+bwd) = 3 * n*c * 4*d*f = {flops / 1e12:.1f} "
        f"TFLOP, i.e. {flops / per_layer:.0f} FLOP per byte exchanged (= 3f/bytes * W/(W-1)):",
        "  the exchange costs less than the expert matmuls wherever the all-to-all bandwidth per "
        "device exceeds (achieved FLOP/s) / that ratio, e.g. "
        f"{400e12 / (flops / per_layer) / 1e9:.0f} GB/s at an assumed 400 TFLOP/s "
        "(an assumption, not a measurement).",
    ]


def parse_config(argv):
    """argv -> (Config, parser, run dict). --quick fills only the flags not given; bad values stop
    with a usage error naming the flag and its range. The run dict (what the workers and the
    JSON get) has world_sizes as a list, the router's label and its c."""
    parser = dataclass_parser(Config, "python -m lab.bench_parallel", __doc__.split("\n")[0],
                              "--quick: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    cfg = Config(**vars(parser.parse_args(argv)))
    if cfg.quick:
        given = given_flags(Config, argv)
        for k, v in QUICK.items():
            if k not in given:
                setattr(cfg, k, v)
    try:
        sizes = [int(w) for w in cfg.world_sizes.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        parser.error(f"--world-sizes: expected a comma list of integers >= 1, got {cfg.world_sizes!r}")
    for name, low in (("tokens", 1), ("experts", 1), ("d_model", 1), ("d_expert", 1),
                      ("repeats", 1), ("seed", 0)):
        if getattr(cfg, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be an integer >= {low}, got "
                         f"{getattr(cfg, name)}")
    bad = [W for W in sizes if cfg.experts % W]
    if bad:
        parser.error(f"--world-sizes {bad} must divide --experts {cfg.experts}")
    try:
        spec = resolve(cfg.router, cfg.capacity_factor)
    except ValueError as e:
        parser.error(f"--router / --capacity-factor: {e}")
    if spec.layer is None:
        parser.error(f"--router: {cfg.router!r} has no experts to place; choose a MoE router of "
                     + ", ".join(r for r, x in ROUTERS.items() if x.layer is not None))
    run = dict(asdict(cfg), world_sizes=sizes, router=spec.label,
               capacity_factor=spec.capacity_factor)
    for k in ("quick", "json", "txt"):
        run.pop(k)
    return cfg, parser, run


def main(argv=None):
    """Measure, print the table, write --json / --txt."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, parser, run = parse_config(argv)
    t_start, load = time.time(), os.getloadavg()  # the machine may be shared: say how busy
    with tempfile.TemporaryDirectory() as out_dir:
        rows = measure(run, out_dir)
    k = ecmoe.expert_capacity(run["tokens"], run["experts"], run["capacity_factor"])
    lines = [f"{cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, gloo, 1 thread per "
             f"process, float32; load average before the run {load[0]:.1f} (1 min)",
             f"expert-parallel layer, router={run['router']}, per rank n={run['tokens']} tokens "
             f"(one group), e={run['experts']} experts in total, c={run['capacity_factor']:g} "
             f"(k={k}), d={run['d_model']}, f={run['d_expert']}; forward+backward, slowest rank's "
             f"median of {run['repeats']}",
             f"{'W':>2} {'e/W':>4} {'slots':>6} {'a2a/step':>8} {'MiB sent/a2a':>12} "
             f"{'layer ms':>9} {'a2a in layer ms':>15} {'share':>6} {'a2a alone ms':>12} {'share':>6} "
             f"{'GB/s alone':>10}"]
    for r in rows:
        lines.append(f"{r['W']:>2} {r['experts_per_rank']:>4} {r['slots']:>6} "
                     f"{r['exchanges_per_step']:>8} {r['bytes_per_exchange'] / 2**20:>12.2f} "
                     f"{r['layer_ms']:>9.1f} {r['in_layer_a2a_ms']:>15.1f} "
                     f"{r['in_layer_a2a_fraction']:>6.0%} {r['alone_a2a_ms']:>12.1f} "
                     f"{r['alone_a2a_fraction']:>6.0%} {r['alone_GB_per_s']:>10.2f}")
    lines += ["slots = e*k per rank (= n*c); MiB sent/a2a = slots*d*4 B*(W-1)/W leaving each rank; "
              "4 all-to-alls per step (2 forward, 2 backward); GB/s alone = those bytes / the "
              "exchanges' time alone.",
              f"Machine: {os.cpu_count()} cores for W processes of 1 thread: W > cores means "
              "processes share cores, so layer times grow with W for that reason alone.",
              ""] + paper_scale_lines()
    wall = time.time() - t_start
    command = shlex.join(["python", "-m", "lab.bench_parallel", *argv])
    lines.append(f"command: {command}  (wall time {wall:.0f} s)")
    print("\n".join(lines))
    result = dict(command=command,
                  hardware=dict(processor=cpu_model(), cpu_count=os.cpu_count(),
                                python=platform.python_version()),
                  torch=torch.__version__, backend="gloo", threads_per_process=1, dtype="float32",
                  load_average_before=load,
                  config=run, k=k, rows=rows, paper_scale=dict(
                      assumptions=PAPER_SCALE, lines=paper_scale_lines()), wall_s=wall)
    for path, write in ((cfg.json, lambda p: write_json(p, result)),
                        (cfg.txt, lambda p: write_text(p, "\n".join(lines) + "\n"))):
        if path:
            write(path)   # atomic; creates the folder
            print("wrote", path)
    return result


if __name__ == "__main__":
    main()
