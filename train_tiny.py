"""Tiny pretraining run: expert choice vs top-1/top-2 token choice on real text.

Trains a small byte-level language model on the source code of the Python standard library (no
download), once per (router, seed), and measures how fast each router lowers the held-out loss
at matched activated compute: Zhou et al. 2022 Fig. 2a / 4a at toy scale (EC-CF2 reaches top-2's
perplexity in less than half the steps; EC-CF1 beats top-1), with the controls that say whether
the run could see a difference at all. Statistics, tables and plots: lab/compare.py.

    python train_tiny.py --quick              # first look: 1 seed, top2/ec2/dense (1-2 min)
    python train_tiny.py                      # the default comparison on CPU (~8 min, 2 cores)
    python train_tiny.py --help               # every flag with its default
    python train_tiny.py --dry-run            # two steps of every router, tiny, for CI
    python train_tiny.py --arch t5            # the T5 encoder-decoder with span corruption
    python train_tiny.py --preset gpu         # one GPU: the scale ladder's rung d=512 (rung())
    python train_tiny.py --resume             # continue an interrupted run (same result)
    python train_tiny.py --data notes.txt     # any UTF-8 text file instead of the stdlib
    python -m lab.compare runs/tiny           # statistics of a finished (or partial) run
    python -m lab.sample runs/tiny            # samples at batch size 1 from a finished run
    torchrun --nproc_per_node=2 train_tiny.py --group-size 16   # data + expert parallel
                                              # over 2 processes (lab/distributed.py)

Model (lab/model.py): T5.1.1-style blocks, gated-GELU FFN in even layers, a MoE layer (router
table: moe/routers.py) in odd layers ("every other FFN is MoE", paper Sec. 3); `dense` puts one
GELU FFN of width 2*d_ff there (= the activated FLOPs of top-2 and EC-CF2). --arch lm: decoder-
only causal byte LM, loss on every position (the paper's GLaM setting; the default, where the
positive control passes). --arch t5: encoder-decoder with T5 span corruption (noise density
0.15, mean span 3); the encoder routes over the whole batch. ROUTER_aa (e.g. top2_aa) is the null
control: ROUTER's model and initial weights on another data order; compare must find nothing.
A run is named by its label (moe.routers.resolve): the router's name, plus "@cC" when the run's
capacity factor C (--capacity-factor) is not the router's own, e.g. "ec2@c1".
Token-choice runs add 0.01 * Switch load-balancing loss, EC none (Sec. 4.1); every MoE run adds
1e-3 * router z-loss (ST-MoE). The LM and T5-decoder MoE layers route in group="position"
(tokens sharing a position across the batch, Sec. 6): causal for every router; --group-size g
splits those groups into groups of g sequences (same batch, same data: only the groups change).

Pairing: every router of a seed starts from the same shared weights (init by parameter name) and
sees the same batches (a pure function of (seed, step)); validation batches are fixed and the
same for every run. One seed gives bitwise the same CPU loss curve (workers run one thread each);
not promised on CUDA (scatter-adds there are not bitwise reproducible). Optimiser: AdamW (beta
0.9/0.95, no weight decay, grad-clip 1.0); learning rate: see lr_at.

References: Zhou et al. 2022 (arXiv:2202.09368); Raffel et al. 2020 (T5); Xue et al. 2022 (ByT5);
Fedus et al. 2022 (Switch); Lepikhin et al. 2021 (GShard); Zoph et al. 2022 (ST-MoE z-loss).
Shape legend: B batch, S encoder length, T decoder / LM length, d model width, V vocab.
"""
from __future__ import annotations

import dataclasses
import math
import platform
import shlex
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lab import compare
from lab.checks import check_config, check_world
from lab.cli import check_out_dir, dataclass_parser, flag, given_flags
from lab.corpus import load_corpus
from lab.distributed import World, join, leave, world_size
from lab.evaluation import evaluate, expert_choice_layers, inference_eval, stat_vector, stats_dict
from lab.files import load_checkpoint, save_checkpoint, strict, write_json
from lab.model import DenseFFN, GatedGeluFFN, TinyLM, TinyT5
from lab.runner import Progress, closure_sha256, hardware, import_closure, plan_jobs, run_jobs
from moe.capped import CappedMoE
from moe.routers import ROUTERS, parse_routers, resolve, token_choice
from moe.token_choice import LossFreeMoE

# ----------------------------------------------------------------------------------------------
# Configuration: ONE dataclass; the command line is built from it, so `--help` shows every default.


@dataclass
class Config:
    arch: str = flag("lm", "lm (decoder-only byte LM) | t5 (encoder-decoder, span corruption, "
                     "T5_PRESET)")
    preset: str = flag("auto", "cpu | gpu | auto (gpu on CUDA); gpu: GPU_PRESET, the scale "
                       "ladder's rung d=512 (rung(512), LADDER_ROUTERS + top2_dropless)")
    quick: bool = flag(False, "a first look: one seed of top2, ec2, dense, 150 steps, into "
                       "runs/quick (1-2 min on 2 CPU cores); too little to tell routers apart")
    routers: str = flag("top2,ec2,dense,top2_aa", "comma list from " + ",".join(ROUTERS) + ", "
                        "and ROUTER_aa (null control), ROUTER@cC (at c = C); a run is named "
                        "ROUTER@cC when --capacity-factor C differs from ROUTER's own c; cap2/cap3 "
                        "are 2-3.5x slower on CPU")
    seeds: str = flag("0,1,2", "comma list of seeds (init + data order, paired across routers)")
    steps: int = flag(600, "training steps per run")
    eval_every: int = flag(50, "validate every N steps (and at the last step)")
    val_batches: int = flag(16, "fixed held-out batches per validation (same for every run)")
    batch_size: int = flag(32, "sequences per batch (validation uses the same, see evaluate())")
    chunk_bytes: int = flag(64, "bytes per example (lm: the sequence; t5: before corruption)")
    noise_density: float = flag(0.15, "t5 span corruption: fraction of bytes masked")
    mean_span: float = flag(3.0, "t5 span corruption: mean noise span length")
    d_model: int = flag(64, "model width d")
    d_ff: int = flag(128, "FFN / expert hidden width f")
    n_heads: int = flag(4, "attention heads")
    enc_layers: int = flag(4, "t5 encoder layers (odd ones are MoE); unused by lm")
    dec_layers: int = flag(4, "decoder layers: the whole model in lm (odd ones are MoE)")
    experts: int = flag(16, "experts per MoE layer e")
    capacity_factor: float | None = flag(None, "expert slots per token c of every MoE router "
                                         "(runs named ROUTER@cC where C is not the router's "
                                         "own); None: each router's own (moe/routers.py)")
    group_size: int = flag(0, "lm / t5-decoder MoE layers route in position groups of this many "
                           "sequences (must divide --batch-size); 0 = the whole batch")
    lr: float = flag(3e-3, "peak learning rate")
    warmup: int | None = flag(None, "linear warmup steps to --lr; None: --steps/12 (50 of 600; "
                              "presets: their fraction)")
    decay_start: int | None = flag(None, "constant --lr until this step, then inverse-sqrt decay; "
                                   "0 = right after the warmup; None: --steps/2 (300 of 600)")
    cooldown: int | None = flag(None, "linear decay of the lr to 0 over the last N steps; 0 = off;"
                                " None: --steps/4 (150 of 600)")
    cap_iters: int = flag(100, "LP solver sweeps of cap2/cap3 per forward (moe/capped.py: 1000; "
                          "assets/capped_solver_report.txt)")
    aux_loss_weight: float = flag(0.01, "Switch load-balancing loss weight (token choice only)")
    bias_rate: float = flag(1e-3, "top2_lossfree: step u of the balancing bias after each "
                            "optimizer step, b_i += u sign(mean load - load_i)")
    z_loss_weight: float = flag(1e-3, "router z-loss weight (all MoE routers)")
    decoder_router: str = flag("same", "t5: same | token (flaxformer: top-2 token choice at the "
                               "router's c in the decoder; the console and results.json "
                               "decoder_routers say what each router became)")
    decoder_group: str = flag("position", "routing group in the lm / t5 decoder; only 'position' "
                              "is causal for EC ('batch', the paper's literal n, leaks the future)")
    encoder_group: str = flag("batch", "t5: routing group in the encoder: batch | sequence | "
                              "position")
    data: str = flag("", "UTF-8 text file to train on; empty = the Python stdlib *.py source")
    out: str = flag("runs/tiny", "results directory")
    resume: bool = flag(False, "continue runs from checkpoints / finished runs in --out")
    workers: int = flag(2, "worker processes, --threads torch threads each; 1 = in-process")
    threads: int = flag(1, "torch threads per worker")
    device: str = flag("auto", "auto | cpu | cuda")
    dry_run: bool = flag(False, "two steps of every router, tiny model, into runs/dry_run (CI)")
    stop_after: int = flag(0, "simulate an interruption: stop each run (with a checkpoint) at the "
                           "first validation step >= N; 0 = off")


# The schedule scales with --steps: --warmup, --decay-start and --cooldown not given are these
# fractions of --steps, rounded (600 steps: 50, 300, 150). A preset may bring its own fractions.
SCHEDULE = dict(warmup=1 / 12, decay_start=1 / 2, cooldown=1 / 4)
# The T5 setting of the first release (its results: assets/t5_*). Used for the flags not given.
T5_PRESET = dict(steps=320, eval_every=20, chunk_bytes=96, experts=8,
                 schedule=dict(warmup=3 / 32, decay_start=0, cooldown=0))
# The scale ladder (lab/ladder.py): rungs of width d, the tokens FIXED across rungs (600 steps x
# 32 x 64 bytes, as the paper's sizes shared a step budget). d=64 is the default config; CPU rungs
# 64/128/256, GPU rungs 512/1024. The learning rate scales as 3e-3 * sqrt(64 / d).
LADDER_ROUTERS = "top1,ec1,top2,ec2,et2,dense,top2_aa"      # + top2_dropless when the budget allows
LADDER_LR = {64: 3e-3, 128: 2.1e-3, 256: 1.5e-3, 512: 1.05e-3, 1024: 7.5e-4}


def rung(d):
    """Config fields of ladder rung d: widths scale with d, everything else (tokens, steps,
    schedule, experts, layers) is the default config's."""
    return dict(d_model=d, d_ff=2 * d, n_heads=max(4, d // 64), lr=LADDER_LR[d])


# One CUDA GPU continues the ladder: rung 512 with every ladder router and top2_dropless.
GPU_PRESET = dict(rung(512), workers=1, routers=LADDER_ROUTERS + ",top2_dropless")
QUICK = dict(seeds="0", routers="top2,ec2,dense", steps=150, eval_every=25, out="runs/quick")
DRY_RUN = dict(steps=2, eval_every=1, val_batches=2, batch_size=4, chunk_bytes=48, d_model=32,
               d_ff=32, n_heads=2, enc_layers=2, dec_layers=2, experts=4, workers=1,
               seeds="0,1", routers=",".join(ROUTERS) + ",top2_aa", out="runs/dry_run",
               schedule=dict(warmup=1 / 2, decay_start=0, cooldown=0))
# Fields that change the result of a run (a checkpoint made with other values cannot be resumed):
# all but these.
RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.name not in (
    "preset", "quick", "routers", "seeds", "out", "resume", "workers", "threads", "device",
    "dry_run", "stop_after"))

# ----------------------------------------------------------------------------------------------
# Data: byte vocabulary, deterministic batches from (seed, step).

PAD, EOS, BYTE0 = 0, 1, 2          # token = byte + 2; t5 sentinels follow the 256 bytes
SENTINEL0 = BYTE0 + 256
VAL_SEED = 10_000                  # validation batches are the same for every router and seed
AA_DATA_SEED = 7_919               # data seed offset of an A/A run (ROUTER_aa)


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


def random_segmentation(n_items, n_segments, rng):
    """Split n_items into n_segments positive lengths uniformly at random (T5's helper)."""
    cuts = np.sort(rng.choice(n_items - 1, n_segments - 1, replace=False) + 1)
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def span_corrupt(chunk, rng, cfg):
    """T5 span corruption of one byte chunk [L] -> inputs [S], targets [T] (token ids).

    Spans alternate keep/noise starting with keep (T5's random_spans_noise_mask); each noise span
    becomes one sentinel in the inputs and `sentinel + span` in the targets; both end with EOS."""
    n_noise, n_spans, _, _ = span_counts(cfg)
    noise = random_segmentation(n_noise, n_spans, rng)
    keep = random_segmentation(len(chunk) - n_noise, n_spans, rng)
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


# ----------------------------------------------------------------------------------------------
# Model: lab/model.py's blocks; here, which FFN each layer gets and the paired initialisation.


def layer_router(cfg, router, stack):
    """The router (moe.routers.resolve) of the MoE layers of `stack` in a run of `router`: the
    run's own, except that --decoder-router token gives the t5 decoder top-2 token choice at the
    same c (flaxformer) in place of any router that is not token choice."""
    r = resolve(router, cfg.capacity_factor)
    if stack == "dec" and cfg.decoder_router == "token" and r.layer is not None \
            and not r.token_choice:
        return resolve("top2", r.capacity_factor)
    return r


def make_ffn(cfg, router, stack, i):
    """The FFN of layer i: gated GELU in even layers; in odd layers the MoE layer of
    layer_router, or the dense FFN of width 2f for router 'dense'."""
    if i % 2 == 0:
        return GatedGeluFFN(cfg.d_model, cfg.d_ff)
    r = layer_router(cfg, router, stack)
    if r.layer is None:
        return DenseFFN(cfg.d_model, 2 * cfg.d_ff)
    extra = dict(max_iter=cfg.cap_iters) if r.layer is CappedMoE else \
        dict(bias_rate=cfg.bias_rate) if r.layer is LossFreeMoE else {}
    group = cfg.encoder_group if stack == "enc" else cfg.decoder_group
    return r.build(cfg.d_model, cfg.d_ff, cfg.experts, group=group, **extra)


def build_model(cfg, router):
    """The model of `router` (lab/model.py), its FFNs from make_ffn; weights uninitialised."""
    n_enc = cfg.enc_layers if cfg.arch == "t5" else 0
    ffns = {s: [make_ffn(cfg, router, s, i) for i in range(n)]
            for s, n in (("enc", n_enc), ("dec", cfg.dec_layers))}
    if cfg.arch == "lm":
        return TinyLM(vocab_size(cfg), cfg.d_model, cfg.n_heads, ffns["dec"], cfg.group_size)
    return TinyT5(vocab_size(cfg), cfg.d_model, cfg.n_heads, ffns["enc"], ffns["dec"],
                  cfg.group_size)


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
# One training step.


def lr_at(step, cfg):
    """Linear warmup to cfg.lr, constant until decay_start, then inverse-square-root decay
    (step counts from 1; the paper: constant for 10K steps, then inverse-sqrt, Sec. 3); times a
    linear cooldown to 0 over the last cfg.cooldown steps, if any (warmup-stable-decay's end).

    The three lengths scale with --steps unless given (SCHEDULE: 1/12, 1/2, 1/4 of the run; 50,
    300, 150 at the default 600 steps), so a shorter run keeps the shape of the schedule: fixed
    step counts made --steps 60 warm up for 50 steps inside a 150-step cooldown, at 8% of the peak
    rate on average. Given lengths whose warmup and cooldown cover more than the run are
    refused (lab/checks.py)."""
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
        if token_choice(type(moe)):
            loss = loss + cfg.aux_loss_weight * o.aux_loss
    return ce, loss, outs


def train_step(model, opt, batch, step, cfg, world):
    """One AdamW step on one batch (this rank's rows of it) -> (cross-entropy, MoE outputs).
    Then top2_lossfree's balancing biases move, once per optimizer step (LossFreeMoE.update_bias;
    with gradient accumulation: after the last micro-batch, never per micro-batch)."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    ce, loss, outs = loss_fn(model, batch, cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    world.reduce_and_clip(model, 1.0)     # one process: clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    for _, moe in model.moe_layers():
        if isinstance(moe, LossFreeMoE):  # b_i += u sign(mean load - load_i), loads of this step
            moe.update_bias()
    return ce.detach(), outs


# ----------------------------------------------------------------------------------------------
# One run per (router, seed): train, validate (lab/evaluation.py), checkpoint, measure
# inference at batch size 1, save.


def run_paths(cfg, router, seed, world=World()):
    """(checkpoint, finished-run JSON) of one run; under torchrun one checkpoint per rank."""
    out = Path(cfg.out)
    return (out / "ckpt" / f"{router}_s{seed}{world.suffix}.pt",
            out / "runs" / f"{router}_s{seed}.json")


def model_path(run_dir, router, seed):
    """Final weights of a finished run: dict(model=state_dict, config=Config as a dict, router,
    seed). Saved by run_one, read by load_model (lab.sample, finetune.py)."""
    return Path(run_dir) / "models" / f"{router}_s{seed}.pt"


def load_model(run_dir, router, seed, device="cpu"):
    """-> (model in eval mode, Config) of a finished run (weights_only: never runs pickled code)."""
    saved = load_checkpoint(model_path(run_dir, router, seed), ("model", "config"), "saved model")
    fields = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in saved["config"].items() if k in fields})
    model = build_model(cfg, router)
    model.load_state_dict(saved["model"])
    return model.to(device).eval(), cfg


def code_files():
    """The files a run's result depends on: train_tiny.py and every project file it imports, at
    any depth (lab.runner.import_closure: derived from the imports, not a hand-kept list). The
    whole closure, report-only modules too (lab/compare, lab/stats write results.md, not the
    losses): the simplest rule that cannot miss a file, at the price that a change to the
    report also stops a --resume (remove the checkpoints or use another --out)."""
    return import_closure(Path(__file__).parent, "train_tiny.py")


def code_sha256():
    """Hash of the code that determines a run's result (the files of code_files())."""
    return closure_sha256(Path(__file__).parent, "train_tiny.py")


def result_config(cfg, corpus_info=None, world=World()):
    """The fields a resumed run must share with its checkpoint: result-changing flags, the
    corpus hash (the default corpus is whatever stdlib is installed) and the code hash."""
    rc = {k: getattr(cfg, k) for k in RESULT_FIELDS}
    if world.size > 1:                              # torchrun: W changes the routing groups
        rc["world_size"] = world.size
    if corpus_info is not None:
        rc.update(corpus_sha256=corpus_info["sha256"], code_sha256=code_sha256())
    return rc


CKPT_EVERY_EVALS = 4   # checkpoint every 4th validation (and when --stop-after stops a run)
CKPT_KEYS = ("model", "opt", "step", "log", "rng", "config")


def job_name(router, seed):              # of a run, in the progress lines
    return f"{router:>13} s{seed}"


@dataclass
class Run:
    """One (router, seed) run between steps: what run_one's parts share. router: its label
    (moe.routers.resolve); log: everything a checkpoint and the result keep; vals: the fixed
    validation batches (this rank's rows); names, ec: the MoE layers' names and the expert-choice
    layers (lab.evaluation); the window since the last validation: routing statistics win
    [n_moe, 9], training losses win_loss (left on the device), win_n steps."""
    cfg: Config
    router: str
    seed: int
    data_seed: int
    world: World
    device: torch.device
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    log: dict
    start: int                          # first step to train
    vals: list
    names: list
    ec: list
    win: torch.Tensor
    win_loss: list = dataclasses.field(default_factory=list)
    win_n: int = 0


def start_or_resume(cfg, router, seed, corpus, world):
    """Build the run's model (paired init) and optimiser, and restore model, optimiser, RNG,
    step and log from its checkpoint when --resume finds one. -> Run."""
    device = torch.device(cfg.device)
    torch.manual_seed(seed)
    model = build_model(cfg, router)
    init_weights(model, seed)
    world.shard(model).to(device)           # torchrun: this rank's experts only
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.0)
    names, ec = [n for n, _ in model.moe_layers()], expert_choice_layers(model)
    log = dict(train_loss=[], val_step=[], val_loss=[], val_batch_loss=[], val_time=[],
               stats_window=[], stats_sum=[[0.0] * 9 for _ in names], train_time=0.0,
               stat_steps=0, val_loss_threshold=[], thresholds=[])
    start, ckpt_path = 0, run_paths(cfg, router, seed, world)[0]
    if cfg.resume and ckpt_path.exists():   # main checked its config. RNG states stay on
        ck = load_checkpoint(ckpt_path, CKPT_KEYS)   # the CPU; load_state_dict moves the rest
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        torch.set_rng_state(ck["rng"])
        if device.type == "cuda" and "cuda_rng" in ck:
            torch.cuda.set_rng_state(ck["cuda_rng"], device)
        start, log = ck["step"], ck["log"]
    data_seed = seed + AA_DATA_SEED if resolve(router).null_control else seed
    return Run(cfg, router, seed, data_seed, world, device, model, opt, log, start,
               [world.rows(b) for b in val_batches(corpus, cfg)], names, ec,
               torch.zeros(len(names), 9, dtype=torch.float64, device=device))


def add_to_window(run, ce, outs):
    """One step's loss (left on the device until the next validation) and routing statistics."""
    run.win_loss.append(ce)
    if run.names:
        run.win += torch.stack([stat_vector(o.stats) for o in outs])        # [n_moe, 9]
    run.win_n += 1


def validate_and_log(run, step):
    """At a validation step: the window's training losses and routing statistics into the log
    (averaged over ranks under torchrun), the validation loss as in training (and, for expert
    choice, with the learned thresholds), then an empty window."""
    log, world = run.log, run.world
    world.average_window(run.win_loss, run.win)         # torchrun: the global batch's
    log["train_loss"] += torch.stack(run.win_loss).tolist()
    batch_losses = evaluate(run.model, run.vals, run.device, world=world)
    log["val_step"].append(step)
    log["val_loss"].append(float(np.mean(batch_losses)))
    log["val_batch_loss"].append(batch_losses)
    log["val_time"].append(log["train_time"])
    if run.ec:  # inference thresholds: their drift, and the loss they give
        log["thresholds"].append([m.threshold.tolist() for m in run.ec])
        log["val_loss_threshold"].append(float(np.mean(
            evaluate(run.model, run.vals, run.device, "threshold", world=world))))
    if run.names:
        log["stats_window"].append((run.win / run.win_n).tolist())
        total = torch.tensor(log["stats_sum"], dtype=torch.float64) + run.win.cpu()
        log["stats_sum"] = total.tolist()  # plain lists: weights_only checkpoints
        log["stat_steps"] += run.win_n
    run.win.zero_()
    run.win_loss, run.win_n = [], 0


def progress(run, step):
    """The progress message of a validation step (lab.runner.Progress shows it)."""
    log = run.log
    return dict(job=job_name(run.router, run.seed), step=step, info=f"train "
                f"{log['train_loss'][-1]:.3f}  val {log['val_loss'][-1]:.3f}  "
                f"{log['train_time'] / step:.3f} s/step")


def maybe_checkpoint(run, step, corpus):
    """Checkpoint every CKPT_EVERY_EVALS-th validation, and where --stop-after stops the run
    (only at validation steps, where the windows are empty). -> whether to stop here."""
    cfg = run.cfg
    stop = bool(cfg.stop_after) and step >= cfg.stop_after and step < cfg.steps
    if stop or step % (cfg.eval_every * CKPT_EVERY_EVALS) == 0:
        state = dict(model=run.model.state_dict(), opt=run.opt.state_dict(), step=step,
                     log=run.log, rng=torch.get_rng_state(),
                     config=result_config(cfg, corpus["info"], run.world))
        if run.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(run.device)
        save_checkpoint(run_paths(cfg, run.router, run.seed, run.world)[0], state)  # every rank
    return stop


def finish_result(run, corpus):
    """The finished run's result dict: curves, routing statistics, inference at batch size 1;
    saved (rank 0) with the final weights, and the checkpoint removed."""
    cfg, log, world, model, names = run.cfg, run.log, run.world, run.model, run.names
    S = torch.tensor(log["stats_sum"], dtype=torch.float64) / max(log["stat_steps"], 1)
    result = dict(router=run.router, seed=run.seed, data_seed=run.data_seed, steps=cfg.steps,
                  n_params=world.count_parameters(model), train_loss=log["train_loss"],
                  val_step=log["val_step"], val_loss=log["val_loss"],
                  val_batch_loss=log["val_batch_loss"], val_time=log["val_time"],
                  final_val=log["val_loss"][-1], train_time=log["train_time"],
                  s_per_step=log["train_time"] / cfg.steps,
                  tokens_per_s=target_tokens_per_batch(cfg) * cfg.steps / log["train_time"],
                  moe_layers=names,
                  stats={n: stats_dict(S[i]) for i, n in enumerate(names)},
                  stats_over_training={n: [stats_dict(w[i]) for w in log["stats_window"]]
                                       for i, n in enumerate(names)},
                  config=result_config(cfg, corpus["info"], world),
                  inference=inference_eval(model, run.vals, run.device, world),
                  capacity_factor=resolve(run.router, cfg.capacity_factor).capacity_factor)
    if run.ec:
        # threshold routing at the training batch size: the last validation measured it
        result["inference"]["threshold_B"] = log["val_loss_threshold"][-1]
        ec_names = [n for n, m in model.moe_layers() if m in run.ec]
        result.update(val_loss_threshold=log["val_loss_threshold"],
                      thresholds_over_training={n: [t[i] for t in log["thresholds"]]
                                                for i, n in enumerate(ec_names)})
    weights = {k: v.detach().cpu() for k, v in world.full_state(model).items()}  # collective
    ckpt_path, done_path = run_paths(cfg, run.router, run.seed, world)
    if world.rank == 0:
        save_checkpoint(model_path(cfg.out, run.router, run.seed), dict(
            model=weights, config=dataclasses.asdict(cfg), router=run.router, seed=run.seed))
        write_json(done_path, result)
    ckpt_path.unlink(missing_ok=True)
    return result


def run_one(cfg, router, seed, corpus, world=World(), report=print):
    """Train one (router, seed); returns its result dict (None if stopped by --stop-after).

    `router` is a label (moe.routers.resolve); ROUTER_aa: the same model and init as ROUTER,
    data order of another seed. The loop: a step, and at each validation step validate, report,
    maybe checkpoint; the parts above do the rest."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        run = start_or_resume(cfg, router, seed, corpus, world)
        for step in range(run.start, cfg.steps):
            batch = [t.to(run.device) for t in world.rows(train_batch(corpus, run.data_seed,
                                                                       step, cfg))]
            t0 = time.perf_counter()
            ce, outs = train_step(run.model, run.opt, batch, step, cfg, world)
            if run.device.type == "cuda":
                torch.cuda.synchronize()        # for the step time only: one sync per step
            run.log["train_time"] += time.perf_counter() - t0
            add_to_window(run, ce, outs)
            if (step + 1) % cfg.eval_every and step + 1 != cfg.steps:
                continue
            validate_and_log(run, step + 1)
            report(progress(run, step + 1))
            if maybe_checkpoint(run, step + 1, corpus):
                return None
        return finish_result(run, corpus)
    finally:
        torch.set_num_threads(old_threads)


# ----------------------------------------------------------------------------------------------
# Command line and main.


def build_parser():
    return dataclass_parser(
        Config, "train_tiny.py", __doc__.split("\n\n")[0],
        "Presets (they fill the flags you did not give; schedule = fractions of --steps): "
        + "; ".join(f"{n}: " + ", ".join(f"{k}={v}" for k, v in p.items()) for n, p in (
            ("t5", T5_PRESET), ("gpu", GPU_PRESET), ("quick", QUICK), ("dry run", DRY_RUN))))


def parse_config(argv):
    """argv -> (Config, parser). Presets fill only the flags the user did not give; the schedule
    flags not given become fractions of --steps (SCHEDULE, or the preset's)."""
    parser = build_parser()
    cfg = Config(**vars(parser.parse_args(argv)))
    given = given_flags(Config, argv)
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.preset == "auto":
        cfg.preset = "gpu" if cfg.device == "cuda" else "cpu"
    schedule = dict(SCHEDULE)
    for on, preset in ((cfg.arch == "t5", T5_PRESET), (cfg.preset == "gpu", GPU_PRESET),
                       (cfg.quick, QUICK), (cfg.dry_run, DRY_RUN)):
        for k, v in preset.items() if on else ():
            if k == "schedule":
                schedule.update(v)
            elif k not in given:
                setattr(cfg, k, v)
    for k, fraction in schedule.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, round(fraction * cfg.steps))
    check_config(cfg, parser, routing_groups)
    return cfg, parser


def routing_groups(cfg):
    """[(stack, group, n tokens per routing group)] of the MoE layers of this config."""
    def n(group, B, T):
        return {"batch": B * T, "sequence": T, "position": B}[group]
    g, T = cfg.group_size or cfg.batch_size, cfg.chunk_bytes
    if cfg.arch == "lm":
        return [("lm", cfg.decoder_group, n(cfg.decoder_group, g, T))]
    _, _, S, T = span_counts(cfg)
    return [("encoder", cfg.encoder_group, n(cfg.encoder_group, cfg.batch_size, S))] + (
        [("decoder", cfg.decoder_group, n(cfg.decoder_group, g, T))]
        if cfg.decoder_router == "same" else [])


def validation_routing(cfg, world_size=1):
    """How validation routes, in words: the console's first lines and results.json's
    "validation_routing". cfg: the config of one process (under torchrun its batch)."""
    stacks = routing_groups(dataclasses.replace(cfg, decoder_router="same"))
    where = "; ".join(f"{stack}: {group} groups of n={n} tokens" for stack, group, n in stacks)
    return (f"val_loss routes as in training: every MoE layer in its training groups ({where}) "
            f"of validation batches of the training size ({cfg.batch_size} sequences"
            + (f" per process, {world_size} processes" if world_size > 1 else "") + "), expert "
            "threshold (et*) by its thresholds as in training; val_loss_threshold (runs with "
            "expert-choice layers): those layers route each token by their learned thresholds "
            "instead; inference: the same batches one sequence at a time (group_1 routed as in "
            "training, threshold_1 expert choice by thresholds)")


def decoder_routers(cfg, routers):
    """--decoder-router token: {run label: the router of its t5 decoder's MoE layers}, e.g.
    {"ec2": "top2", "ec1": "top2@c1", "top2": "top2", "dense": "dense"}; None otherwise."""
    if cfg.decoder_router != "token":
        return None
    return {r: layer_router(cfg, r, "dec").label for r in routers}


def join_world(cfg, parser):
    """Under torchrun: check the config for W processes, join them (lab/distributed.py)."""
    if world_size() > 1:
        W = world_size()
        check_world(cfg, parser, W)
        per_rank = dataclasses.replace(cfg, batch_size=cfg.batch_size // W)
        check_config(per_rank, parser, routing_groups)    # capped EC: per-rank groups
        cfg.workers = 1                                   # one run at a time, on all W
    return join(cfg.device)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    t_start = time.time()
    cfg, parser = parse_config(argv)
    world = join_world(cfg, parser)
    try:
        return train_all(cfg, parser, argv, world, t_start)
    finally:
        leave(world)


def train_all(cfg, parser, argv, world, t_start):
    """Every (router, seed) run of the config (resuming what --resume finds), then the report."""
    check_out_dir(cfg.out, parser)
    routers = parse_routers(cfg.routers, cfg.capacity_factor)     # labels: "ec2", "ec2@c1", ...
    seeds = [int(s) for s in cfg.seeds.split(",")]
    try:
        corpus = load_corpus(cfg.data, cfg.chunk_bytes)
    except ValueError as e:
        parser.error(str(e))
    jobs = [(r, s) for s in seeds for r in routers]       # seed-major: early results are paired
    try:
        results, start = plan_jobs(jobs, lambda job: run_paths(cfg, *job, world),
                                   result_config(cfg, corpus["info"], world), cfg.resume, CKPT_KEYS)
    except ValueError as e:
        parser.error(f"--resume: {e}")
    remaining = {job_name(*job): cfg.steps - step for job, step in start.items()}
    every = world.gather(remaining)     # torchrun: every rank must resume the same runs and steps
    if any(other != every[0] for other in every):
        parser.error(f"--resume: the per-rank checkpoints in {cfg.out}/ckpt disagree between the "
                     f"{world.size} processes (steps left per rank: {every}); remove them to "
                     "restart those runs, or use another --out")
    print(f"train_tiny: {len(jobs)} runs ({len(results)} already done), arch {cfg.arch}, routers "
          f"{routers}, seeds {seeds}, {cfg.steps} steps, preset {cfg.preset}, device "
          f"{cfg.device}, {cfg.workers} worker(s); corpus {corpus['info']['total_bytes']:,} "
          f"bytes" + (" (--quick: a first look, see the note at the end)" if cfg.quick else ""),
          flush=True)
    per_rank = dataclasses.replace(cfg, batch_size=cfg.batch_size // world.size)
    validation = validation_routing(per_rank, world.size)
    decoder = decoder_routers(cfg, routers)
    print(f"validation: {validation}", flush=True)
    if decoder:
        print("--decoder-router token: the t5 decoder's MoE layers are " + ", ".join(
            f"{r} -> {d}" for r, d in decoder.items()), flush=True)
    with Progress([job_name(r, s) for r, s in jobs], remaining, cfg.steps) as show:
        results += run_jobs(run_one, [(cfg, r, s, corpus, world) for r, s in start], cfg.workers,
                            report=show)
    if any(r is None for r in results):
        print(f"stopped at step {cfg.stop_after} (--stop-after); continue with --resume")
        return None
    res = dict(command=shlex.join(["python", "train_tiny.py", *argv]),
               config=dataclasses.asdict(cfg), routers=routers, seeds=seeds,
               corpus=corpus["info"], hardware=hardware(cfg.device, cfg.workers, cfg.threads),
               wall_time_s=time.time() - t_start,                    # this invocation
               train_time_sum_s=sum(r["train_time"] for r in results),  # all runs, incl. resumed
               versions=dict(python=platform.python_version(), torch=torch.__version__,
                             numpy=np.__version__, code_sha256=code_sha256()),
               tokens_per_batch=target_tokens_per_batch(cfg), routing_groups=routing_groups(cfg),
               validation_routing=validation,
               runs=sorted(results, key=lambda r: (r["router"], r["seed"])))
    if decoder:
        res["decoder_routers"] = decoder
    if world.size > 1:
        res["command"] = shlex.join(["torchrun", f"--nproc_per_node={world.size}", "train_tiny.py",
                                     *argv])
        res["distributed"] = dict(world.describe(), batch_per_process=cfg.batch_size // world.size)
        res["hardware"]["summary"] += f", {world.size} torchrun processes ({world.backend})"
        res["routing_groups"] = routing_groups(per_rank)
    if world.rank:                                    # torchrun: rank 0 reports
        return res
    if cfg.arch == "t5":
        res["span_corruption"] = dict(zip(("n_noise", "n_spans", "enc_len", "dec_len"),
                                          span_counts(cfg)))
    out = Path(cfg.out)
    res = strict(res)                     # what results.json holds: no NaN, no infinity
    write_json(out / "results.json", res)                  # the runs, even if the analysis fails
    res["analysis"] = compare.analyse(res)
    compare.write(out, res)                               # results.json, results.md, differences.png
    print(compare.console_summary(res))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'differences.png'}")
    if cfg.quick:
        print(f"\n--quick: {len(seeds)} seed, {cfg.steps} steps: a first look.\n"
              "  It shows: that the pipeline runs, and what the loss curves look like.\n"
              "  It cannot show whether one router is better: one seed has no seed-to-seed "
              "spread,\n  so no interval, and neither the positive control nor any difference "
              "can pass.\n  The comparison: python train_tiny.py (3 seeds, 600 steps, the A/A "
              "null control; ~8 min on 2 CPU cores).")
    return res


if __name__ == "__main__":
    main()
