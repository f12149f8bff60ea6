"""lab/bench.py: how fast is ecmoe.MoE compared with a dense FFN of the same activated FLOPs?

Forward + backward wall time of one layer on n tokens (one routing group), for
    dense    the trainer's dense FFN (lab.model.DenseFFN: GELU, d -> c*f -> d): the same FLOPs as
             EC-CFc (each token gets c experts of width f on average), the yardstick every ratio
             is taken against (always timed);
    ec       expert choice of the router table (moe/routers.py: ecmoe.MoE; gather -> batched
             matmul -> scatter-add) at the case's c, under the name whose c that is: "ec1" at
             c = 1, "ec2" at c = 2 (another c: "ec2@cC");
    top1/2   routers "top1" / "top2" (moe.token_choice.TokenChoiceMoE) through the same dispatch
             path, same slot count (the case's c): "top2@c1" is top-2 at c = 1;
    dropless router "top2_dropless" (TokenChoiceMoE, dropless): every expert padded to the busiest
             expert's demand (one host sync per forward); its compute does not depend on c;
    grouped  the same routing and weights through moe.grouped.GroupedDroplessMoE: exactly n*2 rows
             sorted by expert, one torch._grouped_mm per FFN matmul, no padding, no host sync;
    et       expert threshold (moe.threshold.ExpertThresholdMoE, a training step: routed by the
             learned thresholds, grouped experts), "et1" / "et2" as for ec: what Expert Threshold
             routing costs against expert choice ("ec");
    lossfree router "top2_lossfree" (moe.token_choice.LossFreeMoE: padded like "dropless") and the
             same weights through moe.grouped.GroupedLossFreeMoE ("lossfree_grouped": n*2 rows);
    threshold  expert choice with eval_routing="threshold" (thresholds learned on another batch),
             eval forward only under torch.no_grad: padded (ecmoe.MoE) vs grouped (moe.grouped.
             GroupedMoE), printed under the row, not against dense;
    onehot   expert choice the way the Google references write it: one-hot dispatch and combine
             tensors [n, e, k] and einsums (O(c n^2 d) work and O(c n^2) memory), for contrast;
    hf       transformers' SwitchTransformersSparseMLP at matched sizes (only when installed).
With --compile, dense/ec/top1/top2 are also timed after torch.compile (names end in _compiled).
Each row records the router label every method timed (row["routers"]; moe.routers.resolve).
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
The expert-parallel benchmark (bytes and time of the all-to-all, W = 1, 2, 4) is lab/bench_parallel.py.
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
from lab.files import write_json
from lab.model import DenseFFN
from lab.runner import cpu_model
from moe.grouped import GroupedDroplessMoE, GroupedLossFreeMoE, GroupedMoE
from moe.routers import resolve

# The MoE methods and the router-table names whose layers they time (moe/routers.py), at each
# case's c: the name whose table c is the case's (ec1 at c = 1, ec2 at c = 2), else the last name
# with the c in its label (top2 at c = 1 is "top2@c1"; ec at c = 1.5 is "ec2@c1.5"): router_label.
ROUTER_OF = dict(ec=("ec1", "ec2"), top1=("top1",), top2=("top2",), et=("et1", "et2"))
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


def router_label(method, c):
    """The router label `method` times at capacity factor c (ROUTER_OF): ('ec', 1) -> 'ec1',
    ('ec', 2) -> 'ec2', ('top2', 1) -> 'top2@c1'; also 'top2_dropless@c1' for method
    'top2_dropless' (a router name is its own family)."""
    names = ROUTER_OF.get(method, (method,))
    return next((name for name in names if resolve(name, c).label == name),
                resolve(names[-1], c).label)


def router_layers(d, f, e, c, device):
    """{method: the layer of router_label(method, c)} for every method of ROUTER_OF, in its
    order, one routing group ("batch")."""
    return {m: resolve(router_label(m, c)).build(d, f, e, group="batch").to(device)
            for m in ROUTER_OF}


def dense_ffn(d, width):
    """lab.model.DenseFFN (the trainer's dense FFN, GELU d -> width -> d), its weights drawn
    N(0, 1/fan-in): w_in, then w_out."""
    ffn = DenseFFN(d, width)
    with torch.no_grad():
        ffn.w_in.copy_(torch.randn(d, width) / d ** 0.5)
        ffn.w_out.copy_(torch.randn(width, d) / width ** 0.5)
    return ffn


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
    row = dict(n=n, e=e, c=c, k=k, routers={})
    x = torch.randn(1, n, d, device=device, requires_grad=True)  # one routing group of n tokens
    moe = router_layers(d, f, e, c, device)  # all built (the same seed draws in every case)
    methods = {"dense": dense_ffn(d, round(c * f)).to(device)}
    for name in ROUTER_OF:
        if name in cfg.methods:
            methods[name] = moe[name]
            row["routers"][name] = router_label(name, c)
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
        methods.update(lossfree_methods(cfg, d, f, e, c, row))
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
    padded = resolve(router, c).build(d, f, e, group="batch").to(cfg.device)
    grouped = grouped_class(d, f, e, top_k=2, capacity_factor=c, group="batch").to(cfg.device)
    grouped.load_state_dict(padded.state_dict())
    return padded, grouped


def dropless_methods(cfg, d, f, e, c, x, row):
    """Dropless top-2 padded ("top2_dropless" of the router table) and grouped (GroupedDroplessMoE,
    the same weights); row gets the padded layout's slots over the n*2 rows the grouped one computes."""
    padded, grouped = padded_and_grouped("top2_dropless", GroupedDroplessMoE, cfg, d, f, e, c)
    row["routers"].update({m: router_label("top2_dropless", c) for m in ("dropless", "grouped")
                           if m in cfg.methods})
    with torch.no_grad():
        route = padded.route(ecmoe.router_probs(padded.group_tokens(x), padded.w_router))
    row["dropless_padding"] = route.gates[0].numel() / (2 * x.shape[1])  # e*s / (n*2)
    return {name: layer for name, layer in (("dropless", padded), ("grouped", grouped)) if name in cfg.methods}


def lossfree_methods(cfg, d, f, e, c, row):
    """Loss-free top-2 padded ("top2_lossfree" of the router table) and grouped (GroupedLossFreeMoE).
    Training steps: the loads count, update_bias is not called."""
    padded, grouped = padded_and_grouped("top2_lossfree", GroupedLossFreeMoE, cfg, d, f, e, c)
    row["routers"].update(lossfree=router_label("top2_lossfree", c),
                          lossfree_grouped=router_label("top2_lossfree", c))
    return dict(lossfree=padded, lossfree_grouped=grouped)


def threshold_methods(cfg, d, f, e, c, x, row):
    """Expert choice in eval with eval_routing="threshold", padded (ecmoe.MoE) and grouped
    (GroupedMoE, the same weights), thresholds learned from one training forward on another batch;
    row gets the busiest expert's load over the mean load (1 = no padding to save)."""
    row["routers"].update(thr_padded=router_label("ec", c), thr_grouped=router_label("ec", c))
    padded = resolve(router_label("ec", c)).build(d, f, e, group="batch",
                                                  eval_routing="threshold").to(cfg.device)
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
    if "--expert-parallel" in argv:
        parser.error("--expert-parallel is its own tool now: python -m lab.bench_parallel --help")
    args = parser.parse_args(argv)
    given = {name: getattr(args, name) for name in asdict(BenchConfig()) if hasattr(args, name)}
    cfg = BenchConfig(**{**asdict(BenchConfig()), **(QUICK if args.quick else {}), **given})
    if cfg.device == "cuda" and not torch.cuda.is_available():
        reason = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no GPU"
        parser.error(f"--device cuda: no CUDA device available ({reason}); use --device cpu")
    return cfg, args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
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
    device_name = torch.cuda.get_device_name(0) if cfg.device == "cuda" else cpu_model()
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
                labels = ", ".join(f"{m}={label}" for m, label in row["routers"].items())
                print(f"{'':>15} routers: {labels}")
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
                      machine=platform.machine(), processor=cpu_model(), cpu_count=os.cpu_count(),
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


if __name__ == "__main__":
    main()
