"""Tiny T5-like pretraining run: expert choice vs top-1/top-2 token choice on real text.

What it does
    Trains a small byte-level T5-style encoder-decoder with T5 span corruption on the source code
    of the Python standard library (no download), once per (router, seed), and measures how fast
    each router lowers the held-out loss at matched activated compute. It repeats, at toy scale,
    the comparison of Zhou et al. 2022 Fig. 2a / Fig. 4a: EC-CF2 reaches top-2's perplexity in
    less than half the steps; EC-CF1 beats top-1. Whether that holds at this scale is measured and
    stated plainly in results.md, not assumed.

Run
    python train_tiny.py                      # main comparison on CPU: 5 routers x 3 seeds,
                                              # ~8-9 min on 2 idle cores (longer when shared)
    python train_tiny.py --help               # every flag with its default
    python train_tiny.py --dry-run            # two steps of everything (tiny), for CI
    python train_tiny.py --preset gpu         # larger preset (chosen automatically with CUDA)
    python train_tiny.py --resume             # continue an interrupted run (same result)
    python train_tiny.py --data notes.txt     # any UTF-8 text file instead of the stdlib

Data: T5 span corruption (noise density 0.15, mean span 3, deterministic from (seed, step)) of
random byte chunks. Default corpus: the stdlib's *.py files (sorted paths; site-packages and test
directories skipped, ~12 MB), every 20th file held out; sha256 and size go into results.json.

Model (T5.1.1-like, small): byte vocabulary (0 pad, 1 eos, 2..257 bytes, then one sentinel per
noise span), pre-norm RMSNorm, no biases anywhere, T5 bucketed relative position bias (shared per
stack; bidirectional in the encoder, causal in the decoder), untied output head, gated-GELU FFN in
even layers and an `ecmoe.MoE` (plain GELU experts, output `y` added residually) in odd layers of
both stacks ("every other FFN is MoE", Sec. 3). `dense` replaces every MoE by one plain GELU FFN
of width 2*d_ff (= EC-CF2's activated FLOPs).

Routers (matched activated compute; capacity factor c counts expert slots per token):
    top1 (Switch, c=1)  top2 (GShard, c=2)  ec1 / ec2 (expert choice, c=1 / 2)
    cap2 / cap3 (capped expert choice, c=2, at most 2 / 3 experts per token)   dense (see above)
Token-choice runs add 0.01 * Switch load-balancing loss; EC gets none (Sec. 4.1). All MoE runs add
1e-3 * router z-loss (ST-MoE). Decoder MoE layers route in group="position" (tokens sharing a
position across the batch; paper Sec. 6): causal for every router. The encoder routes over the
whole batch (group="batch", the paper's n). `--decoder-router token` is the flaxformer recipe
(EC in the encoder, top-2 token choice in every decoder MoE layer).

Measurement: validation loss every --eval-every steps on fixed held-out batches (the same for
every router and seed, and of the training batch size: routing groups depend on the batch);
steps-to-target = first validation step at which an EC run reaches its matched baseline's final
validation loss (ec1 vs top1; ec2, cap2, cap3 vs top2; same seed), over the baseline's steps.
Determinism: one seed gives bitwise the same CPU loss curve (workers run one thread each); every
router of a seed starts from the same shared weights and sees the same batches. Not promised on
CUDA (scatter-adds there are not bitwise reproducible).

Optimiser: AdamW (beta 0.9/0.95, no weight decay, grad-clip 1.0), linear warmup to the peak LR,
then inverse-square-root decay (the paper's Adafactor schedule shape, Sec. 3).

References: Zhou et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS 2022
(arXiv:2202.09368); Raffel et al. 2020 (T5, span corruption, relative position bias);
Xue et al. 2022 (ByT5); Fedus et al. 2022 (Switch); Lepikhin et al. 2021 (GShard);
Zoph et al. 2022 (ST-MoE z-loss). Design decisions: README ("Decisions where the paper is silent").

Shape legend: B batch, S encoder length, T decoder length, d model width, f d_ff, V vocab, H heads.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import shlex
import sys
import sysconfig
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import ecmoe

# ----------------------------------------------------------------------------------------------
# Configuration: ONE dataclass; argparse is built from it, so `--help` shows every default.


def _f(default, help):
    return field(default=default, metadata={"help": help})


ALL_ROUTERS = ("top1", "top2", "ec1", "ec2", "cap2", "cap3", "dense")


@dataclass
class Config:
    preset: str = _f("auto", "cpu | gpu | auto (gpu when the device is CUDA); gpu overrides the "
                     "model/step defaults below with GPU_PRESET unless a flag is given")
    routers: str = _f("top1,top2,ec1,ec2,dense", "comma list from " + ",".join(ALL_ROUTERS)
                      + ". cap2/cap3 are not in the CPU default: their LP solver makes a CPU step "
                      "2-3.5x slower, which does not fit ~10 min on 2 cores; the GPU preset runs all")
    seeds: str = _f("0,1,2", "comma list of integer seeds (init + data order; paired across "
                    "routers)")
    steps: int = _f(320, "training steps per run")
    eval_every: int = _f(20, "validate every N steps (and at the last step)")
    val_batches: int = _f(4, "fixed held-out batches per validation (same for every router/seed)")
    batch_size: int = _f(32, "sequences per batch (validation uses the same, see evaluate())")
    chunk_bytes: int = _f(96, "raw text bytes per example before span corruption")
    noise_density: float = _f(0.15, "span corruption: fraction of bytes masked")
    mean_span: float = _f(3.0, "span corruption: mean noise span length")
    d_model: int = _f(64, "model width d")
    d_ff: int = _f(128, "FFN / expert hidden width f")
    n_heads: int = _f(4, "attention heads")
    enc_layers: int = _f(4, "encoder layers (odd ones are MoE)")
    dec_layers: int = _f(4, "decoder layers (odd ones are MoE)")
    experts: int = _f(8, "experts per MoE layer e")
    lr: float = _f(3e-3, "peak learning rate")
    warmup: int = _f(30, "linear warmup steps, then inverse-sqrt decay")
    cap_iters: int = _f(100, "Dykstra sweeps of the EC-CAP solver per forward (cap2/cap3). "
                        "Fewer than ecmoe's 1000: at lambda=1e-2, 100 sweeps round to within 0.63% "
                        "of the exact LP, as 1000 do (assets/capped_solver_report.txt), and the "
                        "rounding keeps the cap exact at any sweep count")
    aux_loss_weight: float = _f(0.01, "Switch load-balancing loss weight (token choice only)")
    z_loss_weight: float = _f(1e-3, "router z-loss weight (all MoE routers)")
    decoder_router: str = _f("same", "same | token (flaxformer: top-2 token choice in decoder)")
    decoder_group: str = _f("position", "routing group in the decoder; only 'position' is causal "
                            "for EC (others exist to demonstrate the leak in tests)")
    encoder_group: str = _f("batch", "routing group in the encoder: batch | sequence | position")
    data: str = _f("", "UTF-8 text file to train on; empty = the Python stdlib *.py source")
    out: str = _f("runs/tiny", "results directory")
    resume: bool = _f(False, "continue runs from checkpoints / finished runs in --out")
    workers: int = _f(2, "worker processes (each torch.set_num_threads(--threads)); 1 = in-process")
    threads: int = _f(1, "torch threads per worker")
    device: str = _f("auto", "auto | cpu | cuda")
    dry_run: bool = _f(False, "two steps of every router, tiny model, for tests/CI")
    stop_after: int = _f(0, "simulate an interruption: stop each run (with a checkpoint) at the "
                        "first validation step >= N; 0 = off")


# Larger preset for one CUDA GPU (an H200 was the target). UNTESTED on this project's CPU-only
# machine: sized by estimate to show the effect in ~10 minutes; check `s/step` in results.md.
GPU_PRESET = dict(steps=1500, eval_every=75, val_batches=8, batch_size=64, chunk_bytes=256,
                  d_model=256, d_ff=1024, n_heads=4, enc_layers=6, dec_layers=6, experts=16,
                  lr=2e-3, warmup=150, workers=3, routers=",".join(ALL_ROUTERS))
DRY_RUN = dict(steps=2, eval_every=1, val_batches=1, batch_size=4, chunk_bytes=48, d_model=32,
               d_ff=32, n_heads=2, enc_layers=2, dec_layers=2, experts=4, warmup=1, workers=1,
               seeds="0,1", routers=",".join(ALL_ROUTERS))
# Fields that change the result of a run (a checkpoint made with other values cannot be resumed).
RESULT_FIELDS = ("steps", "eval_every", "val_batches", "batch_size", "chunk_bytes", "noise_density",
                 "mean_span", "d_model", "d_ff", "n_heads", "enc_layers", "dec_layers", "experts",
                 "lr", "warmup", "cap_iters", "aux_loss_weight", "z_loss_weight", "decoder_router",
                 "decoder_group", "encoder_group", "data")


def build_parser(suppress_defaults=False):
    p = argparse.ArgumentParser(
        prog="train_tiny.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
        epilog="GPU preset (untested: this project's machine has no GPU) overrides: "
        + ", ".join(f"{k}={v}" for k, v in GPU_PRESET.items()))
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kw = {} if suppress_defaults else {"default": f.default}
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=f.metadata["help"], **kw)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type]
            p.add_argument(flag, type=typ, help=f.metadata["help"], **kw)
    return p


def parse_config(argv):
    """argv -> (Config, parser). Presets fill only the flags the user did not give."""
    parser = build_parser()
    cfg = Config(**vars(parser.parse_args(argv)))
    given = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.preset == "auto":
        cfg.preset = "gpu" if cfg.device == "cuda" else "cpu"
    overrides = dict(GPU_PRESET) if cfg.preset == "gpu" else {}
    if cfg.dry_run:
        overrides.update(DRY_RUN)
    for k, v in overrides.items():
        if k not in given:
            setattr(cfg, k, v)
    validate(cfg, parser)
    return cfg, parser


def validate(cfg, parser):
    """Clear errors (SystemExit via parser.error) naming the flag."""
    routers = [r.strip() for r in cfg.routers.split(",") if r.strip()]
    bad = [r for r in routers if r not in ALL_ROUTERS]
    if bad or not routers:
        parser.error(f"--routers: unknown router(s) {bad}; choose from {', '.join(ALL_ROUTERS)}")
    try:
        [int(s) for s in cfg.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {cfg.seeds!r}")
    for name in ("steps", "eval_every", "cap_iters", "val_batches", "batch_size", "d_model", "d_ff", "n_heads",
                 "enc_layers", "dec_layers", "experts", "workers", "threads"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.experts < 2:
        parser.error("--experts must be >= 2 (top-2 needs two experts)")
    if cfg.d_model % cfg.n_heads:
        parser.error(f"--d-model ({cfg.d_model}) must be divisible by --n-heads ({cfg.n_heads})")
    if not 0 < cfg.noise_density < 1 or cfg.mean_span < 1:
        parser.error("--noise-density must be in (0, 1) and --mean-span >= 1")
    if cfg.chunk_bytes < 8:
        parser.error("--chunk-bytes must be >= 8")
    if cfg.lr <= 0 or cfg.warmup < 0 or cfg.stop_after < 0:
        parser.error("--lr must be > 0, --warmup and --stop-after >= 0")
    for name, ok in (("preset", ("cpu", "gpu")), ("device", ("cpu", "cuda")),
                     ("decoder_router", ("same", "token")),
                     ("decoder_group", ("batch", "sequence", "position")),
                     ("encoder_group", ("batch", "sequence", "position"))):
        if getattr(cfg, name) not in ok:
            parser.error(f"--{name.replace('_', '-')}: {getattr(cfg, name)!r} not in {ok}")
    _, _, S, T = span_counts(cfg)
    for rt in routers:
        if rt not in ("cap2", "cap3"):
            continue
        _, c, b = ROUTER_SPEC[rt]
        stacks = [("encoder", cfg.encoder_group, S)]
        if cfg.decoder_router == "same":
            stacks.append(("decoder", cfg.decoder_group, T))
        for stack, group, L in stacks:
            n = {"batch": cfg.batch_size * L, "sequence": L, "position": cfg.batch_size}[group]
            k = ecmoe.expert_capacity(n, cfg.experts, c)
            if b * n < k * cfg.experts:
                parser.error(f"--routers {rt}: infeasible in the {stack} ({group} groups of n={n}"
                             f" tokens, k={k}, e={cfg.experts}: need b*n >= k*e); change "
                             "--batch-size or --experts")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")


# ----------------------------------------------------------------------------------------------
# Data: byte vocabulary + T5 span corruption, deterministic from (seed, step).

PAD, EOS, BYTE0 = 0, 1, 2          # token = byte + 2; sentinels follow the 256 bytes
SENTINEL0 = BYTE0 + 256
VAL_SEED = 10_000                  # validation batches are the same for every router and seed


def span_counts(cfg):
    """(n_noise, n_spans, S, T) for one chunk: fixed per config, so batches need no padding."""
    L = cfg.chunk_bytes
    n_noise = min(max(1, round(L * cfg.noise_density)), L - 1)
    n_spans = max(1, min(round(n_noise / cfg.mean_span), L - n_noise))
    return n_noise, n_spans, L - n_noise + n_spans + 1, n_noise + n_spans + 1


def vocab_size(cfg):
    return SENTINEL0 + span_counts(cfg)[1]


def _random_segmentation(n_items, n_segments, rng):
    """Split n_items into n_segments positive lengths uniformly at random (T5's helper)."""
    cuts = np.sort(rng.choice(n_items - 1, n_segments - 1, replace=False) + 1)
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def span_corrupt(chunk, rng, cfg):
    """T5 span corruption of one byte chunk [L] -> inputs [S], targets [T] (token ids).

    Spans alternate keep/noise starting with keep (T5's random_spans_noise_mask); each noise span
    becomes one sentinel in the inputs and `sentinel + span` in the targets; both end with EOS."""
    n_noise, n_spans, _, _ = span_counts(cfg)
    noise = _random_segmentation(n_noise, n_spans, rng)
    keep = _random_segmentation(len(chunk) - n_noise, n_spans, rng)
    tok = chunk.astype(np.int64) + BYTE0
    inputs, targets, pos = [], [], 0
    for i in range(n_spans):
        inputs += [tok[pos:pos + keep[i]], [SENTINEL0 + i]]
        pos += keep[i]
        targets += [[SENTINEL0 + i], tok[pos:pos + noise[i]]]
        pos += noise[i]
    return np.concatenate(inputs + [[EOS]]), np.concatenate(targets + [[EOS]])


def make_batch(text, rng, cfg):
    """Random chunks of `text` (uint8 array) -> enc_ids [B,S], dec_in [B,T], targets [B,T]."""
    offsets = rng.integers(0, len(text) - cfg.chunk_bytes + 1, cfg.batch_size)
    pairs = [span_corrupt(text[o:o + cfg.chunk_bytes], rng, cfg) for o in offsets]
    enc = torch.from_numpy(np.stack([p[0] for p in pairs]))                     # [B, S]
    tgt = torch.from_numpy(np.stack([p[1] for p in pairs]))                     # [B, T]
    dec_in = torch.cat([torch.full_like(tgt[:, :1], PAD), tgt[:, :-1]], dim=1)  # shift right
    return enc, dec_in, tgt


def train_batch(corpus, seed, step, cfg):
    # A pure function of (seed, step): every router of a seed sees the same batches, and resuming
    # needs no data-iterator state beyond the step.
    return make_batch(corpus["train"], np.random.default_rng([seed, step]), cfg)


def val_batches(corpus, cfg):
    return [make_batch(corpus["val"], np.random.default_rng([VAL_SEED, i]), cfg)
            for i in range(cfg.val_batches)]


def stdlib_files():
    """Sorted stdlib *.py files, skipping site-packages and test directories (-> 12 MB of code)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    return root, files


def load_corpus(cfg):
    """-> dict(train=uint8 array, val=uint8 array, info=dict). Raises ValueError on bad --data."""
    sha = hashlib.sha256()
    if not cfg.data:
        root, files = stdlib_files()
        train, val = [], []
        for i, p in enumerate(files):
            b = p.read_bytes()
            sha.update(b)
            # Held out: every 20th file of the sorted list, so val looks like train (the tail of
            # the list is mostly pydoc_data English, which would not).
            (val if i % 20 == 10 else train).append(b)
        info = dict(source=f"python stdlib *.py ({root}; no site-packages/tests)",
                    n_files=len(files), val_files=len(val), split="every 20th file (i % 20 == 10)")
        train, val = b"\n".join(train), b"\n".join(val)
    else:
        try:
            raw = Path(cfg.data).read_bytes()
        except OSError as e:
            raise ValueError(f"--data: cannot read {cfg.data!r}: {e.strerror or e}") from None
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--data: {cfg.data!r} is not UTF-8 text ({e.reason} at byte "
                             f"{e.start})") from None
        if len(raw) < 20 * cfg.chunk_bytes:
            raise ValueError(f"--data: {cfg.data!r} has {len(raw)} bytes; need at least "
                             f"{20 * cfg.chunk_bytes} (20 x --chunk-bytes)" if raw else
                             f"--data: {cfg.data!r} is empty")
        sha.update(raw)
        # Held out: every 20th block of the file (blocks of up to 16 chunks), so val and train
        # are interleaved through the whole text.
        block = min(16 * cfg.chunk_bytes, len(raw) // 20)
        blocks = [raw[i:i + block] for i in range(0, len(raw), block)]
        train = b"".join(b for i, b in enumerate(blocks) if i % 20 != 10)
        val = b"".join(b for i, b in enumerate(blocks) if i % 20 == 10)
        info = dict(source=os.path.abspath(cfg.data), split=f"every 20th block of {block} bytes")
    info.update(total_bytes=len(train) + len(val), train_bytes=len(train), val_bytes=len(val),
                sha256=sha.hexdigest())
    return dict(train=np.frombuffer(train, np.uint8), val=np.frombuffer(val, np.uint8), info=info)


# ----------------------------------------------------------------------------------------------
# Model: small T5.1.1-like encoder-decoder with an ecmoe.MoE in every other FFN.

# router name -> (ecmoe router, capacity factor c, max experts per token b)
ROUTER_SPEC = {"top1": ("top1", 1.0, 2), "top2": ("top2", 2.0, 2),
               "ec1": ("expert_choice", 1.0, 2), "ec2": ("expert_choice", 2.0, 2),
               "cap2": ("capped_expert_choice", 2.0, 2), "cap3": ("capped_expert_choice", 2.0, 3)}
TOKEN_CHOICE = ("top1", "top2")
BASELINE = {"ec1": "top1", "ec2": "top2", "cap2": "top2", "cap3": "top2"}  # matched pairs


def relative_bucket(rel, bidirectional, num_buckets=32, max_distance=128):
    """T5's bucketing of rel = key_pos - query_pos: exact for small |rel|, log-spaced beyond."""
    n, ret = -rel, torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        ret = (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)                                    # future keys share bucket 0
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(n.clamp(min=max_exact).float() / max_exact)
                         / math.log(max_distance / max_exact) * (num_buckets - max_exact)).long()
    return ret + torch.where(n < max_exact, n, large.clamp(max=num_buckets - 1))


class RelativeBias(nn.Module):
    def __init__(self, n_heads, bidirectional):
        super().__init__()
        self.bidirectional = bidirectional
        self.table = nn.Parameter(torch.empty(32, n_heads))  # [buckets, H]

    def forward(self, Tq, Tk):
        pos_q, pos_k = torch.arange(Tq), torch.arange(Tk)
        bucket = relative_bucket(pos_k[None, :] - pos_q[:, None], self.bidirectional)  # [Tq, Tk]
        bias = self.table[bucket.to(self.table.device)].permute(2, 0, 1)[None]  # [1, H, Tq, Tk]
        if not self.bidirectional:                                            # causal mask
            future = torch.ones(Tq, Tk, dtype=torch.bool, device=bias.device).triu(1)
            bias = bias.masked_fill(future, float("-inf"))
        return bias


class Attention(nn.Module):
    """Multi-head attention without biases. T5 folds 1/sqrt(d_head) into its init; we keep
    the usual scaled dot product (SDPA's default) and add the relative bias as the mask."""
    def __init__(self, d, n_heads):
        super().__init__()
        self.H = n_heads
        self.wq, self.wk, self.wv, self.wo = (nn.Parameter(torch.empty(d, d)) for _ in range(4))

    def forward(self, x, kv, bias):
        B, Tq, d = x.shape
        Tk = kv.shape[1]
        q = (x @ self.wq).view(B, Tq, self.H, d // self.H).transpose(1, 2)   # [B, H, Tq, d/H]
        k = (kv @ self.wk).view(B, Tk, self.H, d // self.H).transpose(1, 2)  # [B, H, Tk, d/H]
        v = (kv @ self.wv).view(B, Tk, self.H, d // self.H).transpose(1, 2)  # [B, H, Tk, d/H]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)          # [B, H, Tq, d/H]
        return o.transpose(1, 2).reshape(B, Tq, d) @ self.wo                 # [B, Tq, d]


class GatedGeluFFN(nn.Module):
    """Non-MoE FFN (T5.1.1 / paper Sec. 3): (gelu(x W0) * x W1) W2."""
    def __init__(self, d, f):
        super().__init__()
        self.w_in0, self.w_in1 = nn.Parameter(torch.empty(d, f)), nn.Parameter(torch.empty(d, f))
        self.w_out = nn.Parameter(torch.empty(f, d))

    def forward(self, x):
        return (F.gelu(x @ self.w_in0, approximate="tanh") * (x @ self.w_in1)) @ self.w_out


class DenseFFN(nn.Module):
    """The `dense` baseline for a MoE layer: one plain GELU FFN of width 2f (= EC-CF2's FLOPs)."""
    def __init__(self, d, f):
        super().__init__()
        self.w_in, self.w_out = nn.Parameter(torch.empty(d, f)), nn.Parameter(torch.empty(f, d))

    def forward(self, x):
        return F.gelu(x @ self.w_in, approximate="tanh") @ self.w_out


class Block(nn.Module):
    """Pre-norm T5 block: self-attention, [cross-attention], FFN (gated, dense or MoE)."""
    def __init__(self, cfg, ffn, cross):
        super().__init__()
        d = cfg.d_model
        self.norm_sa, self.sa = nn.RMSNorm(d, eps=1e-6), Attention(d, cfg.n_heads)
        self.norm_ca = nn.RMSNorm(d, eps=1e-6) if cross else None
        self.ca = Attention(d, cfg.n_heads) if cross else None
        self.norm_ff, self.ffn = nn.RMSNorm(d, eps=1e-6), ffn

    def forward(self, x, bias, enc=None):
        h = self.norm_sa(x)
        x = x + self.sa(h, h, bias)
        if self.ca is not None:
            x = x + self.ca(self.norm_ca(x), enc, None)
        out = self.ffn(self.norm_ff(x))
        if isinstance(out, ecmoe.MoEOutput):   # (y, aux_loss, z_loss, stats): add y residually
            return x + out.y, out
        return x + out, None


class TinyT5(nn.Module):
    def __init__(self, cfg, router):
        super().__init__()
        d, V = cfg.d_model, vocab_size(cfg)
        self.moe_names, self.token_choice = [], []

        def ffn(stack, i):
            if i % 2 == 0:
                return GatedGeluFFN(d, cfg.d_ff)
            if router == "dense":
                return DenseFFN(d, 2 * cfg.d_ff)
            name, c, b = ROUTER_SPEC[router]
            if stack == "dec" and cfg.decoder_router == "token" and name not in TOKEN_CHOICE:
                name = "top2"                       # flaxformer: top-2 token choice in decoder
            self.moe_names.append(f"{stack}{i}")
            self.token_choice.append(name in TOKEN_CHOICE)
            group = cfg.encoder_group if stack == "enc" else cfg.decoder_group
            return ecmoe.MoE(d, cfg.d_ff, cfg.experts, router=name, capacity_factor=c,
                             group=group, max_experts_per_token=b, max_iter=cfg.cap_iters)

        self.embed = nn.Parameter(torch.empty(V, d))
        self.enc_bias = RelativeBias(cfg.n_heads, bidirectional=True)
        self.dec_bias = RelativeBias(cfg.n_heads, bidirectional=False)
        self.encoder = nn.ModuleList(Block(cfg, ffn("enc", i), cross=False)
                                     for i in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(Block(cfg, ffn("dec", i), cross=True)
                                     for i in range(cfg.dec_layers))
        self.enc_norm, self.dec_norm = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.lm_head = nn.Parameter(torch.empty(d, V))

    def forward(self, enc_ids, dec_ids):
        """enc_ids [B,S], dec_ids [B,T] -> logits [B,T,V], list of MoEOutput (one per MoE layer)."""
        moe_outs = []
        x = self.embed[enc_ids]                                         # [B, S, d]
        bias = self.enc_bias(enc_ids.shape[1], enc_ids.shape[1])
        for blk in self.encoder:
            x, o = blk(x, bias)
            moe_outs += [o] if o is not None else []
        enc = self.enc_norm(x)
        y = self.embed[dec_ids]                                         # [B, T, d]
        bias = self.dec_bias(dec_ids.shape[1], dec_ids.shape[1])
        for blk in self.decoder:
            y, o = blk(y, bias, enc)
            moe_outs += [o] if o is not None else []
        return self.dec_norm(y) @ self.lm_head, moe_outs                # [B, T, V]


def init_weights(model, seed):
    """Deterministic init per parameter NAME, so every router of a seed starts from the same
    shared (non-MoE) weights: normal(0, fan_in^-1/2) for matrices ([in, out] or [e, in, out]
    layout), normal(0, 1) for the embedding (T5), 0.1 for relative-bias tables, ones for norms."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if p.ndim == 1:
                p.fill_(1.0)
                continue
            std = 1.0 if name == "embed" else 0.1 if "bias.table" in name else p.shape[-2] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ----------------------------------------------------------------------------------------------
# One training run per (router, seed).


def lr_at(step, cfg):
    """Linear warmup to cfg.lr, then inverse-square-root decay (step counts from 1)."""
    s, w = step + 1, max(cfg.warmup, 1)
    return cfg.lr * min(s / w, math.sqrt(w / s))


@torch.no_grad()
def evaluate(model, batches, device):
    # Validation uses the SAME batch size as training: decoder routing groups are positions across
    # the batch (and the encoder group is the batch), so the group size sets the bucket size
    # k = ceil(n*c/e); another batch size would evaluate a differently-routed model.
    losses = []
    for enc, dec_in, tgt in batches:
        logits, _ = model(enc.to(device), dec_in.to(device))
        ce = F.cross_entropy(logits.flatten(0, 1).float(), tgt.to(device).flatten())
        losses.append(ce.item())
    return float(np.mean(losses))


STAT_KEYS = ("unrouted_fraction", "dropped_fraction", "load_max_over_mean", "overflow_fraction")


def _stat_vector(stats):
    """RoutingStats -> [9] float64: experts/token bins 0,1,2,3-4,>4 then the four scalars."""
    bins = torch.as_tensor(stats.experts_per_token, dtype=torch.float64).cpu().reshape(5)
    return torch.cat([bins, torch.tensor([float(getattr(stats, k)) for k in STAT_KEYS],
                                         dtype=torch.float64)])


def _stats_dict(vec):
    v = [float(x) for x in vec]
    return dict(experts_per_token=v[:5], **dict(zip(STAT_KEYS, v[5:])))


def _atomic_write(path, write):
    """write(tmp_path) then os.replace: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=path.suffix + ".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path, obj):
    _atomic_write(path, lambda t: Path(t).write_text(json.dumps(obj, indent=1)))


def run_paths(cfg, router, seed):
    out = Path(cfg.out)
    return out / "ckpt" / f"{router}_s{seed}.pt", out / "runs" / f"{router}_s{seed}.json"


def result_config(cfg):
    return {k: getattr(cfg, k) for k in RESULT_FIELDS}


def train_step(model, opt, batch, step, cfg):
    """One AdamW step on batch (enc [B,S], dec_in [B,T], tgt [B,T]) -> (cross-entropy, MoE outputs).

    loss = CE + z_loss_weight * sum(z_loss) over MoE layers
              + aux_loss_weight * sum(aux_loss) over token-choice MoE layers (EC gets none)."""
    enc, dec_in, tgt = batch
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    logits, outs = model(enc, dec_in)                                  # [B, T, V]
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten())
    loss = ce
    for o, token_choice in zip(outs, model.token_choice):
        loss = loss + cfg.z_loss_weight * o.z_loss
        if token_choice:
            loss = loss + cfg.aux_loss_weight * o.aux_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return ce.item(), outs


CKPT_EVERY_EVALS = 4   # checkpoint every 4th validation (and when --stop-after stops a run)


def run_one(cfg, router, seed, corpus, report=print):
    """Train one (router, seed); returns its result dict (None if stopped by --stop-after)."""
    ckpt_path, done_path = run_paths(cfg, router, seed)
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")     # TF32 matmuls on the GPU preset
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(seed)
        model = TinyT5(cfg, router).to(device)
        init_weights(model, seed)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                                weight_decay=0.0)
        n_moe = len(model.moe_names)
        log = dict(train_loss=[], val_step=[], val_loss=[], val_time=[], stats_window=[],
                   stats_sum=[[0.0] * 9 for _ in range(n_moe)], train_time=0.0, stat_steps=0)
        start = 0
        if cfg.resume and ckpt_path.exists():
            ck = torch.load(ckpt_path, weights_only=True, map_location=device)  # checked in main
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            torch.set_rng_state(ck["rng"])
            start, log = ck["step"], ck["log"]
        vals = val_batches(corpus, cfg)
        win = torch.zeros(n_moe, 9, dtype=torch.float64)
        win_n = 0
        for step in range(start, cfg.steps):
            batch = [t.to(device) for t in train_batch(corpus, seed, step, cfg)]
            t0 = time.perf_counter()
            ce, outs = train_step(model, opt, batch, step, cfg)
            if device.type == "cuda":
                torch.cuda.synchronize()
            log["train_time"] += time.perf_counter() - t0
            log["train_loss"].append(ce)
            if n_moe:
                win += torch.stack([_stat_vector(o.stats) for o in outs])  # [n_moe, 9]
                win_n += 1
            last = step + 1 == cfg.steps
            if (step + 1) % cfg.eval_every == 0 or last:
                log["val_step"].append(step + 1)
                log["val_loss"].append(evaluate(model, vals, device))
                log["val_time"].append(log["train_time"])
                if n_moe:
                    log["stats_window"].append((win / max(win_n, 1)).tolist())
                    total = torch.tensor(log["stats_sum"], dtype=torch.float64) + win
                    log["stats_sum"] = total.tolist()  # plain lists: weights_only checkpoints
                    log["stat_steps"] += win_n
                win.zero_()
                win_n = 0
                report(dict(router=router, seed=seed, step=step + 1, train=log["train_loss"][-1],
                            val=log["val_loss"][-1], s_per_step=log["train_time"] / (step + 1)))
                stop = cfg.stop_after and step + 1 >= cfg.stop_after and not last
                if stop or (step + 1) % (cfg.eval_every * CKPT_EVERY_EVALS) == 0:
                    # checkpoints only at validation steps, where the stats window is empty
                    state = dict(model=model.state_dict(), opt=opt.state_dict(), step=step + 1,
                                 log=log, rng=torch.get_rng_state(), config=result_config(cfg))
                    _atomic_write(ckpt_path, lambda t: torch.save(state, t))
                if stop:
                    return None
            elif step % 10 == 0:
                report(dict(router=router, seed=seed, step=step + 1, train=log["train_loss"][-1]))
        n_params = sum(p.numel() for p in model.parameters())
        tokens = cfg.batch_size * (span_counts(cfg)[2] + span_counts(cfg)[3])
        S = torch.tensor(log["stats_sum"], dtype=torch.float64) / max(log["stat_steps"], 1)
        result = dict(router=router, seed=seed, steps=cfg.steps, n_params=n_params,
                      train_loss=log["train_loss"], val_step=log["val_step"],
                      val_loss=log["val_loss"], val_time=log["val_time"],
                      final_val=log["val_loss"][-1], train_time=log["train_time"],
                      s_per_step=log["train_time"] / cfg.steps,
                      tokens_per_s=tokens * cfg.steps / log["train_time"],
                      moe_layers=model.moe_names,
                      stats={n: _stats_dict(S[i]) for i, n in enumerate(model.moe_names)},
                      stats_over_training={n: [_stats_dict(w[i]) for w in log["stats_window"]]
                                           for i, n in enumerate(model.moe_names)},
                      config=result_config(cfg))
        _write_json(done_path, result)
        if ckpt_path.exists():
            ckpt_path.unlink()
        return result
    finally:
        torch.set_num_threads(old_threads)


# Worker-process plumbing: each worker gets the corpus once and reports progress on a queue.
_WORKER = {}


def _worker_init(q, corpus):
    _WORKER.update(queue=q, corpus=corpus)


def _worker_run(cfg, router, seed):
    return run_one(cfg, router, seed, _WORKER["corpus"], report=_WORKER["queue"].put)


# ----------------------------------------------------------------------------------------------
# Aggregation: steps-to-target, tables, plot, results files.

PAPER_FIG3 = dict(bins=["0", "1", "2", "3-4", ">4"], note="Fig. 3 (100M/64E, EC-CF2): most tokens "
                  "get 1-2 experts, 23% get 3-4, ~3% get >4")


def steps_to_target(run, base):
    """First validation step at which `run` reaches `base`'s final val loss, as a fraction of
    base's steps (resolution: --eval-every), and the same in training wall-clock.
    None = not reached."""
    for step, loss, t in zip(run["val_step"], run["val_loss"], run["val_time"]):
        if loss <= base["final_val"]:
            return dict(step=step, step_ratio=step / base["steps"],
                        time_ratio=t / base["train_time"])
    return None


def _mean_min_max(xs):
    return dict(mean=float(np.mean(xs)), min=float(np.min(xs)), max=float(np.max(xs)))


def summarise(cfg, results, routers, seeds):
    """Per-router summary + paired steps-to-target + a plain verdict."""
    by = {(r["router"], r["seed"]): r for r in results}
    summary = {}
    for rt in routers:
        runs = [by[rt, s] for s in seeds if (rt, s) in by]
        if not runs:
            continue
        layers = runs[0]["moe_layers"]
        stats = {}
        for n in layers:   # mean over seeds of each layer's stats vector [9]
            vecs = [r["stats"][n]["experts_per_token"] + [r["stats"][n][k] for k in STAT_KEYS]
                    for r in runs]
            stats[n] = _stats_dict(np.mean(vecs, axis=0))
        row = dict(final_val=_mean_min_max([r["final_val"] for r in runs]),
                   s_per_step=float(np.mean([r["s_per_step"] for r in runs])),
                   tokens_per_s=float(np.mean([r["tokens_per_s"] for r in runs])),
                   n_params=runs[0]["n_params"], stats=stats, seeds=[r["seed"] for r in runs])
        if rt in BASELINE:
            base = BASELINE[rt]
            pairs = {s: steps_to_target(by[rt, s], by[base, s]) for s in seeds
                     if (rt, s) in by and (base, s) in by}
            row["vs"] = base
            row["steps_to_target"] = {str(s): v for s, v in pairs.items()}
        summary[rt] = row
    return summary


def verdict(summary, seeds):
    """Plain statement of whether the paper's claims reproduce at this scale."""
    lines = []
    spread = max((v["final_val"]["max"] - v["final_val"]["min"] for v in summary.values()),
                 default=0.0)
    for rt, claim in (("ec2", "EC-CF2 reaches top-2's final loss in < 0.5 of its steps"),
                      ("cap2", "EC-CAP2 reaches top-2's final loss in < 0.5 of its steps"),
                      ("ec1", "EC-CF1 reaches top-1's final loss in fewer steps")):
        if rt not in summary or not summary[rt].get("steps_to_target"):
            continue
        st = summary[rt]["steps_to_target"]
        ratios = [v["step_ratio"] if v else None for v in st.values()]
        shown = ", ".join("not reached" if x is None else f"{x:.2f}" for x in ratios)
        limit = 0.5 if rt != "ec1" else 1.0
        ok = all(x is not None and x < limit for x in ratios)
        diff = summary[rt]["final_val"]["mean"] - summary[summary[rt]["vs"]]["final_val"]["mean"]
        lines.append(f"{claim}: {'REPRODUCED' if ok else 'NOT reproduced'} at this scale "
                     f"(step ratio per seed: {shown}; final val loss {rt} - {summary[rt]['vs']} = "
                     f"{diff:+.4f}, largest seed range of any router {spread:.4f}).")
    if len(seeds) < 3:
        lines.append(f"Only {len(seeds)} seed(s): treat every difference as anecdotal.")
    return lines


def plot(path, cfg, results, routers):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rt in routers:
        runs = [r for r in results if r["router"] == rt]
        if not runs:
            continue
        x = runs[0]["val_step"]
        Y = np.array([r["val_loss"] for r in runs])                    # [seeds, evals]
        ax.plot(x, Y.mean(0), label=f"{rt} ({len(runs)} seeds)")
        ax.fill_between(x, Y.min(0), Y.max(0), alpha=0.2)
    ax.set_xlabel("training step")
    for base in ("top1", "top2"):
        if base in routers and any(r["router"] == base for r in results):
            target = np.mean([r["final_val"] for r in results if r["router"] == base])
            ax.axhline(target, ls=":", lw=1, color="gray")
            ax.annotate(f"{base} final", (0, target), xycoords=("axes fraction", "data"),
                        fontsize=8, color="gray", va="bottom")
    ax.set_ylabel("validation loss (nats / target token)")
    ax.set_title(f"tiny T5, {cfg.experts} experts, d={cfg.d_model}: mean, min-max over seeds")
    lo = min(min(r["val_loss"]) for r in results)
    ax.set_ylim(lo - 0.05, lo + 0.8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda t: fig.savefig(t, dpi=120, format="png"))
    plt.close(fig)


def _fmt_target(row):
    if "steps_to_target" not in row:
        return "", ""
    st = row["steps_to_target"].values()
    steps = " / ".join("not reached" if v is None else f"{v['step_ratio']:.2f}" for v in st)
    wall = " / ".join("not reached" if v is None else f"{v['time_ratio']:.2f}" for v in st)
    return f"{steps} (vs {row['vs']})", wall


def markdown(res):
    cfg, s = res["config"], res["summary"]
    out = [f"Command: `{res['command']}`  ",
           f"Hardware: {res['hardware']['summary']}; wall time {res['wall_time_s']:.0f} s; "
           f"seeds {cfg['seeds']}; {cfg['steps']} steps of batch {cfg['batch_size']}  ",
           f"Corpus: {res['corpus']['source']}, {res['corpus']['total_bytes']:,} bytes, sha256 "
           f"{res['corpus']['sha256'][:16]}...  ",
           f"Model: T5-like, d={cfg['d_model']}, d_ff={cfg['d_ff']}, {cfg['enc_layers']}+"
           f"{cfg['dec_layers']} layers (every other FFN MoE), {cfg['experts']} experts; "
           f"{res['span_corruption']['enc_len']} encoder + {res['span_corruption']['dec_len']} "
           f"decoder tokens per sequence; decoder router: {cfg['decoder_router']}  ", "",
           "| router | final val loss mean (min-max) | steps to baseline's final loss, per seed | "
           "same in wall-clock | s/step | tokens/s | experts/token 0/1/2/3-4/>4 (mean of MoE "
           "layers) | TC drops | load max/mean |",
           "|---|---|---|---|---|---|---|---|---|"]
    for rt, row in s.items():
        fv, (steps, wall) = row["final_val"], _fmt_target(row)
        st = list(row["stats"].values())
        if st:
            ept = np.mean([x["experts_per_token"] for x in st], 0)
            ept = "/".join(f"{100 * v:.0f}%" for v in ept)
            drops = f"{100 * np.mean([x['dropped_fraction'] for x in st]):.1f}%"
            load = f"{np.mean([x['load_max_over_mean'] for x in st]):.2f}"
        else:
            ept = drops = load = "-"
        out.append(f"| {rt} | {fv['mean']:.4f} ({fv['min']:.4f}-{fv['max']:.4f}) | {steps} | "
                   f"{wall} | {row['s_per_step']:.3f} | {row['tokens_per_s']:.0f} | {ept} | "
                   f"{drops} | {load} |")
    out += ["", "Routing statistics per MoE layer, mean over training steps and seeds "
            "(experts/token bins as in the paper's Fig. 3):", "",
            "| router | layer | experts/token 0 / 1 / 2 / 3-4 / >4 | unrouted | TC dropped | "
            "load max/mean | overflow |", "|---|---|---|---|---|---|---|"]
    for rt, row in s.items():
        for layer, x in row["stats"].items():
            ept = " / ".join(f"{100 * v:.1f}%" for v in x["experts_per_token"])
            out.append(f"| {rt} | {layer} | {ept} | {100 * x['unrouted_fraction']:.1f}% | "
                       f"{100 * x['dropped_fraction']:.1f}% | {x['load_max_over_mean']:.2f} | "
                       f"{100 * x['overflow_fraction']:.1f}% |")
    out += ["", "Paper: " + PAPER_FIG3["note"] + "; EC-CF2 reaches top-2's perplexity in < 0.5 of "
            "the steps (Fig. 2a).", ""] + [f"- {line}" for line in res["verdict"]]
    out += ["", "Step ratios have the resolution of --eval-every; wall-clock ratios are training "
            "time only, measured while other runs shared the machine."]
    return "\n".join(out) + "\n"


def hardware(cfg):
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    hw = dict(platform=platform.platform(), processor=cpu,
              cpu_count=os.cpu_count(), device=cfg.device, workers=cfg.workers,
              threads_per_worker=cfg.threads)
    if cfg.device == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(0)
    hw["summary"] = (hw.get("gpu") or f"{hw['processor']}, {hw['cpu_count']} CPU cores") + \
        f", {cfg.workers} worker(s) x {cfg.threads} thread(s)"
    return hw


# ----------------------------------------------------------------------------------------------
# Progress display: rich live bars on a terminal, plain log lines otherwise.


class Display:
    def __init__(self, jobs, steps):
        self.live = sys.stdout.isatty()
        self.steps = steps
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
            self.progress = Progress(TextColumn("{task.description:>10}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
            self.tasks = {j: self.progress.add_task(f"{j[0]} s{j[1]}", total=steps, info="")
                          for j in jobs}

    def __enter__(self):
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.progress.stop()

    def __call__(self, msg):
        job = (msg["router"], msg["seed"])
        if self.live:
            info = f"train {msg['train']:.3f}"
            if "val" in msg:
                info += f"  val {msg['val']:.3f}  {msg['s_per_step']:.3f} s/step"
            self.progress.update(self.tasks[job], completed=msg["step"], info=info)
        elif "val" in msg:
            print(f"[{job[0]:>5} s{job[1]}] step {msg['step']:>5}/{self.steps} train "
                  f"{msg['train']:.4f} val {msg['val']:.4f} ({msg['s_per_step']:.3f} s/step)",
                  flush=True)


def print_table(res):
    from rich.console import Console
    from rich.table import Table
    t = Table(title="expert choice vs token choice (tiny T5, validation loss)")
    for col in ("router", "final val (mean)", "min-max", "steps to target", "wall ratio",
                "s/step", "tokens/s"):
        t.add_column(col)
    for rt, row in res["summary"].items():
        steps, wall = _fmt_target(row)
        fv = row["final_val"]
        t.add_row(rt, f"{fv['mean']:.4f}", f"{fv['min']:.4f}-{fv['max']:.4f}", steps, wall,
                  f"{row['s_per_step']:.3f}", f"{row['tokens_per_s']:.0f}")
    console = Console()
    console.print(t)
    for line in res["verdict"]:
        console.print(line)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    t_start = time.time()
    cfg, parser = parse_config(argv)
    routers = [r.strip() for r in cfg.routers.split(",") if r.strip()]
    seeds = [int(s) for s in cfg.seeds.split(",")]
    try:
        corpus = load_corpus(cfg)
    except ValueError as e:
        parser.error(str(e))
    out = Path(cfg.out)
    jobs = [(r, s) for s in seeds for r in routers]       # seed-major: early results are paired
    results, todo = [], []
    for r, s in jobs:
        ckpt, done = run_paths(cfg, r, s)
        if cfg.resume and (done.exists() or ckpt.exists()):
            prev = json.loads(done.read_text()) if done.exists() else \
                torch.load(ckpt, weights_only=True, map_location="cpu")
            diff = [k for k in RESULT_FIELDS if prev["config"].get(k) != getattr(cfg, k)]
            if diff:
                parser.error(f"--resume: {done if done.exists() else ckpt} was made with "
                             f"different {diff}; use another --out or drop --resume")
            if done.exists():
                results.append(prev)
                continue
        if not cfg.resume:
            for p in (ckpt, done):
                p.unlink(missing_ok=True)
        todo.append((r, s))
    print(f"train_tiny: {len(jobs)} runs ({len(results)} already done), routers {routers}, seeds "
          f"{seeds}, {cfg.steps} steps, preset {cfg.preset}, device {cfg.device}, {cfg.workers} "
          f"worker(s); corpus {corpus['info']['total_bytes']:,} bytes", flush=True)
    with Display(jobs, cfg.steps) as show:
        if cfg.workers == 1 or len(todo) <= 1:
            results += [run_one(cfg, r, s, corpus, report=show) for r, s in todo]
        else:
            ctx = mp.get_context("spawn")                  # no fork of a torch-initialised parent
            q = ctx.Queue()
            with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(q, corpus)) as pool:
                futures = [pool.submit(_worker_run, cfg, r, s) for r, s in todo]
                while not all(f.done() for f in futures) or not q.empty():
                    try:
                        show(q.get(timeout=0.2))
                    except queue_mod.Empty:
                        pass
                results += [f.result() for f in futures]
    if any(r is None for r in results):
        print(f"stopped at step {cfg.stop_after} (--stop-after); continue with --resume")
        return None
    summary = summarise(cfg, results, routers, seeds)
    res = dict(command=shlex.join(["python", "train_tiny.py", *argv]), config=dataclasses.asdict(cfg),
               routers=routers, seeds=seeds, corpus=corpus["info"], summary=summary,
               verdict=verdict(summary, seeds), paper_fig3=PAPER_FIG3,
               hardware=hardware(cfg), wall_time_s=time.time() - t_start,  # this invocation
               train_time_sum_s=sum(r["train_time"] for r in results),  # all runs, incl. resumed
               versions=dict(python=platform.python_version(), torch=torch.__version__,
                             numpy=np.__version__, ecmoe_sha256=hashlib.sha256(
                                 Path(ecmoe.__file__).read_bytes()).hexdigest()),
               span_corruption=dict(zip(("n_noise", "n_spans", "enc_len", "dec_len"),
                                        span_counts(cfg))),
               runs=sorted(results, key=lambda r: (r["router"], r["seed"])))
    _write_json(out / "results.json", res)
    _atomic_write(out / "results.md", lambda t: Path(t).write_text(markdown(res)))
    plot(out / "val_loss.png", cfg, results, routers)
    print_table(res)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'val_loss.png'}")
    return res


if __name__ == "__main__":
    main()
