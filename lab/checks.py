"""Checks of train_tiny's flags: a clear error (parser.error, exit status 2) naming the flag,
instead of a traceback minutes into a run.

    check_config(cfg, parser, groups)   every flag; groups = train_tiny.routing_groups
    check_world(cfg, parser, W)         torchrun with W processes: what must divide by W
"""
import math

from ecmoe import GROUPS, expert_capacity
from moe.capped import CappedMoE
from moe.routers import parse_routers, resolve

POSITIVE = ("steps", "eval_every", "cap_iters", "val_batches", "batch_size", "d_model", "d_ff",
            "n_heads", "enc_layers", "dec_layers", "experts", "workers", "threads")
CHOICES = dict(arch=("lm", "t5"), preset=("cpu", "gpu"), device=("cpu", "cuda"),
               decoder_router=("same", "token"), decoder_group=GROUPS, encoder_group=GROUPS)


def check_config(cfg, parser, groups):
    """Every flag of a train_tiny Config (presets and the schedule already filled in); groups(cfg):
    [(stack, group, n tokens per routing group)] of its MoE layers (capped EC's feasibility),
    called once the flags it reads are checked."""
    if cfg.capacity_factor is not None and not 0 < cfg.capacity_factor < math.inf:
        parser.error(f"--capacity-factor must be > 0, got {cfg.capacity_factor}")
    try:
        routers = parse_routers(cfg.routers, cfg.capacity_factor)     # their labels
    except ValueError as e:
        parser.error(f"--routers: {e}")
    try:
        seeds = [int(s) for s in cfg.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {cfg.seeds!r}")
    if len(set(seeds)) < len(seeds):
        parser.error(f"--seeds: {cfg.seeds!r} names a seed more than once")
    for name in POSITIVE:
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name, ok in CHOICES.items():
        if getattr(cfg, name) not in ok:
            parser.error(f"--{name.replace('_', '-')}: {getattr(cfg, name)!r} not in {ok}")
    if cfg.experts < 2:
        parser.error("--experts must be >= 2 (top-2 needs two experts)")
    if cfg.d_model % cfg.n_heads:
        parser.error(f"--d-model ({cfg.d_model}) must be divisible by --n-heads ({cfg.n_heads})")
    if not 0 < cfg.noise_density < 1 or cfg.mean_span < 1:
        parser.error("--noise-density must be in (0, 1) and --mean-span >= 1")
    if cfg.chunk_bytes < 8:
        parser.error("--chunk-bytes must be >= 8")
    if not 0 <= cfg.bias_rate < math.inf:
        parser.error(f"--bias-rate must be a finite number >= 0, got {cfg.bias_rate}")
    if cfg.lr <= 0 or min(cfg.warmup, cfg.decay_start, cfg.cooldown, cfg.stop_after) < 0:
        parser.error("--lr must be > 0, --warmup, --decay-start, --cooldown and --stop-after >= 0")
    if cfg.warmup + cfg.cooldown > cfg.steps:
        parser.error(f"--warmup {cfg.warmup} + --cooldown {cfg.cooldown} cover more than --steps "
                     f"{cfg.steps}: the run would never train at --lr (leave them out to scale "
                     "them with --steps)")
    if cfg.group_size and (cfg.group_size < 0 or cfg.batch_size % cfg.group_size
                           or cfg.decoder_group != "position"):
        parser.error(f"--group-size {cfg.group_size}: must divide --batch-size "
                     f"({cfg.batch_size}) and needs --decoder-group position (0 = off)")
    if cfg.decoder_router == "token" and cfg.arch != "t5":
        parser.error("--decoder-router token is a t5 option (--arch t5): the lm is all decoder, "
                     "so it would train top-2 token choice under every router's name")
    for rt in routers:
        r = resolve(rt, cfg.capacity_factor)
        if r.layer is not CappedMoE:
            continue
        b, c = r.options["max_experts_per_token"], r.capacity_factor
        if c > b:
            parser.error(f"--capacity-factor {c}: {rt} needs c <= {b} (its experts per token)")
        for stack, group, n in groups(cfg):
            k = expert_capacity(n, cfg.experts, c)
            if b * n < k * cfg.experts:
                parser.error(f"--routers {rt}: infeasible in the {stack} ({group} groups of n={n}"
                             f" tokens, k={k}, e={cfg.experts}: need b*n >= k*e); change "
                             "--batch-size, --group-size or --experts")
    if cfg.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device available")


def check_world(cfg, parser, W):
    """torchrun with W processes: each takes B/W sequences of the global batch and e/W experts
    of every MoE layer, and its position groups of --group-size sequences come from its rows."""
    B = cfg.batch_size
    if B % W or cfg.experts % W or (cfg.group_size and (B // W) % cfg.group_size):
        parser.error(f"torchrun with {W} processes: --batch-size ({B}) and --experts "
                     f"({cfg.experts}) must be divisible by {W}, and --group-size "
                     f"({cfg.group_size}) must divide the per-process batch B/W = {B / W:g}")
