"""Tiny pretraining run: expert choice vs top-1/top-2 token choice on real text.

What it does
    Trains a small byte-level language model on the source code of the Python standard library
    (no download), once per (router, seed), and measures how fast each router lowers the
    held-out loss at matched activated compute. It repeats, at toy scale, the comparison of
    Zhou et al. 2022 Fig. 2a / Fig. 4a (EC-CF2 reaches top-2's perplexity in less than half the
    steps; EC-CF1 beats top-1), with the controls that say whether the run could see a
    difference at all. The statistics, tables and plots live in compare.py.

Run
    python train_tiny.py                      # default comparison on CPU (~8 min on 2 cores)
    python train_tiny.py --help               # every flag with its default
    python train_tiny.py --dry-run            # two steps of every router, tiny, for CI
    python train_tiny.py --arch t5            # the T5 encoder-decoder with span corruption
    python train_tiny.py --preset gpu         # larger preset (chosen automatically with CUDA)
    python train_tiny.py --resume             # continue an interrupted run (same result)
    python train_tiny.py --data notes.txt     # any UTF-8 text file instead of the stdlib
    python compare.py runs/tiny               # statistics of a finished (or partial) run
    torchrun --nproc_per_node=2 train_tiny.py --group-size 16   # data + expert parallel
                                              # over 2 processes (section Distributed)

Two architectures (--arch), built from the same T5.1.1-style blocks: pre-norm RMSNorm, no biases,
T5 bucketed relative position bias, untied output head, gated-GELU FFN in even layers and an
`ecmoe.MoE` (plain GELU experts, output added residually) in odd layers ("every other FFN is
MoE", paper Sec. 3). `dense` replaces every MoE by one plain GELU FFN of width 2*d_ff
(= the activated FLOPs of top-2 and EC-CF2).
    lm   decoder-only causal byte LM, loss on every position (the paper's own pretraining is a
         decoder-only LM, GLaM). The default: it is the setting where the positive control
         passes (README "Results").
    t5   encoder-decoder with T5 span corruption (noise density 0.15, mean span 3): the decoder
         sees ~15% of the bytes as targets. The encoder routes over the whole batch.

Routers (matched activated compute; capacity factor c counts expert slots per token):
    top1 (Switch, c=1)   top2 (GShard, c=2, gates renormalised)   ec1 / ec2 (expert choice)
    top2_dropless (no capacity limit: nothing dropped)   top2_gshard (second expert dispatched
    with probability min(1, g2/0.2), Mesh-TensorFlow's default)   cap2 / cap3 (capped expert
    choice, c=2, at most 2 / 3 experts per token)   dense (see above)
    ROUTER_aa (e.g. top2_aa): the null control. The same router and the same initial weights as
    ROUTER, trained on another data order; compare.py must find no difference.
Token-choice runs add 0.01 * Switch load-balancing loss; EC gets none (Sec. 4.1). All MoE runs add
1e-3 * router z-loss (ST-MoE). MoE layers of the LM and the T5 decoder route in
group="position" (tokens sharing a position across the batch, paper Sec. 6): causal for every
router. --group-size g splits those groups into groups of g sequences (same batch, same data:
only the routing group changes).

Pairing: every router of a seed starts from the same shared weights (init by parameter name) and
sees the same batches (a pure function of (seed, step)); validation batches are fixed and the
same for every run. One seed gives bitwise the same CPU loss curve (workers run one thread each).
Not promised on CUDA (scatter-adds there are not bitwise reproducible).

Optimiser: AdamW (beta 0.9/0.95, no weight decay, grad-clip 1.0), linear warmup to the peak LR,
then inverse-square-root decay (the paper's Adafactor schedule shape, Sec. 3).

References: Zhou et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS 2022
(arXiv:2202.09368); Raffel et al. 2020 (T5, span corruption, relative position bias);
Xue et al. 2022 (ByT5); Fedus et al. 2022 (Switch); Lepikhin et al. 2021 (GShard);
Zoph et al. 2022 (ST-MoE z-loss). Design decisions: README ("Decisions where the paper is silent").

Shape legend: B batch, S encoder length, T decoder / LM length, d model width, f d_ff, V vocab,
H heads, g routing-group size.
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

import compare
import ecmoe

# ----------------------------------------------------------------------------------------------
# Configuration: ONE dataclass; argparse is built from it, so `--help` shows every default.


def _f(default, help):
    return field(default=default, metadata={"help": help})


ARCHS = ("lm", "t5")
ALL_ROUTERS = ("top1", "top2", "ec1", "ec2", "top2_dropless", "top2_gshard", "cap2", "cap3",
               "dense")
AA = "_aa"            # ROUTER + AA: the A/A null control (same init, another data order)
AA_DATA_SEED = 7_919  # data seed offset of an A/A run


@dataclass
class Config:
    arch: str = _f("lm", "lm (decoder-only byte LM) | t5 (encoder-decoder, span corruption); "
                   "t5 fills the flags you did not give from T5_PRESET")
    preset: str = _f("auto", "cpu | gpu | auto (gpu when the device is CUDA); gpu overrides the "
                     "model/step defaults below with GPU_PRESET unless a flag is given")
    routers: str = _f("top2,ec2,dense,top2_aa",
                      "comma list from " + ",".join(ALL_ROUTERS) + ", and ROUTER_aa (null "
                      "control). cap2/cap3 run a Dykstra solver per forward: 2-3.5x slower on CPU")
    seeds: str = _f("0,1,2", "comma list of integer seeds (init + data order; paired across "
                    "routers)")
    steps: int = _f(600, "training steps per run")
    eval_every: int = _f(50, "validate every N steps (and at the last step)")
    val_batches: int = _f(16, "fixed held-out batches per validation (same for every run)")
    batch_size: int = _f(32, "sequences per batch (validation uses the same, see evaluate())")
    chunk_bytes: int = _f(64, "bytes per example (lm: the sequence; t5: before corruption)")
    noise_density: float = _f(0.15, "t5 span corruption: fraction of bytes masked")
    mean_span: float = _f(3.0, "t5 span corruption: mean noise span length")
    d_model: int = _f(64, "model width d")
    d_ff: int = _f(128, "FFN / expert hidden width f")
    n_heads: int = _f(4, "attention heads")
    enc_layers: int = _f(4, "t5 encoder layers (odd ones are MoE); unused by lm")
    dec_layers: int = _f(4, "decoder layers: the whole model in lm (odd ones are MoE)")
    experts: int = _f(16, "experts per MoE layer e")
    group_size: int = _f(0, "routing group of the lm / t5-decoder MoE layers: position groups of "
                         "this many sequences (must divide --batch-size); 0 = the whole batch")
    lr: float = _f(3e-3, "peak learning rate")
    warmup: int = _f(50, "linear warmup steps to --lr")
    decay_start: int = _f(300, "constant --lr until this step, then inverse-square-root decay "
                          "(the paper's schedule shape); 0 = decay right after the warmup")
    cooldown: int = _f(150, "linear decay of the learning rate to 0 over the last N steps (the end "
                       "of a warmup-stable-decay schedule); 0 = off")
    cap_iters: int = _f(100, "Dykstra sweeps of the EC-CAP solver per forward (cap2/cap3); "
                        "fewer than ecmoe's 1000: see assets/capped_solver_report.txt")
    aux_loss_weight: float = _f(0.01, "Switch load-balancing loss weight (token choice only)")
    z_loss_weight: float = _f(1e-3, "router z-loss weight (all MoE routers)")
    decoder_router: str = _f("same", "t5: same | token (flaxformer: top-2 token choice in the "
                             "decoder)")
    decoder_group: str = _f("position", "routing group in the lm / t5 decoder; only 'position' "
                            "is causal for EC ('batch' is the paper's literal n: it leaks the "
                            "future, shown for comparison only)")
    encoder_group: str = _f("batch", "t5: routing group in the encoder: batch | sequence | "
                            "position")
    data: str = _f("", "UTF-8 text file to train on; empty = the Python stdlib *.py source")
    out: str = _f("runs/tiny", "results directory")
    resume: bool = _f(False, "continue runs from checkpoints / finished runs in --out")
    workers: int = _f(2, "worker processes (each torch.set_num_threads(--threads)); 1 = in-process")
    threads: int = _f(1, "torch threads per worker")
    device: str = _f("auto", "auto | cpu | cuda")
    dry_run: bool = _f(False, "two steps of every router, tiny model, into runs/dry_run, for "
                       "tests/CI")
    stop_after: int = _f(0, "simulate an interruption: stop each run (with a checkpoint) at the "
                        "first validation step >= N; 0 = off")
    sample: str = _f("", "instead of training: samples (temperature 0.7, seeded) at batch size 1 from every router "
                     "(first seed) of the finished run directory SAMPLE, added to its "
                     "results.json / results.md (expert choice samples with threshold routing)")


# The T5 setting of the first release (its results: assets/t5_*). Used for the flags not given.
T5_PRESET = dict(steps=320, eval_every=20, chunk_bytes=96, experts=8, warmup=30, decay_start=0,
                 cooldown=0)
# Larger preset for one CUDA GPU. Sized from s/step measured by gpu_check.py (assets/gpu/) where
# a report exists; check `s/step` in results.md.
GPU_PRESET = dict(steps=1500, eval_every=75, val_batches=16, batch_size=64, chunk_bytes=256,
                  d_model=256, d_ff=1024, n_heads=4, enc_layers=6, dec_layers=6, experts=16,
                  lr=2e-3, warmup=150, decay_start=750, cooldown=300, workers=1,
                  routers=",".join(r for r in ALL_ROUTERS) + ",top2_aa")
DRY_RUN = dict(steps=2, eval_every=1, val_batches=2, batch_size=4, chunk_bytes=48, d_model=32,
               d_ff=32, n_heads=2, enc_layers=2, dec_layers=2, experts=4, warmup=1, decay_start=0,
               cooldown=0, workers=1,
               seeds="0,1", routers=",".join(ALL_ROUTERS) + ",top2_aa", out="runs/dry_run")
# Fields that change the result of a run (a checkpoint made with other values cannot be resumed).
RESULT_FIELDS = ("arch", "steps", "eval_every", "val_batches", "batch_size", "chunk_bytes",
                 "noise_density", "mean_span", "d_model", "d_ff", "n_heads", "enc_layers",
                 "dec_layers", "experts", "group_size", "lr", "warmup", "decay_start", "cooldown",
                 "cap_iters",
                 "aux_loss_weight", "z_loss_weight", "decoder_router", "decoder_group",
                 "encoder_group", "data")


def dataclass_parser(config_cls, prog, description, epilog, suppress_defaults=False,
                     positional=()):
    """An argparse parser with one flag per field of config_cls (--field-name, the field's type,
    its metadata help, bools as store_true); fields named in `positional` are positional
    arguments. suppress_defaults: parse only what was given (to tell given flags from defaults)."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS if suppress_defaults else None)
    for f in dataclasses.fields(config_cls):
        kw = {} if suppress_defaults else {"default": f.default}
        help = f.metadata["help"].replace("%", "%%")      # argparse formats help with %
        if f.name in positional:
            p.add_argument(f.name, metavar=f.name.upper(), help=help, **kw)
        elif f.type in ("bool", bool):
            p.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=help, **kw)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type]
            p.add_argument("--" + f.name.replace("_", "-"), type=typ, help=help, **kw)
    return p


def build_parser(suppress_defaults=False):
    return dataclass_parser(
        Config, "train_tiny.py", __doc__.split("\n\n")[0],
        "t5 preset: " + ", ".join(f"{k}={v}" for k, v in T5_PRESET.items())
        + ". GPU preset: " + ", ".join(f"{k}={v}" for k, v in GPU_PRESET.items()),
        suppress_defaults)


def parse_config(argv):
    """argv -> (Config, parser). Presets fill only the flags the user did not give."""
    parser = build_parser()
    cfg = Config(**vars(parser.parse_args(argv)))
    given = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.preset == "auto":
        cfg.preset = "gpu" if cfg.device == "cuda" else "cpu"
    overrides = dict(T5_PRESET) if cfg.arch == "t5" else {}
    if cfg.preset == "gpu":
        overrides.update(GPU_PRESET)
    if cfg.dry_run:
        overrides.update(DRY_RUN)
    for k, v in overrides.items():
        if k not in given:
            setattr(cfg, k, v)
    validate(cfg, parser)
    return cfg, parser


def router_list(cfg):
    return [r.strip() for r in cfg.routers.split(",") if r.strip()]


def base_router(router):
    """'top2_aa' -> 'top2' (the A/A run trains the same model as its base router)."""
    return router[:-len(AA)] if router.endswith(AA) else router


def validate(cfg, parser):
    """Clear errors (SystemExit via parser.error) naming the flag."""
    routers = router_list(cfg)
    bad = [r for r in routers if base_router(r) not in ALL_ROUTERS]
    if bad or not routers:
        parser.error(f"--routers: unknown router(s) {bad}; choose from {', '.join(ALL_ROUTERS)} "
                     f"(or ROUTER{AA}, the A/A control)")
    try:
        [int(s) for s in cfg.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {cfg.seeds!r}")
    for name in ("steps", "eval_every", "cap_iters", "val_batches", "batch_size", "d_model",
                 "d_ff", "n_heads", "enc_layers", "dec_layers", "experts", "workers", "threads"):
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
    if cfg.lr <= 0 or min(cfg.warmup, cfg.decay_start, cfg.cooldown, cfg.stop_after) < 0:
        parser.error("--lr must be > 0, --warmup, --decay-start, --cooldown and --stop-after >= 0")
    for name, ok in (("arch", ARCHS), ("preset", ("cpu", "gpu")), ("device", ("cpu", "cuda")),
                     ("decoder_router", ("same", "token")),
                     ("decoder_group", ecmoe.GROUPS), ("encoder_group", ecmoe.GROUPS)):
        if getattr(cfg, name) not in ok:
            parser.error(f"--{name.replace('_', '-')}: {getattr(cfg, name)!r} not in {ok}")
    if cfg.group_size and (cfg.group_size < 0 or cfg.batch_size % cfg.group_size
                           or cfg.decoder_group != "position"):
        parser.error(f"--group-size {cfg.group_size}: must divide --batch-size "
                     f"({cfg.batch_size}) and needs --decoder-group position (0 = off)")
    for rt in routers:
        if base_router(rt) not in ("cap2", "cap3"):
            continue
        _, c, b = ROUTER_SPEC[base_router(rt)]
        for stack, group, n in routing_groups(cfg):
            k = ecmoe.expert_capacity(n, cfg.experts, c)
            if b * n < k * cfg.experts:
                parser.error(f"--routers {rt}: infeasible in the {stack} ({group} groups of n={n}"
                             f" tokens, k={k}, e={cfg.experts}: need b*n >= k*e); change "
                             "--batch-size, --group-size or --experts")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")


def routing_groups(cfg):
    """[(stack, group, n tokens per routing group)] of the MoE layers of this config."""
    g = cfg.group_size or cfg.batch_size
    if cfg.arch == "lm":
        T = cfg.chunk_bytes
        return [("lm", cfg.decoder_group, {"batch": g * T, "sequence": T, "position": g}[
            cfg.decoder_group])]
    _, _, S, T = span_counts(cfg)
    B = cfg.batch_size
    out = [("encoder", cfg.encoder_group, {"batch": B * S, "sequence": S, "position": B}[
        cfg.encoder_group])]
    if cfg.decoder_router == "same":
        out.append(("decoder", cfg.decoder_group, {"batch": g * T, "sequence": T, "position": g}[
            cfg.decoder_group]))
    return out


def check_out_dir(out, parser):
    """--out must be a directory we can write: a clear error instead of a traceback later."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out: {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        parser.error(f"--out: cannot write to {str(out)!r}: {e.strerror or e}")


# ----------------------------------------------------------------------------------------------
# Data: byte vocabulary, deterministic batches from (seed, step).

PAD, EOS, BYTE0 = 0, 1, 2          # token = byte + 2; t5 sentinels follow the 256 bytes
SENTINEL0 = BYTE0 + 256
VAL_SEED = 10_000                  # validation batches are the same for every router and seed


def span_counts(cfg):
    """(n_noise, n_spans, S, T) for one t5 chunk: fixed per config, so batches need no padding."""
    L = cfg.chunk_bytes
    n_noise = min(max(1, round(L * cfg.noise_density)), L - 1)
    n_spans = max(1, min(round(n_noise / cfg.mean_span), L - n_noise))
    return n_noise, n_spans, L - n_noise + n_spans + 1, n_noise + n_spans + 1


def vocab_size(cfg):
    return SENTINEL0 + (span_counts(cfg)[1] if cfg.arch == "t5" else 0)


def target_tokens_per_batch(cfg):
    """Tokens the loss is computed on per batch (lm: every position; t5: the decoder's)."""
    return cfg.batch_size * (cfg.chunk_bytes if cfg.arch == "lm" else span_counts(cfg)[3])


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
    """Random chunks of `text` (uint8 array) -> the model's inputs followed by the targets.

    lm: (ids [B,T], targets [B,T]), targets = ids shifted left by one byte.
    t5: (enc_ids [B,S], dec_in [B,T], targets [B,T]) after span corruption."""
    L = cfg.chunk_bytes + (cfg.arch == "lm")                  # lm needs one byte more
    offsets = rng.integers(0, len(text) - L + 1, cfg.batch_size)
    if cfg.arch == "lm":
        tok = torch.from_numpy(np.stack([text[o:o + L] for o in offsets]).astype(np.int64) + BYTE0)
        return tok[:, :-1], tok[:, 1:]                                          # [B, T] each
    pairs = [span_corrupt(text[o:o + L], rng, cfg) for o in offsets]
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
# Model: T5.1.1-style blocks with an ecmoe.MoE in every other FFN; a decoder-only LM or a T5.

# router name -> (ecmoe router, capacity factor c, max experts per token b)
ROUTER_SPEC = {"top1": ("top1", 1.0, 2), "top2": ("top2", 2.0, 2),
               "ec1": ("expert_choice", 1.0, 2), "ec2": ("expert_choice", 2.0, 2),
               "top2_dropless": ("top2_dropless", 2.0, 2), "top2_gshard": ("top2_gshard", 2.0, 2),
               "cap2": ("capped_expert_choice", 2.0, 2), "cap3": ("capped_expert_choice", 2.0, 3)}
TOKEN_CHOICE = ("top1", "top2", "top2_dropless", "top2_gshard")   # ecmoe routers with aux loss


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
            # -1e9, not -inf: exp underflows to exactly 0 all the same, and SDPA's CPU path
            # skips its fully-masked-row handling (2x faster steps at this size, measured)
            future = torch.ones(Tq, Tk, dtype=torch.bool, device=bias.device).triu(1)
            bias = bias.masked_fill(future, -1e9)
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


def make_ffn(cfg, router, stack, i):
    """The FFN of layer i: gated GELU in even layers; in odd layers an ecmoe.MoE, or the dense
    FFN of width 2f for router 'dense'."""
    d = cfg.d_model
    if i % 2 == 0:
        return GatedGeluFFN(d, cfg.d_ff)
    router = base_router(router)
    if router == "dense":
        return DenseFFN(d, 2 * cfg.d_ff)
    name, c, b = ROUTER_SPEC[router]
    if stack == "dec" and cfg.decoder_router == "token" and name not in TOKEN_CHOICE:
        name = "top2"                               # flaxformer: top-2 token choice in decoder
    group = cfg.encoder_group if stack == "enc" else cfg.decoder_group
    return ecmoe.MoE(d, cfg.d_ff, cfg.experts, router=name, capacity_factor=c, group=group,
                     max_experts_per_token=b, max_iter=cfg.cap_iters)


def to_subgroups(x, g):
    """[B, T, d] -> [g, B/g * T, d]: column m*T + t holds position t of sequences m*g .. m*g+g-1,
    so a MoE with group="position" (groups = columns) routes in groups of g consecutive
    sequences, one position each: still causal, and batch-independent across groups."""
    B, T, d = x.shape
    return x.view(B // g, g, T, d).transpose(0, 1).reshape(g, B // g * T, d)


def from_subgroups(y, B, T):
    """Inverse of to_subgroups: [g, B/g * T, d] -> [B, T, d]."""
    g, _, d = y.shape
    return y.view(g, B // g, T, d).transpose(0, 1).reshape(B, T, d)


class Block(nn.Module):
    """Pre-norm T5 block: self-attention, [cross-attention], FFN (gated, dense or MoE)."""
    def __init__(self, cfg, ffn, cross, group_size=0):
        super().__init__()
        d = cfg.d_model
        self.norm_sa, self.sa = nn.RMSNorm(d, eps=1e-6), Attention(d, cfg.n_heads)
        self.norm_ca = nn.RMSNorm(d, eps=1e-6) if cross else None
        self.ca = Attention(d, cfg.n_heads) if cross else None
        self.norm_ff, self.ffn = nn.RMSNorm(d, eps=1e-6), ffn
        self.group_size = group_size if isinstance(ffn, ecmoe.MoE) else 0

    def forward(self, x, bias, enc=None):
        h = self.norm_sa(x)
        x = x + self.sa(h, h, bias)
        if self.ca is not None:
            x = x + self.ca(self.norm_ca(x), enc, None)
        h = self.norm_ff(x)
        if not isinstance(self.ffn, ecmoe.MoE):
            return x + self.ffn(h), None
        B, T, _ = h.shape
        if self.group_size and B > self.group_size:   # position groups of g sequences
            # (B <= g, e.g. batch size 1 at inference: the batch is one group)
            out = self.ffn(to_subgroups(h, self.group_size))
            return x + from_subgroups(out.y, B, T), out
        out = self.ffn(h)                       # MoEOutput(y, aux_loss, z_loss, stats)
        return x + out.y, out


class TinyModel(nn.Module):
    """Shared parts: embedding, MoE bookkeeping, output head."""
    def moe_layers(self):
        """[(name, ecmoe.MoE)] in forward order."""
        return [(n.rsplit(".ffn", 1)[0].replace("encoder.", "enc").replace("decoder.", "dec"), m)
                for n, m in self.named_modules() if isinstance(m, ecmoe.MoE)]

    def run_stack(self, blocks, x, bias, enc=None):
        moe_outs = []
        for blk in blocks:
            x, o = blk(x, bias, enc)
            moe_outs += [o] if o is not None else []
        return x, moe_outs


class TinyLM(TinyModel):
    """Decoder-only causal byte LM: the T5 decoder blocks without cross-attention."""
    def __init__(self, cfg, router):
        super().__init__()
        d, V = cfg.d_model, vocab_size(cfg)
        self.embed = nn.Parameter(torch.empty(V, d))
        self.dec_bias = RelativeBias(cfg.n_heads, bidirectional=False)
        self.decoder = nn.ModuleList(
            Block(cfg, make_ffn(cfg, router, "dec", i), cross=False, group_size=cfg.group_size)
            for i in range(cfg.dec_layers))
        self.dec_norm = nn.RMSNorm(d, eps=1e-6)
        self.lm_head = nn.Parameter(torch.empty(d, V))

    def forward(self, ids):
        """ids [B,T] -> logits [B,T,V], list of MoEOutput (one per MoE layer)."""
        x = self.embed[ids]                                             # [B, T, d]
        x, moe_outs = self.run_stack(self.decoder, x, self.dec_bias(ids.shape[1], ids.shape[1]))
        return self.dec_norm(x) @ self.lm_head, moe_outs                # [B, T, V]


class TinyT5(TinyModel):
    """T5 encoder-decoder; encoder MoE layers route in --encoder-group groups."""
    def __init__(self, cfg, router):
        super().__init__()
        d, V = cfg.d_model, vocab_size(cfg)
        self.embed = nn.Parameter(torch.empty(V, d))
        self.enc_bias = RelativeBias(cfg.n_heads, bidirectional=True)
        self.dec_bias = RelativeBias(cfg.n_heads, bidirectional=False)
        self.encoder = nn.ModuleList(Block(cfg, make_ffn(cfg, router, "enc", i), cross=False)
                                     for i in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(
            Block(cfg, make_ffn(cfg, router, "dec", i), cross=True, group_size=cfg.group_size)
            for i in range(cfg.dec_layers))
        self.enc_norm, self.dec_norm = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.lm_head = nn.Parameter(torch.empty(d, V))

    def forward(self, enc_ids, dec_ids):
        """enc_ids [B,S], dec_ids [B,T] -> logits [B,T,V], list of MoEOutput (one per MoE layer)."""
        S, T = enc_ids.shape[1], dec_ids.shape[1]
        x, enc_outs = self.run_stack(self.encoder, self.embed[enc_ids], self.enc_bias(S, S))
        y, dec_outs = self.run_stack(self.decoder, self.embed[dec_ids], self.dec_bias(T, T),
                                     self.enc_norm(x))
        return self.dec_norm(y) @ self.lm_head, enc_outs + dec_outs     # [B, T, V]


def build_model(cfg, router):
    return (TinyLM if cfg.arch == "lm" else TinyT5)(cfg, router)


def init_weights(model, seed):
    """Deterministic init per parameter NAME, so every router of a seed starts from the same
    shared (non-MoE) weights: normal(0, fan_in^-1/2) for matrices ([in, out] or [e, in, out]
    layout; for expert weights this is ecmoe.MoE's own documented init), normal(0, 0.02) for the
    router (ecmoe.MoE's documented router init), normal(0, 1) for the embedding (T5), 0.1 for
    relative-bias tables, ones for norms."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if p.ndim == 1:
                p.fill_(1.0)
                continue
            std = 1.0 if name == "embed" else 0.1 if "bias.table" in name else \
                0.02 if name.endswith("w_router") else p.shape[-2] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ----------------------------------------------------------------------------------------------
# One training run per (router, seed).


def lr_at(step, cfg):
    """Linear warmup to cfg.lr, constant until decay_start, then inverse-square-root decay
    (step counts from 1; the paper: constant for 10K steps, then inverse-sqrt, Sec. 3); times a
    linear cooldown to 0 over the last cfg.cooldown steps, if any."""
    s, w = step + 1, max(cfg.warmup, 1)
    d = max(cfg.decay_start, w)
    cool = min(1.0, (cfg.steps - step) / cfg.cooldown) if cfg.cooldown else 1.0
    return cfg.lr * min(s / w, 1.0, math.sqrt(d / s)) * cool


def loss_fn(model, batch, cfg):
    """batch = (*model inputs, targets [B,T]) -> (cross-entropy, training loss, MoE outputs).

    loss = CE + z_loss_weight * sum(z_loss) over MoE layers
              + aux_loss_weight * sum(aux_loss) over token-choice MoE layers (EC gets none)."""
    *inputs, tgt = batch
    logits, outs = model(*inputs)                                       # [B, T, V]
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten())
    loss = ce
    for o, (_, moe) in zip(outs, model.moe_layers()):
        loss = loss + cfg.z_loss_weight * o.z_loss
        if moe.router in TOKEN_CHOICE:
            loss = loss + cfg.aux_loss_weight * o.aux_loss
    return ce, loss, outs


def expert_choice_layers(model):
    """The model's expert-choice MoE layers: the ones with inference thresholds."""
    return [m for _, m in model.moe_layers() if m.router == "expert_choice"]


@torch.no_grad()
def evaluate(model, batches, device, routing="group", stats=None):
    """Cross-entropy of each fixed validation batch -> list of floats (one sync per batch).

    Validation uses the SAME batch size as training: routing groups are positions across the
    batch, so the group size sets the bucket size k = ceil(n*c/e); another batch size would
    evaluate a differently-routed model. top2_gshard's random second expert draws from a fixed
    seed here, so every validation of every run sees the same draws.
    routing: "group" (as in training) or "threshold" (expert-choice layers route token by token
    with their learned thresholds; other layers as in training). stats: a list that gets one
    [MoE layer] list of RoutingStats per batch."""
    model.eval()
    for m in expert_choice_layers(model):
        m.eval_routing = routing
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(VAL_SEED)
            losses = []
            for *inputs, tgt in batches:
                logits, outs = model(*[t.to(device) for t in inputs])
                losses.append(F.cross_entropy(logits.flatten(0, 1).float(),
                                              tgt.to(device).flatten()).item())
                if stats is not None:
                    stats.append([o.stats for o in outs])
    finally:
        for m in expert_choice_layers(model):
            m.eval_routing = "group"
        model.train()
    return average_over_ranks(losses)   # torchrun: each rank's rows -> the whole batch's loss


def single_rows(batches):
    """The same validation sequences as batches of ONE sequence (inference / sampling)."""
    return [[t[i:i + 1] for t in batch] for batch in batches for i in range(len(batch[0]))]


def inference_eval(model, vals, device):
    """Validation loss the way the model would be used at inference: batch size 1.

    -> dict: group_1 (every router routes as in training, but in groups of one sequence: for
    expert choice at batch size 1 every expert takes every token, k clips to 1), and for
    expert-choice models threshold_1 (threshold routing at batch size 1; run_one adds
    threshold_B, the same at the training batch size, from its last validation: equal up to
    float error, since the rule is per token) with the loads threshold routing gives each MoE
    layer at batch size 1: expert_load (fraction of tokens each expert takes, per layer) and
    experts_per_token (bins 0, 1, 2, 3-4, >4)."""
    rows = single_rows(vals)
    try:
        out = dict(group_1=float(np.mean(evaluate(model, rows, device))))
    except ValueError as e:      # capped EC: infeasible in a group of one token
        return dict(group_1=None, error=str(e))
    if expert_choice_layers(model):
        stats = []
        out["threshold_1"] = float(np.mean(evaluate(model, rows, device, "threshold", stats)))
        out["threshold_loads"] = {
            n: dict(expert_load=torch.stack([s[i].expert_load for s in stats]).mean(0).tolist(),
                    experts_per_token=torch.stack([s[i].experts_per_token for s in stats])
                    .mean(0).tolist())
            for i, (n, m) in enumerate(model.moe_layers()) if m.router == "expert_choice"}
    return out


STAT_KEYS = ("unrouted_fraction", "dropped_fraction", "load_max_over_mean", "overflow_fraction")


def _stat_vector(stats):
    """RoutingStats -> [9] float64 tensor on the stats' device (no sync): experts/token bins
    0, 1, 2, 3-4, >4, then the four scalars."""
    bins = stats.experts_per_token.to(torch.float64).reshape(5)
    return torch.cat([bins, torch.stack([getattr(stats, k).to(torch.float64) for k in STAT_KEYS])])


def _stats_dict(vec):
    v = [float(x) for x in vec]
    return dict(experts_per_token=v[:5], **dict(zip(STAT_KEYS, v[5:])))


def _atomic_write(path, write):
    """write(tmp_path) then os.replace: readers never see a half-written file. The file gets the
    usual permissions (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    if not _writes_here(path):                          # torchrun: rank 0 writes (Distributed)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=path.suffix + ".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path, obj):
    _atomic_write(path, lambda t: Path(t).write_text(json.dumps(obj, indent=1)))


def run_paths(cfg, router, seed):
    out = Path(cfg.out)
    return (out / "ckpt" / f"{router}_s{seed}{rank_suffix()}.pt",   # per rank under torchrun
            out / "runs" / f"{router}_s{seed}.json")


def model_path(run_dir, router, seed):
    """Final weights of a finished run: dict(model=state_dict, config=Config as a dict, router,
    seed). Saved by run_one, read by load_model (train_tiny --sample, finetune.py)."""
    return Path(run_dir) / "models" / f"{router}_s{seed}.pt"


def load_model(run_dir, router, seed, device="cpu"):
    """-> (model in eval mode, Config) of a finished run, loaded with weights_only=True."""
    path = model_path(run_dir, router, seed)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no saved model for router {router!r}, seed {seed} "
                                f"(runs made before models/ was written must be rerun)")
    saved = torch.load(path, weights_only=True, map_location="cpu")
    cfg = Config(**saved["config"])
    model = build_model(cfg, router)
    model.load_state_dict(saved["model"])
    return model.to(device).eval(), cfg


def code_sha256():
    """Hash of the code that determines a run's result (this file and ecmoe.py)."""
    h = hashlib.sha256()
    for f in (__file__, ecmoe.__file__):
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def result_config(cfg, corpus_info=None):
    """The fields a resumed run must share with its checkpoint: result-changing flags, the
    corpus hash (the default corpus is whatever stdlib is installed) and the code hash."""
    rc = {k: getattr(cfg, k) for k in RESULT_FIELDS}
    if _DIST["world"] > 1:                              # torchrun: W changes the routing groups
        rc["world_size"] = _DIST["world"]
    if corpus_info is not None:
        rc.update(corpus_sha256=corpus_info["sha256"], code_sha256=code_sha256())
    return rc


CKPT_EVERY_EVALS = 4   # checkpoint every 4th validation (and when --stop-after stops a run)


def run_one(cfg, router, seed, corpus, report=print):
    """Train one (router, seed); returns its result dict (None if stopped by --stop-after).

    `router` may be ROUTER_aa: the same model and init as ROUTER, data order of another seed."""
    ckpt_path, done_path = run_paths(cfg, router, seed)
    device = torch.device(cfg.device)
    data_seed = seed + AA_DATA_SEED if router.endswith(AA) else seed
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(seed)
        model = build_model(cfg, router)
        init_weights(model, seed)
        shard_model(model)                      # torchrun: this rank's experts only (Distributed)
        model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                                weight_decay=0.0)
        names = [n for n, _ in model.moe_layers()]
        ec_names = [n for n, m in model.moe_layers() if m.router == "expert_choice"]
        log = dict(train_loss=[], val_step=[], val_loss=[], val_batch_loss=[], val_time=[],
                   stats_window=[], stats_sum=[[0.0] * 9 for _ in names], train_time=0.0,
                   stat_steps=0, val_loss_threshold=[], thresholds=[])
        start = 0
        if cfg.resume and ckpt_path.exists():
            # weights_only: loading never runs pickled code. Load to CPU: the RNG states must
            # stay CPU tensors; load_state_dict moves weights and optimizer state to `device`.
            ck = torch.load(ckpt_path, weights_only=True, map_location="cpu")   # checked in main
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            torch.set_rng_state(ck["rng"])
            if device.type == "cuda" and "cuda_rng" in ck:
                torch.cuda.set_rng_state(ck["cuda_rng"], device)
            start, log = ck["step"], ck["log"]
        vals = [rank_rows(b) for b in val_batches(corpus, cfg)]
        win = torch.zeros(len(names), 9, dtype=torch.float64, device=device)  # stats window
        win_loss, win_n = [], 0
        for step in range(start, cfg.steps):
            batch = [t.to(device) for t in rank_rows(train_batch(corpus, data_seed, step, cfg))]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            t0 = time.perf_counter()
            ce, loss, outs = loss_fn(model, batch, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            reduce_and_clip_gradients(model, 1.0)     # = clip_grad_norm_ on one process
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()        # for the step time only: one sync per step
            log["train_time"] += time.perf_counter() - t0
            win_loss.append(ce.detach())        # stays on the device until the next validation
            if names:
                win += torch.stack([_stat_vector(o.stats) for o in outs])       # [n_moe, 9]
            win_n += 1
            last = step + 1 == cfg.steps
            if (step + 1) % cfg.eval_every == 0 or last:
                average_window(win_loss, win)           # torchrun: the global batch's
                log["train_loss"] += torch.stack(win_loss).tolist()
                batch_losses = evaluate(model, vals, device)
                log["val_step"].append(step + 1)
                log["val_loss"].append(float(np.mean(batch_losses)))
                log["val_batch_loss"].append(batch_losses)
                log["val_time"].append(log["train_time"])
                if ec_names:  # inference thresholds: their drift, and the loss they give
                    log["thresholds"].append([m.threshold.tolist() for m in expert_choice_layers(model)])
                    log["val_loss_threshold"].append(float(np.mean(
                        evaluate(model, vals, device, "threshold"))))
                if names:
                    log["stats_window"].append((win / win_n).tolist())
                    total = torch.tensor(log["stats_sum"], dtype=torch.float64) + win.cpu()
                    log["stats_sum"] = total.tolist()  # plain lists: weights_only checkpoints
                    log["stat_steps"] += win_n
                win.zero_()
                win_loss, win_n = [], 0
                report(dict(router=router, seed=seed, step=step + 1, train=log["train_loss"][-1],
                            val=log["val_loss"][-1], s_per_step=log["train_time"] / (step + 1)))
                stop = cfg.stop_after and step + 1 >= cfg.stop_after and not last
                if stop or (step + 1) % (cfg.eval_every * CKPT_EVERY_EVALS) == 0:
                    # checkpoints only at validation steps, where the windows are empty
                    state = dict(model=model.state_dict(), opt=opt.state_dict(), step=step + 1,
                                 log=log, rng=torch.get_rng_state(),
                                 config=result_config(cfg, corpus["info"]))
                    if device.type == "cuda":
                        state["cuda_rng"] = torch.cuda.get_rng_state(device)
                    _atomic_write(ckpt_path, lambda t: torch.save(state, t))
                if stop:
                    return None
        n_params = count_parameters(model)
        S = torch.tensor(log["stats_sum"], dtype=torch.float64) / max(log["stat_steps"], 1)
        result = dict(router=router, seed=seed, data_seed=data_seed, steps=cfg.steps,
                      n_params=n_params, train_loss=log["train_loss"], val_step=log["val_step"],
                      val_loss=log["val_loss"], val_batch_loss=log["val_batch_loss"],
                      val_time=log["val_time"], final_val=log["val_loss"][-1],
                      train_time=log["train_time"], s_per_step=log["train_time"] / cfg.steps,
                      tokens_per_s=target_tokens_per_batch(cfg) * cfg.steps / log["train_time"],
                      moe_layers=names,
                      stats={n: _stats_dict(S[i]) for i, n in enumerate(names)},
                      stats_over_training={n: [_stats_dict(w[i]) for w in log["stats_window"]]
                                           for i, n in enumerate(names)},
                      config=result_config(cfg, corpus["info"]),
                      inference=inference_eval(model, vals, device))
        if ec_names:
            # threshold routing at the training batch size: the last validation measured it
            result["inference"]["threshold_B"] = log["val_loss_threshold"][-1]
            result.update(val_loss_threshold=log["val_loss_threshold"],
                          thresholds_over_training={n: [t[i] for t in log["thresholds"]]
                                                    for i, n in enumerate(ec_names)})
        weights = {k: v.detach().cpu() for k, v in full_state(model).items()}
        _atomic_write(model_path(cfg.out, router, seed), lambda t: torch.save(
            dict(model=weights, config=dataclasses.asdict(cfg), router=router, seed=seed), t))
        _write_json(done_path, result)
        if ckpt_path.exists():
            ckpt_path.unlink()
        return result
    finally:
        torch.set_num_threads(old_threads)


# ----------------------------------------------------------------------------------------------
# Sampling at batch size 1: how a trained model is used, one sequence at a time.

SAMPLE_PROMPTS, SAMPLE_NEW_BYTES = 3, 64
SAMPLE_TEMPERATURE = 0.7   # greedy decoding of a tiny model repeats itself ("the the the ...")


def sample_prompts(corpus, cfg):
    """SAMPLE_PROMPTS deterministic prompts from the held-out text: each starts at a line that
    opens a `def`, spread over the validation text. lm: the first chunk_bytes - 16 bytes;
    t5: a chunk_bytes chunk, span-corrupted (encoder input) -> list of token-id lists."""
    val = corpus["val"].tobytes()
    prompts = []
    for i in range(SAMPLE_PROMPTS):
        at = val.find(b"\ndef ", len(val) * i // SAMPLE_PROMPTS) + 1
        chunk = np.frombuffer(val[at:at + cfg.chunk_bytes], np.uint8)
        if cfg.arch == "lm":
            prompts.append((chunk[:cfg.chunk_bytes - 16].astype(np.int64) + BYTE0).tolist())
        else:
            prompts.append(span_corrupt(chunk, np.random.default_rng([VAL_SEED, i]), cfg)[0].tolist())
    return prompts


@torch.no_grad()
def generate(model, cfg, prompt, device, new=SAMPLE_NEW_BYTES, temperature=SAMPLE_TEMPERATURE,
             seed=0):
    """Sampling at batch size 1 (no KV cache: each step reruns the prefix), from
    softmax(logits / temperature) with a torch.Generator seeded by `seed` (reproducible);
    temperature 0 = greedy (argmax). lm: continue `prompt` by `new` tokens; t5: decode the
    sentinel fills of the encoder input `prompt` until EOS or `new` tokens. -> the new token ids."""
    gen = torch.Generator().manual_seed(seed)                                 # CPU: same on any device
    ids = torch.tensor([prompt], device=device)                               # [1, P]
    out = torch.tensor([[PAD]], device=device) if cfg.arch == "t5" else ids    # [1, t]
    for _ in range(new):
        logits = (model(ids, out) if cfg.arch == "t5" else model(out))[0]     # [1, t, V]
        if temperature == 0:
            nxt = logits[:, -1].argmax(-1, keepdim=True)                       # [1, 1]
        else:
            p = torch.softmax(logits[:, -1].float().cpu() / temperature, -1)   # [1, V]
            nxt = torch.multinomial(p, 1, generator=gen).to(device)            # [1, 1]
        out = torch.cat([out, nxt], dim=1)
        if cfg.arch == "t5" and int(nxt) == EOS:
            break
    return out[0, len(prompt) if cfg.arch == "lm" else 1:].tolist()


def detokenize(ids):
    """Token ids -> readable text: bytes as UTF-8 (invalid bytes replaced), t5 sentinels as
    <Xi>, EOS as <eos>, control characters escaped (newline as \\n: one line per sample)."""
    parts, buf = [], bytearray()
    for t in ids:
        if BYTE0 <= t < SENTINEL0:
            buf.append(t - BYTE0)
            continue
        parts.append(buf.decode("utf-8", "replace"))
        buf = bytearray()
        parts.append("<eos>" if t == EOS else "<pad>" if t == PAD else f"<X{t - SENTINEL0}>")
    parts.append(buf.decode("utf-8", "replace"))
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in "".join(parts))


def sample_run(run_dir, argv, device):
    """train_tiny --sample RUN_DIR: samples of every router's first seed at batch size 1,
    stored as results.json["samples"] and shown in results.md."""
    run_dir = Path(run_dir)
    res = compare.load(run_dir)
    seed, prompts, by_router = res["seeds"][0], None, {}
    for router in res["routers"]:
        model, cfg = load_model(run_dir, router, seed, device)
        ec = expert_choice_layers(model)
        for m in ec:
            m.eval_routing = "threshold"
        if prompts is None:             # the same prompts for every router
            prompts = sample_prompts(load_corpus(cfg), cfg)
        try:
            texts = [detokenize(generate(model, cfg, p, device, seed=i)) for i, p in enumerate(prompts)]
            routing = "threshold" if ec else "as in training"
        except ValueError as e:                    # capped EC: no group of one token fits
            texts, routing = ["(cannot run at batch size 1: " + str(e).split(":")[0] + ")"] * \
                len(prompts), "-"
        by_router[router] = dict(texts=texts, routing=routing)
        print(f"{router}: {texts[0]!r}")
    res["samples"] = dict(
        command=shlex.join(["python", "train_tiny.py", *argv]), seed=seed,
        how=f"sampled at temperature {SAMPLE_TEMPERATURE} (prompt i: torch.Generator seed i, the same "
            f"for every router) at batch size 1 from seed {seed}'s final weights, "
            + (f"{SAMPLE_NEW_BYTES} new bytes after each prompt" if cfg.arch == "lm" else
               "the decoder fills the sentinels <Xi> of the span-corrupted prompt"),
        prompts=[detokenize(p) for p in prompts], by_router=by_router)
    _write_json(run_dir / "results.json", res)
    _atomic_write(run_dir / "results.md", lambda t: Path(t).write_text(compare.markdown(res)))
    print(f"wrote samples into {run_dir / 'results.json'} and {run_dir / 'results.md'}")
    return res["samples"]


# Worker-process plumbing: each worker gets the corpus once and reports progress on a queue.
_WORKER = {}


def _worker_init(q, corpus):
    _WORKER.update(queue=q, corpus=corpus)


def _worker_run(cfg, router, seed):
    return run_one(cfg, router, seed, _WORKER["corpus"], report=_WORKER["queue"].put)


# ----------------------------------------------------------------------------------------------
# Distributed: `torchrun --nproc_per_node=W train_tiny.py ...` trains each run on W processes,
# data parallel for the dense weights and expert parallel for the experts (ecmoe's
# "Expert parallelism"): gloo on CPU, NCCL on GPU (one GPU per process). Without torchrun (or
# with W = 1) every helper below is a no-op and a run is exactly the single-process one.
#
# - Data: every rank builds the same global batch (a pure function of (seed, step)) and takes
#   rows r*B/W .. (r+1)*B/W - 1; validation batches likewise. --batch-size is the global batch.
# - Routing: each rank routes its own rows. With --group-size g dividing B/W the routing groups
#   are the same as on one process, so the loss curve is the same up to float error (tested).
#   With --group-size 0 each rank routes over its B/W sequences instead of all B: a different
#   k and other routing, so the curve differs. top2_gshard's draws also differ (each rank draws
#   for its own tokens).
# - Gradients: the loss is the global mean, (1/W) sum_r L_r. Dense and router gradients are
#   all-reduced and averaged; expert gradients already hold sum_r dL_r/dw (the all-to-all's
#   backward brings every rank's contribution), so they are divided by W. Gradient clipping uses
#   the global norm (the expert slices' squared norms all-reduced).
# - Files: rank 0 alone writes results, the run JSON and the final model (experts gathered: the
#   same file a single process writes, so load_model works). Checkpoints are one file per rank
#   (ckpt/ROUTER_sSEED.rankRofW.pt: its expert slice and optimizer state); --resume needs the
#   same W, and refuses (via the world_size in the run config) a run made with another W.
#   Multi-node: --out must be on a filesystem every node sees.
# - Evaluation: evaluate() averages each batch's loss over the ranks (every caller gets the
#   whole batch's loss, threshold and batch-size-1 evaluations included); the expert-choice
#   thresholds are averaged over ranks as they are learned (ecmoe.MoE.update_threshold), so they
#   are the same on every rank. The per-layer threshold loads of inference_eval are rank 0's.
#   --sample runs on one process only.
# - Output: ranks other than 0 print nothing (stdout to /dev/null); errors still reach stderr.

_DIST = dict(world=1, rank=0, backend=None)  # set by init_distributed under torchrun


def init_distributed(cfg, parser):
    """Under torchrun (WORLD_SIZE > 1): check the config for W ranks, then join the process group."""
    W = int(os.environ.get("WORLD_SIZE", "1"))
    if W == 1:
        return
    B = cfg.batch_size
    if B % W:
        parser.error(f"--batch-size {B} must be divisible by the {W} torchrun processes "
                     "(each takes B/W sequences of the global batch)")
    if cfg.group_size and (B // W) % cfg.group_size:
        parser.error(f"--group-size {cfg.group_size} must divide the per-process batch "
                     f"--batch-size/W = {B // W} under torchrun with {W} processes")
    if cfg.experts % W:
        parser.error(f"--experts {cfg.experts} must be divisible by the {W} torchrun processes "
                     "(each holds experts/W experts of every MoE layer)")
    validate(dataclasses.replace(cfg, batch_size=B // W), parser)  # capped EC: per-rank groups
    if cfg.sample:
        parser.error("--sample runs on one process: start it with python, not torchrun")
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    if cfg.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend)
    _DIST.update(world=W, rank=torch.distributed.get_rank(), backend=backend)
    cfg.workers = 1                                   # one run at a time, on all W processes
    if _DIST["rank"]:
        sys.stdout = open(os.devnull, "w")


def finish_distributed():
    if _DIST["world"] > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank_suffix():
    """'' on one process, '.rank{r}of{W}' under torchrun (per-rank checkpoint names)."""
    return f".rank{_DIST['rank']}of{_DIST['world']}" if _DIST["world"] > 1 else ""


def _writes_here(path):
    """Rank 0 writes everything; the other ranks only their own per-rank files."""
    return _DIST["rank"] == 0 or rank_suffix() in Path(path).name


def shard_model(model):
    """Keep this rank's experts of every MoE layer (after init, before the optimizer)."""
    if _DIST["world"] > 1:
        ecmoe.shard_experts(model, torch.distributed.group.WORLD)
    return model


def rank_rows(batch):
    """This rank's rows r*B/W .. (r+1)*B/W - 1 of every tensor of a global batch."""
    if _DIST["world"] == 1:
        return batch
    W, r = _DIST["world"], _DIST["rank"]
    return [t[r * len(t) // W:(r + 1) * len(t) // W] for t in batch]


def _expert_params(model):
    return [p for _, m in model.moe_layers() if m.expert_parallel_group is not None
            for p in (m.w_in, m.w_out)]


def reduce_and_clip_gradients(model, max_norm):
    """Gradients of the global mean loss, clipped on their global norm (torch's clip_grad_norm_
    on one process). Dense: all-reduce and average; experts: divide by W (see above)."""
    if _DIST["world"] == 1:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return
    W = _DIST["world"]
    experts = {id(p) for p in _expert_params(model)}
    dense = [p for p in model.parameters() if id(p) not in experts]
    for p in dense:
        if p.grad is None:                            # every rank must send the same layout
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in dense])  # one all-reduce for all dense grads
    torch.distributed.all_reduce(flat)
    flat /= W
    for p, g in zip(dense, flat.split([p.numel() for p in dense])):
        p.grad.copy_(g.view_as(p))
    expert_sq = torch.zeros((), dtype=torch.float64, device=flat.device)
    for p in _expert_params(model):
        if p.grad is not None:
            p.grad /= W
            expert_sq += p.grad.double().square().sum()
    torch.distributed.all_reduce(expert_sq)           # the slices' squared norms, summed
    total = (flat.double().square().sum() + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype))


def average_over_ranks(values):
    """Floats (per-rank means over equal-sized slices) -> their mean over ranks (global mean)."""
    if _DIST["world"] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device="cuda" if _DIST["backend"] == "nccl" else "cpu")
    torch.distributed.all_reduce(t)
    return (t / _DIST["world"]).tolist()


def average_window(win_loss, win):
    """In place: the training-loss window (0-d tensors) and routing-stat window, averaged over
    ranks, so the logged train loss and stats are those of the global batch."""
    if _DIST["world"] == 1 or not win_loss:
        return
    losses = torch.stack(win_loss)
    torch.distributed.all_reduce(losses)
    for t, v in zip(win_loss, losses / _DIST["world"]):
        t.copy_(v)
    torch.distributed.all_reduce(win)
    win /= _DIST["world"]


def count_parameters(model):
    """Parameters of the whole model: a sharded MoE counts all its experts, not its slice."""
    n = sum(p.numel() for p in model.parameters())
    return n + sum((_DIST["world"] - 1) * p.numel() for p in _expert_params(model))


def full_state(model):
    """The model's state_dict with every sharded MoE's experts gathered (a collective)."""
    return ecmoe.full_state_dict(model)


def check_ranks_agree(cfg, todo, parser):
    """--resume under torchrun: every rank must find the same runs to do and checkpoints at the
    same steps (a rank's file missing or older would make the ranks hang on different steps)."""
    if _DIST["world"] == 1:
        return
    mine = [(r, s, torch.load(p, weights_only=True, map_location="cpu")["step"]
             if (p := run_paths(cfg, r, s)[0]).exists() else 0) for r, s in todo]
    every = [None] * _DIST["world"]
    torch.distributed.all_gather_object(every, mine)
    if any(other != every[0] for other in every):
        parser.error(f"--resume: the per-rank checkpoints in {cfg.out}/ckpt disagree between the "
                     f"{_DIST['world']} processes (runs and steps per rank: {every}); remove "
                     "them to restart those runs, or use another --out")


def annotate_distributed(res, argv):
    """The command, hardware and routing groups of a torchrun run, in its results."""
    if _DIST["world"] == 1:
        return
    W = _DIST["world"]
    res["command"] = shlex.join(["torchrun", f"--nproc_per_node={W}", "train_tiny.py", *argv])
    res["distributed"] = dict(world_size=W, backend=_DIST["backend"],
                              batch_per_process=res["config"]["batch_size"] // W,
                              note="data parallel dense weights, experts sharded (expert "
                                   "parallel); routing groups are per process")
    res["hardware"]["summary"] += f", {W} torchrun processes ({_DIST['backend']})"
    res["routing_groups"] = routing_groups(dataclasses.replace(
        Config(**res["config"]), batch_size=res["config"]["batch_size"] // W))


# ----------------------------------------------------------------------------------------------
# Progress display, hardware, main.


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


def _clock(seconds):
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


class Display:
    """Progress: rich live bars on a terminal, plain log lines (run i of N, elapsed, ETA)
    otherwise."""
    def __init__(self, jobs, todo, steps):
        self.live = sys.stdout.isatty()
        self.steps, self.t0 = steps, time.time()
        self.index = {j: i + 1 for i, j in enumerate(jobs)}
        self.total = len(jobs)
        self.todo_steps = len(todo) * steps
        self.done = {}                            # job -> last step reported
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)
            self.progress = Progress(TextColumn("{task.description:>16}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(),
                                     TextColumn("{task.fields[info]}"))
            self.tasks = {j: self.progress.add_task(f"{j[0]} s{j[1]}", total=steps, info="")
                          for j in todo}

    def __enter__(self):
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.progress.stop()

    def __call__(self, msg):
        job = (msg["router"], msg["seed"])
        self.done[job] = msg["step"]
        elapsed = time.time() - self.t0
        done = sum(self.done.values())
        eta = elapsed / max(done, 1) * max(self.todo_steps - done, 0)
        info = f"train {msg['train']:.3f}  val {msg['val']:.3f}  {msg['s_per_step']:.3f} s/step"
        if self.live:
            self.progress.update(self.tasks[job], completed=msg["step"],
                                 info=info + f"  ETA {_clock(eta)}")
        else:
            print(f"[run {self.index[job]:>2}/{self.total} {job[0]:>13} s{job[1]}] step "
                  f"{msg['step']:>5}/{self.steps} {info}  elapsed {_clock(elapsed)} "
                  f"ETA {_clock(eta)}", flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    t_start = time.time()
    cfg, parser = parse_config(argv)
    init_distributed(cfg, parser)                      # torchrun only (section Distributed)
    if cfg.sample:
        if not (Path(cfg.sample) / "results.json").exists():
            parser.error(f"--sample: {cfg.sample!r} has no results.json (not a finished run)")
        return sample_run(cfg.sample, argv, torch.device(cfg.device))
    check_out_dir(cfg.out, parser)
    routers, seeds = router_list(cfg), [int(s) for s in cfg.seeds.split(",")]
    try:
        corpus = load_corpus(cfg)
    except ValueError as e:
        parser.error(str(e))
    expected = result_config(cfg, corpus["info"])
    jobs = [(r, s) for s in seeds for r in routers]       # seed-major: early results are paired
    results, todo = [], []
    for r, s in jobs:
        ckpt, done = run_paths(cfg, r, s)
        if cfg.resume and (done.exists() or ckpt.exists()):
            prev = json.loads(done.read_text()) if done.exists() else \
                torch.load(ckpt, weights_only=True, map_location="cpu")
            diff = [k for k in sorted(expected.keys() | prev["config"].keys())  # world_size too
                    if prev["config"].get(k) != expected.get(k)]
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
    check_ranks_agree(cfg, todo, parser)
    print(f"train_tiny: {len(jobs)} runs ({len(results)} already done), arch {cfg.arch}, routers "
          f"{routers}, seeds {seeds}, {cfg.steps} steps, preset {cfg.preset}, device "
          f"{cfg.device}, {cfg.workers} worker(s); corpus {corpus['info']['total_bytes']:,} "
          f"bytes", flush=True)
    with Display(jobs, todo, cfg.steps) as show:
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
    res = dict(command=shlex.join(["python", "train_tiny.py", *argv]),
               config=dataclasses.asdict(cfg), routers=routers, seeds=seeds,
               corpus=corpus["info"], hardware=hardware(cfg),
               wall_time_s=time.time() - t_start,                    # this invocation
               train_time_sum_s=sum(r["train_time"] for r in results),  # all runs, incl. resumed
               versions=dict(python=platform.python_version(), torch=torch.__version__,
                             numpy=np.__version__, code_sha256=code_sha256()),
               tokens_per_batch=target_tokens_per_batch(cfg),
               routing_groups=routing_groups(cfg),
               runs=sorted(results, key=lambda r: (r["router"], r["seed"])))
    annotate_distributed(res, argv)
    if _DIST["rank"]:                                  # torchrun: rank 0 reports
        return res
    if cfg.arch == "t5":
        res["span_corruption"] = dict(zip(("n_noise", "n_spans", "enc_len", "dec_len"),
                                          span_counts(cfg)))
    res["analysis"] = compare.analyse(res)
    out = Path(cfg.out)
    _write_json(out / "results.json", res)
    _atomic_write(out / "results.md", lambda t: Path(t).write_text(compare.markdown(res)))
    compare.plot(out / "val_loss.png", res)
    print(compare.console_summary(res))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'val_loss.png'}")
    return res


if __name__ == "__main__":
    try:
        main()
    finally:
        finish_distributed()
