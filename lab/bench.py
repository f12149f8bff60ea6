"""lab/bench.py: how fast is ecmoe.MoE compared with a dense FFN of the same activated FLOPs?

Forward + backward wall time of one layer on n tokens (one routing group), for
    dense    a GELU FFN d -> c*f -> d: the same FLOPs as EC-CFc (each token gets c experts of width f
             on average), the yardstick every ratio is taken against (always timed);
    ec       router "ec2" of the router table (moe/routers.py: ecmoe.MoE; gather -> batched matmul
             -> scatter-add), at the case's c;
    top1/2   routers "top1" / "top2" (moe.token_choice.TokenChoiceMoE) through the same dispatch
             path, same slot count (the case's c);
    dropless router "top2_dropless" (TokenChoiceMoE, dropless): every expert padded to the busiest
             expert's demand (one host sync per forward); its compute does not depend on c;
    grouped  the same routing and weights through moe.grouped.GroupedDroplessMoE: exactly n*2 rows
             sorted by expert, one torch._grouped_mm per FFN matmul, no padding, no host sync;
    et       router "et2" (moe.threshold.ExpertThresholdMoE, a training step: routed by the learned
             thresholds, grouped experts), at the case's c: what Expert Threshold routing costs
             against expert choice ("ec");
    lossfree router "top2_lossfree" (moe.token_choice.LossFreeMoE: padded like "dropless") and the
             same weights through moe.grouped.GroupedLossFreeMoE ("lossfree_grouped": n*2 rows);
    threshold  expert choice with eval_routing="threshold" (thresholds learned on another batch),
             eval forward only under torch.no_grad: padded (ecmoe.MoE) vs grouped (moe.grouped.
             GroupedMoE), printed under the row, not against dense;
    onehot   expert choice the way the Google references write it: one-hot dispatch and combine
             tensors [n, e, k] and einsums (O(c n^2 d) work and O(c n^2) memory), for contrast;
    hf       transformers' SwitchTransformersSparseMLP at matched sizes (only when installed).
With --compile, dense/ec/top1/top2 are also timed after torch.compile (names end in _compiled).
Timings are interleaved round-robin (each repeat runs every method once) and we report medians.
On CUDA each call is timed with CUDA events (after torch.cuda.synchronize); on CPU with
time.perf_counter. --dtype bfloat16 runs the forward under torch.autocast (the layer keeps its
router in float32, see ecmoe.MoE); the weights stay float32, as in mixed-precision training.
On CUDA, <method>_peak_mb is the peak allocated memory during the method's warm-up call
(everything resident included); <method>_compiled_compile_s is the first call of a compiled one.

    python -m lab.bench                   # full table, fp32, CUDA if present else CPU
    python -m lab.bench --quick           # tiny config for a smoke test (seconds); flags you give win
    python -m lab.bench --json out.json   # also write hardware, versions, threads and timings
    python -m lab.bench --device cuda --dtype bfloat16 --compile   # GPU, bf16 autocast, + compiled
    python -m lab.bench --expert-parallel # bytes and time of the expert-parallel all-to-all, W = 1, 2, 4
"""
import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import ecmoe
from lab.files import read_json, write_json, write_text
from moe import parallel
from moe.capped import CappedMoE
from moe.grouped import GroupedDroplessMoE, GroupedLossFreeMoE, GroupedMoE
from moe.routers import ROUTERS, make_layer

# The MoE methods and the router-table names whose layers they time (moe/routers.py); each case's
# capacity factor c replaces the table's, so "ec" is EC-CF1 at c = 1 and EC-CF2 at c = 2.
ROUTER_OF = dict(ec="ec2", top1="top1", top2="top2", et="et2")
METHODS = (*ROUTER_OF, "dropless", "grouped", "lossfree", "threshold", "onehot", "hf")  # besides dense
COMPILABLE = ("dense", "ec", "top1", "top2")


@dataclass
class BenchConfig:
    tokens: list = field(default_factory=lambda: [2048, 8192])  # n, tokens in the routing group
    experts: list = field(default_factory=lambda: [8, 32])  # e
    capacity_factors: list = field(default_factory=lambda: [1.0, 2.0])  # c
    d_model: int = 256  # d
    d_expert: int = 1024  # f, expert width; the dense FFN has width c*f
    repeats: int = 7  # round-robin repeats (median reported)
    onehot_repeats: int = 3  # the one-hot baseline is slow: it joins only the first rounds
    onehot_max_gb: float = 4.0  # skip one-hot sizes whose [n, e, k] tensors would need more memory
    onehot_max_gflop: float = 1000.0  # ... or more work than this per forward+backward
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "float32"  # float32, or bfloat16 = the forward under torch.autocast
    matmul_precision: str = "highest"  # torch.set_float32_matmul_precision; "high" = TF32 on GPUs
    methods: list = field(default_factory=lambda: list(METHODS))  # besides dense
    compile: bool = False  # also time torch.compile'd dense/ec/top1/top2
    threads: int = 0  # CPU threads (0 = torch's default); 1 is steadier on a shared machine
    seed: int = 0


def _number(kind, low, strict=False, note=""):
    """argparse type: an int/float >= low (> low if strict), finite; the message names the range."""
    word = "an integer" if kind is int else "a finite number"
    expected = f"{word} {'>' if strict else '>='} {low:g}{note}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}; got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {expected}; got {text!r}")
        return value
    return parse


# flag -> (argparse type or choices, help); the help also shows the default and --quick's value
FLAGS = dict(
    tokens=(_number(int, 1), "tokens n per routing group"),
    experts=(_number(int, 2, note=" (top-2 needs two experts)"), "expert counts e"),
    capacity_factors=(_number(float, 0, strict=True), "capacity factors c"),
    d_model=(_number(int, 1), "model width d"),
    d_expert=(_number(int, 1), "expert width f (dense width = c*f)"),
    repeats=(_number(int, 1), "interleaved repeats (median reported)"),
    onehot_repeats=(_number(int, 1), "repeats that include one-hot"),
    onehot_max_gb=(_number(float, 0), "skip one-hot above this memory"),
    onehot_max_gflop=(_number(float, 0), "skip one-hot above this work"),
    device=(("cpu", "cuda"), "device; cuda when torch sees a GPU"),
    dtype=(("float32", "bfloat16"), "float32, or bfloat16 autocast (weights stay float32)"),
    matmul_precision=(("highest", "high", "medium"), "float32 matmul precision (high = TF32)"),
    methods=(METHODS, "methods to time besides dense"),
    compile=(bool, "also time torch.compile'd dense/ec/top1/top2"),
    threads=(_number(int, 0), "CPU threads, 0 = torch default"),
    seed=(_number(int, 0), "weight/input seed"),
)
# --quick fills only the flags that are not given on the command line
QUICK = dict(tokens=[256], experts=[4], capacity_factors=[2.0], d_model=32, d_expert=64,
             repeats=3, onehot_repeats=2)


class DenseFFN(torch.nn.Module):
    def __init__(self, d, width):
        super().__init__()
        self.w_in = torch.nn.Parameter(torch.randn(d, width) / d ** 0.5)
        self.w_out = torch.nn.Parameter(torch.randn(width, d) / width ** 0.5)

    def forward(self, x):
        return F.gelu(x @ self.w_in, approximate="tanh") @ self.w_out


class OneHotExpertChoice(torch.nn.Module):
    """Expert choice with one-hot dispatch/combine tensors [n, e, k] (flaxformer/praxis style)."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe  # share the weights

    def forward(self, x):
        x = x.reshape(-1, x.shape[-1])  # [n, d]
        n, e = x.shape[0], self.moe.n_experts
        k = ecmoe.expert_capacity(n, e, self.moe.capacity_factor)
        probs = ecmoe.router_probs(x, self.moe.w_router, validate=False)  # [n, e]
        gates, token_index = torch.topk(probs.t(), k, dim=-1)  # [e, k]
        dispatch = F.one_hot(token_index, n).permute(2, 0, 1).to(x.dtype)  # [n, e, k]
        combine = dispatch * gates  # [n, e, k]
        X_in = torch.einsum("nd,nek->ekd", x, dispatch)
        X_e = torch.bmm(F.gelu(torch.bmm(X_in, self.moe.w_in), approximate="tanh"), self.moe.w_out)
        return torch.einsum("ekd,nek->nd", X_e, combine)


def hf_switch_mlp(d, f, e, k):
    """transformers' SwitchTransformersSparseMLP (top-1) at matched sizes, or None if unavailable."""
    try:
        from transformers import SwitchTransformersConfig
        from transformers.models.switch_transformers import modeling_switch_transformers as hf
    except ImportError:
        return None
    config = SwitchTransformersConfig(d_model=d, d_ff=f, num_experts=e, expert_capacity=k,
                                      router_jitter_noise=0.0, router_dtype="float32",
                                      dense_act_fn="gelu_new", dropout_rate=0.0)
    mlp = hf.SwitchTransformersSparseMLP(config)

    def forward(x):
        out = mlp(x)
        return out[0] if isinstance(out, tuple) else out
    forward.parameters = mlp.parameters
    return forward


def onehot_cost(n, e, k, d):
    """(GB of the dispatch/combine tensors and their grads, GFLOP of the einsums fwd+bwd)."""
    entries = n * e * k
    return 4 * entries * 4 / 1e9, 3 * 2 * 2 * entries * d / 1e9


def time_once(fn, x, params, cfg, backward=True):
    """Seconds for one forward (under autocast if --dtype bfloat16) + backward of fn on x;
    backward=False: the forward alone, under torch.no_grad (inference)."""
    for p in params:
        p.grad = None
    x.grad = None
    cuda = cfg.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        t0 = time.perf_counter()
    with torch.autocast(cfg.device, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"), \
            torch.set_grad_enabled(backward):
        out = fn(x)
        y = out.y if isinstance(out, ecmoe.MoEOutput) else out
        loss = y.float().square().mean()
    if backward:
        loss.backward()  # outside autocast, as in mixed-precision training
    if cuda:
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return time.perf_counter() - t0


def compile_methods(methods, x, cfg, notes, row):
    """torch.compile'd copies of dense/ec/top1/top2; row gets the time of their first call."""
    compiled = {}
    for name in [m for m in COMPILABLE if m in methods]:
        fn = torch.compile(methods[name])
        try:
            compile_s = time_once(fn, x, list(methods[name].parameters()), cfg)
        except Exception as error:  # e.g. no C++ compiler for inductor on CPU
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            notes.append(f"compile skipped for {name} at n={row['n']} e={row['e']} c={row['c']}: "
                         f"{type(error).__name__}: {first_line[:200]}")
            continue
        row[f"{name}_compiled_compile_s"] = compile_s
        compiled[f"{name}_compiled"] = fn
    return compiled


def bench_case(cfg, n, e, c, notes):
    """Median forward+backward milliseconds of every method for n tokens, e experts, factor c."""
    torch.manual_seed(cfg.seed)
    d, f, device = cfg.d_model, cfg.d_expert, cfg.device
    k = ecmoe.expert_capacity(n, e, c)
    row = dict(n=n, e=e, c=c, k=k)
    x = torch.randn(1, n, d, device=device, requires_grad=True)  # one routing group of n tokens
    moe = {name: make_layer(router, d, f, e, capacity_factor=c, group="batch").to(device)
           for name, router in ROUTER_OF.items()}  # all built (the same seed draws in every case)
    methods = {"dense": DenseFFN(d, round(c * f)).to(device)}
    for name in ROUTER_OF:
        if name in cfg.methods:
            methods[name] = moe[name]
    gb, gflop = onehot_cost(n, e, k, d)
    if "onehot" in cfg.methods and (gb > cfg.onehot_max_gb or gflop > cfg.onehot_max_gflop):
        notes.append(f"onehot skipped at n={n} e={e} c={c}: would need {gb:.1f} GB / {gflop:.0f} GFLOP "
                     f"(limits {cfg.onehot_max_gb} GB / {cfg.onehot_max_gflop} GFLOP)")
    elif "onehot" in cfg.methods:
        methods["onehot"] = OneHotExpertChoice(moe["ec"])
    hf = hf_switch_mlp(d, f, e, k) if "hf" in cfg.methods else None
    if hf is not None:
        methods["hf_switch_top1"] = hf
    if "dropless" in cfg.methods or "grouped" in cfg.methods:  # built last: the draws above stay
        methods.update(dropless_methods(cfg, d, f, e, c, x, row))
    if "lossfree" in cfg.methods:
        methods.update(lossfree_methods(cfg, d, f, e, c))
    eval_only = threshold_methods(cfg, d, f, e, c, x, row) if "threshold" in cfg.methods else {}
    if cfg.compile:
        torch._dynamo.reset()  # fresh compile per case: no cache limit, no stale shapes
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        methods.update(compile_methods(methods, x, cfg, notes, row))
        row["compiled_graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values()) - breaks
    times = {name: [] for name in (*methods, *eval_only)}
    backward = {**{name: True for name in methods}, **{name: False for name in eval_only}}
    methods.update(eval_only)
    for name, fn in methods.items():  # warm-up (compiled ones already ran once: the compile)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        time_once(fn, x, list(fn.parameters()), cfg, backward[name])
        if device == "cuda":
            row[f"{name}_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    for r in range(cfg.repeats):
        for name, fn in methods.items():
            if name == "onehot" and r >= cfg.onehot_repeats:
                continue
            times[name].append(time_once(fn, x, list(fn.parameters()), cfg, backward[name]))
    for name, t in times.items():
        row[f"{name}_ms"] = 1e3 * statistics.median(t)
        row[f"{name}_min_ms"] = 1e3 * min(t)
    for name in times:
        if name != "dense" and backward[name]:
            row[f"{name}_vs_dense"] = row[f"{name}_ms"] / row["dense_ms"]
        if name.endswith("_compiled") and name != "dense_compiled" and "dense_compiled" in times:
            row[f"{name}_vs_dense_compiled"] = row[f"{name}_ms"] / row["dense_compiled_ms"]
    if "onehot_ms" in row and "ec_ms" in row:
        row["onehot_over_ec"] = row["onehot_ms"] / row["ec_ms"]
    for a, b in (("dropless", "top2"), ("grouped", "top2"), ("grouped", "dropless"), ("grouped", "ec"),
                 ("lossfree", "top2"), ("lossfree_grouped", "top2"), ("lossfree_grouped", "lossfree"),
                 ("et", "ec"), ("thr_grouped", "thr_padded")):  # ratios measured side by side in this run
        if f"{a}_ms" in row and f"{b}_ms" in row:
            row[f"{a}_over_{b}"] = row[f"{a}_ms"] / row[f"{b}_ms"]
    return row


def padded_and_grouped(router, grouped_class, cfg, d, f, e, c):
    """The router table's padded dropless top-2 layer `router` and `grouped_class` (its twin on
    the grouped path) with the same weights (and, for loss-free, the same bias)."""
    padded = make_layer(router, d, f, e, capacity_factor=c, group="batch").to(cfg.device)
    grouped = grouped_class(d, f, e, top_k=2, capacity_factor=c, group="batch").to(cfg.device)
    grouped.load_state_dict(padded.state_dict())
    return padded, grouped


def dropless_methods(cfg, d, f, e, c, x, row):
    """Dropless top-2 padded ("top2_dropless" of the router table) and grouped (GroupedDroplessMoE,
    the same weights); row gets the padded layout's slots over the n*2 rows the grouped one computes."""
    padded, grouped = padded_and_grouped("top2_dropless", GroupedDroplessMoE, cfg, d, f, e, c)
    with torch.no_grad():
        route = padded.route(ecmoe.router_probs(padded.group_tokens(x), padded.w_router))
    row["dropless_padding"] = route.gates[0].numel() / (2 * x.shape[1])  # e*s / (n*2)
    return {name: layer for name, layer in (("dropless", padded), ("grouped", grouped)) if name in cfg.methods}


def lossfree_methods(cfg, d, f, e, c):
    """Loss-free top-2 padded ("top2_lossfree" of the router table) and grouped (GroupedLossFreeMoE).
    Training steps: the loads count, update_bias is not called."""
    padded, grouped = padded_and_grouped("top2_lossfree", GroupedLossFreeMoE, cfg, d, f, e, c)
    return dict(lossfree=padded, lossfree_grouped=grouped)


def threshold_methods(cfg, d, f, e, c, x, row):
    """Expert choice in eval with eval_routing="threshold", padded (ecmoe.MoE) and grouped
    (GroupedMoE, the same weights), thresholds learned from one training forward on another batch;
    row gets the busiest expert's load over the mean load (1 = no padding to save)."""
    padded = make_layer("ec2", d, f, e, capacity_factor=c, group="batch", eval_routing="threshold").to(cfg.device)
    with torch.no_grad():
        padded(torch.randn_like(x))  # training mode: the thresholds learn (first update sets them)
    grouped = GroupedMoE(d, f, e, capacity_factor=c, group="batch", eval_routing="threshold").to(cfg.device)
    grouped.load_state_dict(padded.state_dict())
    padded.eval(), grouped.eval()
    with torch.no_grad():
        route = padded.route(ecmoe.router_probs(padded.group_tokens(x), padded.w_router))
    load = (route.token_index >= 0).sum(-1).float()  # [1, e]
    row["thr_load_max_over_mean"] = float(load.max() / load.mean().clamp(min=1e-9))
    return dict(thr_padded=padded, thr_grouped=grouped)


def side_by_side_lines(row):
    """The dropless and threshold ratios of one row, as printed under it."""
    ratio = lambda a, b: f"{a} {row[f'{a}_over_{b}']:.2f}x {b}" if f"{a}_over_{b}" in row else None  # noqa: E731
    dropless = [ratio("dropless", "top2"), ratio("grouped", "top2"), ratio("grouped", "dropless"),
                ratio("grouped", "ec")]
    lines = []
    if any(dropless):
        pad = f" (padded slots {row['dropless_padding']:.2f}x the n*2 rows)" if "dropless_padding" in row else ""
        lines.append("dropless top-2 fwd+bwd: " + ", ".join(t for t in dropless if t) + pad)
    lossfree = [ratio("lossfree", "top2"), ratio("lossfree_grouped", "top2"), ratio("lossfree_grouped", "lossfree")]
    if any(lossfree):
        lines.append("loss-free top-2 fwd+bwd: " + ", ".join(t for t in lossfree if t))
    if "et_over_ec" in row:
        lines.append(f"expert threshold fwd+bwd: et {row['et_over_ec']:.2f}x ec (same c)")
    if "thr_grouped_over_thr_padded" in row:
        lines.append(f"threshold eval forward: padded {row['thr_padded_ms']:.2f} ms, grouped "
                     f"{row['thr_grouped_ms']:.2f} ms = {row['thr_grouped_over_thr_padded']:.2f}x padded "
                     f"(busiest expert {row['thr_load_max_over_mean']:.2f}x the mean load)")
    return lines


def check_targets(rows):
    """The targets from the issue (benchmark only, never asserted in tests)."""
    out = []
    for row in rows:
        if "ec_ms" not in row:
            continue
        if row["c"] == 2.0 and row["n"] == 8192:
            out.append((f"EC-CF2 <= 1.05x dense (n=8192, e={row['e']})", row["ec_vs_dense"] <= 1.05))
        if row["c"] == 2.0 and row["n"] == 2048 and row["e"] == 32:
            out.append(("EC-CF2 <= 1.15x dense (n=2048, e=32)", row["ec_vs_dense"] <= 1.15))
        if row["c"] == 2.0 and "grouped_over_top2" in row:  # issue 18: dropless at top-2's cost
            out.append((f"dropless top-2 (grouped) <= 1.15x top-2 (n={row['n']}, e={row['e']})",
                        row["grouped_over_top2"] <= 1.15))
        if row["c"] == 2.0 and "lossfree_grouped_over_top2" in row:
            out.append((f"loss-free top-2 (grouped) <= 1.15x top-2 (n={row['n']}, e={row['e']})",
                        row["lossfree_grouped_over_top2"] <= 1.15))
        if "top2_ms" in row:
            out.append((f"EC <= top-2 (n={row['n']}, e={row['e']}, c={row['c']})",
                        row["ec_ms"] <= row["top2_ms"]))
        if row["n"] == 8192 and "onehot_over_ec" in row:
            out.append((f"EC >= 10x faster than one-hot (n=8192, e={row['e']}, c={row['c']})",
                        row["onehot_over_ec"] >= 10))
    return out


def cpu_name():
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.platform()


def build_parser():
    """Flags from BenchConfig; defaults are filled in parse_config (so --quick can tell given ones)."""
    defaults = asdict(BenchConfig())
    parser = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__.split("\n")[0],
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", default=False,
                        help="tiny config for a smoke test; flags given explicitly still win")
    parser.add_argument("--json", metavar="PATH", default=None, help="write results as JSON to PATH")
    for name, value in defaults.items():
        kind, text = FLAGS[name]
        flag = f"--{name.replace('_', '-')}"
        show = lambda v: " ".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
        text += f" (default: {show(value)}" + (f"; --quick: {show(QUICK[name])})" if name in QUICK else ")")
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=text)
        elif isinstance(kind, tuple):
            parser.add_argument(flag, choices=kind, nargs="+" if isinstance(value, list) else None,
                                help=text)
        else:
            parser.add_argument(flag, type=kind, nargs="+" if isinstance(value, list) else None,
                                help=text)
    return parser


def parse_config(argv):
    """argv -> (BenchConfig, args). Precedence: defaults < --quick's values < flags given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {name: getattr(args, name) for name in asdict(BenchConfig()) if hasattr(args, name)}
    cfg = BenchConfig(**{**asdict(BenchConfig()), **(QUICK if args.quick else {}), **given})
    if cfg.device == "cuda" and not torch.cuda.is_available():
        reason = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no GPU"
        parser.error(f"--device cuda: no CUDA device available ({reason}); use --device cpu")
    return cfg, args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--expert-parallel" in argv:  # the section "expert parallelism" below
        return ep_main(argv)
    t_start = time.time()
    cfg, args = parse_config(argv)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    notes = []
    if "hf" in cfg.methods:
        try:
            import transformers  # noqa: F401
        except ImportError:
            notes.append("transformers not installed: HF SwitchTransformersSparseMLP skipped")
    device_name = torch.cuda.get_device_name(0) if cfg.device == "cuda" else cpu_name()
    precision = ("bfloat16 autocast (router float32, weights float32)" if cfg.dtype == "bfloat16"
                 else f"float32 (matmul precision {cfg.matmul_precision})")
    timer = "cuda events" if cfg.device == "cuda" else "time.perf_counter"
    print(f"{device_name}, {os.cpu_count()} cores")
    print(f"device={cfg.device} threads={torch.get_num_threads()} torch={torch.__version__} {precision}, "
          f"d={cfg.d_model} f={cfg.d_expert}, forward+backward, median of {cfg.repeats} interleaved "
          f"repeats ({timer}){', + torch.compile' if cfg.compile else ''}")
    names = [m for m in ("ec", "et", "top1", "top2", "dropless", "grouped", "onehot") if m in cfg.methods]
    names += [m for m in ("lossfree", "lossfree_grouped") if "lossfree" in cfg.methods]
    names += [f"{m}_compiled" for m in COMPILABLE if cfg.compile and (m == "dense" or m in cfg.methods)]
    print(f"{'n':>6} {'e':>3} {'c':>4} {'dense ms':>9} " + " ".join(f"{m:>{max(7, len(m))}}" for m in names))
    rows = []
    for n in cfg.tokens:
        for e in cfg.experts:
            for c in cfg.capacity_factors:
                row = bench_case(cfg, n, e, c, notes)
                rows.append(row)
                cells = [f"{row[m + '_vs_dense']:{max(7, len(m)) - 1}.2f}x" if m + "_vs_dense" in row
                         else f"{'skip':>{max(7, len(m))}}" for m in names]
                print(f"{n:>6} {e:>3} {c:>4} {row['dense_ms']:9.2f} " + " ".join(cells), flush=True)
                if "hf_switch_top1_ms" in row:
                    print(f"{'':>15} HF SwitchTransformersSparseMLP: {row['hf_switch_top1_vs_dense']:.2f}x dense")
                for line in side_by_side_lines(row):
                    print(f"{'':>15} {line}")
    print("(columns after 'dense ms' are time / eager dense time)")
    for note in notes:
        print("note:", note)
    targets = check_targets(rows) if not args.quick and cfg.dtype == "float32" else []
    for text, ok in targets:
        print(f"target {'met ' if ok else 'MISSED'}: {text}")
    result = dict(command=shlex.join(["python", "-m", "lab.bench", *argv]), hardware=dict(
                      machine=platform.machine(), processor=cpu_name(), cpu_count=os.cpu_count(),
                      python=platform.python_version(),
                      cuda=torch.cuda.get_device_name(0) if cfg.device == "cuda" else None,
                      cuda_version=torch.version.cuda if cfg.device == "cuda" else None),
                  torch=torch.__version__, threads=torch.get_num_threads(), dtype=cfg.dtype,
                  precision=precision, timer=timer, config=asdict(cfg), rows=rows, notes=notes,
                  targets=[dict(target=t, met=ok) for t, ok in targets], wall_s=time.time() - t_start)
    try:
        import transformers
        result["hardware"]["transformers"] = transformers.__version__
    except ImportError:
        pass
    if args.json:
        write_json(args.json, result)   # atomic, strict JSON; creates the folder
        print("wrote", args.json)
    return result


# ----------------------------------------------------------------------------- expert parallelism
# python -m lab.bench --expert-parallel [--world-sizes 1 2 4] [--json PATH] [--txt PATH]
# How many bytes the expert-parallel layer (moe.parallel.shard_layer of a router-table layer) moves and how
# long its all-to-alls take against the whole layer, for W processes on CPU (gloo). Weak scaling:
# every rank has the same n tokens (one routing group) and all ranks together hold e experts, so
# every rank runs the same expert work n*c slots whatever W is. W = 1 is the plain layer.
# Per rank and step (forward + backward) the layer makes 4 all-to-alls of [W, e/W, m, d]
# (m = G*k slots per expert): 2 in the forward (slots out, results back), 2 in the backward.
# Two timings of the exchange: "in layer" = the wall time of the 4 all-to-alls inside the
# layer's step (waiting for the slowest rank included), "alone" = the same 4 exchanges of the
# same tensors after a barrier (the transfer itself). Times are the slowest rank's median.

@dataclass
class EPConfig:
    world_sizes: list = field(default_factory=lambda: [1, 2, 4])  # W
    tokens: int = 2048  # n tokens per rank (one routing group)
    experts: int = 16  # e in total (W must divide it)
    capacity_factor: float = 2.0  # c
    d_model: int = 256  # d
    d_expert: int = 512  # f
    router: str = "ec2"  # a name of the router table (moe/routers.py); --capacity-factor overrides its c
    repeats: int = 7
    seed: int = 0


EP_FLAGS = dict(world_sizes=(_number(int, 1), "process counts W to measure"),
                tokens=(_number(int, 1), "tokens n per rank (one routing group)"),
                experts=(_number(int, 1), "experts e in total"),
                capacity_factor=(_number(float, 0, strict=True), "capacity factor c"),
                d_model=(_number(int, 1), "model width d"),
                d_expert=(_number(int, 1), "expert width f"),
                router=(tuple(r for r, spec in ROUTERS.items() if spec.layer is not None),
                        "router (moe/routers.py; its c is replaced by --capacity-factor)"),
                repeats=(_number(int, 1), "repeats (median reported)"),
                seed=(_number(int, 0), "weight/input seed"))
EP_QUICK = dict(world_sizes=[1, 2], tokens=64, experts=4, d_model=16, d_expert=32, repeats=2)

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
    capped = ROUTERS[cfg["router"]].layer is CappedMoE
    layer = make_layer(cfg["router"], d, cfg["d_expert"], cfg["experts"],
                       capacity_factor=cfg["capacity_factor"], group="batch",
                       **(dict(max_iter=100) if capped else {}))
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


def ep_measure(cfg, out_dir):
    """One spawn of W processes per world size -> rows of the table (slowest rank's medians)."""
    import torch.multiprocessing as tmp
    rows = []
    for W in cfg.world_sizes:
        if cfg.experts % W:
            raise ValueError(f"--world-sizes: {W} does not divide --experts {cfg.experts}")
        tmp.spawn(_ep_worker, args=(W, os.path.join(out_dir, f"init{W}"), asdict(cfg), out_dir),
                  nprocs=W, join=True)
        ranks = [read_json(os.path.join(out_dir, f"W{W}_rank{r}.json"), "rank result") for r in range(W)]
        s = ranks[0]["slots_per_expert"]
        slots = cfg.experts * s  # G*e*s with G = 1 group per rank
        sent = exchange_bytes(slots, cfg.d_model, W, 4)
        med = lambda key: max(statistics.median(r[key]) for r in ranks)  # noqa: E731
        row = dict(W=W, experts_per_rank=cfg.experts // W, slots_per_expert=s, slots=slots,
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


def ep_main(argv):
    """python -m lab.bench --expert-parallel: measure, print a table, write --json / --txt."""
    defaults = asdict(EPConfig())
    parser = argparse.ArgumentParser(prog="python -m lab.bench --expert-parallel",
                                     description="bytes and time of the expert-parallel exchange",
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--expert-parallel", action="store_true", help="this mode")
    parser.add_argument("--quick", action="store_true", default=False, help="tiny sizes")
    parser.add_argument("--json", metavar="PATH", default=None, help="write results as JSON")
    parser.add_argument("--txt", metavar="PATH", default=None, help="write the printed report")
    for name, value in defaults.items():
        kind, text = EP_FLAGS[name]
        kw = dict(choices=kind) if isinstance(kind, tuple) else dict(type=kind)
        parser.add_argument(f"--{name.replace('_', '-')}", nargs="+" if isinstance(value, list)
                            else None, help=f"{text} (default: {value})", **kw)
    args = parser.parse_args(argv)
    given = {k: getattr(args, k) for k in defaults if hasattr(args, k)}
    cfg = EPConfig(**{**defaults, **(EP_QUICK if args.quick else {}), **given})
    bad = [W for W in cfg.world_sizes if cfg.experts % W]
    if bad:
        parser.error(f"--world-sizes {bad} must divide --experts {cfg.experts}")
    t_start, load = time.time(), os.getloadavg()  # the machine may be shared: say how busy
    import tempfile
    with tempfile.TemporaryDirectory() as out_dir:
        rows = ep_measure(cfg, out_dir)
    k = ecmoe.expert_capacity(cfg.tokens, cfg.experts, cfg.capacity_factor)
    lines = [f"{cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, gloo, 1 thread per "
             f"process, float32; load average before the run {load[0]:.1f} (1 min)",
             f"expert-parallel layer, router={cfg.router}, per rank n={cfg.tokens} tokens (one "
             f"group), e={cfg.experts} experts in total, c={cfg.capacity_factor:g} (k={k}), "
             f"d={cfg.d_model}, f={cfg.d_expert}; forward+backward, slowest rank's median of "
             f"{cfg.repeats}",
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
    lines.append(f"command: {shlex.join(['python', '-m', 'lab.bench', *argv])}  (wall time {wall:.0f} s)")
    print("\n".join(lines))
    result = dict(command=shlex.join(["python", "-m", "lab.bench", *argv]),
                  hardware=dict(processor=cpu_name(), cpu_count=os.cpu_count(),
                                python=platform.python_version()),
                  torch=torch.__version__, backend="gloo", threads_per_process=1, dtype="float32",
                  load_average_before=load,
                  config=asdict(cfg), k=k, rows=rows, paper_scale=dict(
                      assumptions=PAPER_SCALE, lines=paper_scale_lines()), wall_s=wall)
    for path, write in ((args.json, lambda p: write_json(p, result)),
                        (args.txt, lambda p: write_text(p, "\n".join(lines) + "\n"))):
        if path:
            write(path)   # atomic; creates the folder
            print("wrote", path)
    return result


if __name__ == "__main__":
    main()
