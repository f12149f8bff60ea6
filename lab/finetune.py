"""Fine-tuning after pretraining: does expert choice fine-tune better on downstream tasks?

What it does
    The paper's second claim (Zhou et al. 2022, Sec. 4.3, Table 2): after pretraining, expert
    choice fine-tunes better on GLUE / SuperGLUE (100M/32E, average: top-1 80.6, top-2 83.5,
    EC-CF2 85.0). GLUE cannot be downloaded here, so lab/finetune_tasks.py builds a small
    downstream suite from the Python standard library source (parsed with `ast`); this tool
    fine-tunes every finished train_tiny run (every router, every seed) on it with one recipe,
    then compares the routers paired by seed, with a positive and a null control judged by the
    analysis plan's rules (docs/analysis_plan.md, lab/stats.py).
    Three files: the task suite (lab/finetune_tasks.py: ident, valid, root from held-out stdlib
    files, their metrics), this tool (the fine-tuning loop, its bookkeeping and the command
    line) and the report (lab/finetune_report.py: scores, paired differences, the controls, Holm
    over the comparisons, finetune.md and finetune.png, on lab/stats and lab/compare).

Run
    python train_tiny.py --routers top1,top2,ec1,ec2,top2_dropless,dense,top2_aa --out runs/ft
    python -m lab.finetune runs/ft             # every router and seed of the run, 3 tasks
                                               # (+ scratch); ~8 min on 2 CPU cores for 7
                                               # routers x 3 seeds (extrapolated from a
                                               # measured 5-model, 1-seed run: 109 s)
    python -m lab.finetune runs/ft --help      # every flag with its default
    python -m lab.finetune runs/ft --resume    # skip the (router, seed, task) already finished
    python -m lab.finetune runs/dry --dry-run  # 2 steps per task on a tiny suite, for tests/CI
                                               # (runs/dry: train_tiny.py --dry-run --out runs/dry)
    python -m lab.finetune_report runs/ft/finetune.json --out DIR   # the report again, alone

Fine-tuning recipe (one for every run; the defaults below are the committed recipe)
    AdamW (beta 0.9/0.95, eps 1e-8, no weight decay), grad-clip 1.0, --lr with linear warmup over
    --warmup steps and linear decay to 0 at --steps; --batch-size examples per step drawn without
    replacement from the task's train split by default_rng([seed, task, step]): every router of
    a seed sees the same batches (paired). Loss: cross-entropy on the answer tokens only, plus
    the router losses of pretraining with the same weights (z-loss for every MoE, Switch
    load-balancing loss for token choice; train_tiny.loss_fn). Routing as in pretraining: the
    same layers, capacity factor c and position groups, over the fine-tuning batch; evaluation
    (validation and test, once, after the last step) uses the same batch size (the last batch is
    filled with repeats of the split's first examples, which are not scored), the same c and the
    layers' default group routing (not ecmoe's threshold routing for inference).
    Both --arch modes of the pretraining run: lm (sequence = prompt then answer) and t5 (encoder
    gets the prompt, decoder produces the answer, starting from PAD as in pretraining).

Controls and comparisons: lab/finetune_report.py. The positive control "scratch" is this
fine-tuning from a randomly initialised (train_tiny.init_weights, per seed) dense model; the null
control is top2_aa vs top2.

Outputs (written atomically into RUN_DIR, or --out): finetune_runs/TASK_ROUTER_sSEED.json as
each fine-tuning finishes (--resume skips those), and at the end finetune.json (every raw score,
recipe, suite, command, hardware, wall time), finetune.md (tables with baselines beside) and
finetune.png (per-task scores with 95% CIs; paired differences, lab/compare's forest plot).

References: Zhou et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS 2022
(arXiv:2202.09368), Sec. 4.3 and Table 2; Raffel et al. 2020 (T5 fine-tuning as text-to-text,
rank classification).

Shape legend: B batch, P prompt length, A answer length, S encoder length, T decoder / LM length,
V vocab, K number of labels, N examples.
"""
from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing as mp
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import train_tiny as tt
from ecmoe import expert_capacity
from lab import finetune_report as report
from lab.cli import check_out_dir, dataclass_parser, flag, given_flags
from lab.evaluation import routed_as
from lab.files import clock, load_checkpoint, read_json, write_json
from lab.finetune_tasks import (IDENT_MIN_BYTES, ROOT_MIN_BYTES, TASKS, accuracy, build_suite,
                                decode_answer, exact_match, rank_classify, suite_summary,
                                task_names)
from lab.runner import closure_sha256, hardware
from moe.capped import CappedMoE
from moe.routers import resolve
from moe.token_choice import LossFreeMoE

PAD, EOS, BYTE0 = tt.PAD, tt.EOS, tt.BYTE0
ROOT = Path(__file__).resolve().parent.parent     # the project root (code_sha256)


@dataclass
class Config:
    run_dir: str = flag("", "pretraining run directory (train_tiny --out) holding "
                        "models/ROUTER_sSEED.pt")
    routers: str = flag("", "comma list of pretrained routers to fine-tune; empty = every router "
                        "of RUN_DIR/results.json (else of RUN_DIR/models/)")
    seeds: str = flag("", "comma list of seeds; empty = every seed of the run")
    tasks: str = flag("ident,valid,root", "comma list of tasks from ident, valid, root")
    no_scratch: bool = flag(False, "skip the positive control (dense from random init per seed)")
    steps: int = flag(120, "fine-tuning steps per (router, seed, task)")
    lr: float = flag(2e-3, "peak learning rate (linear warmup, then linear decay to 0)")
    warmup: int = flag(12, "linear warmup steps")
    batch_size: int = flag(32, "examples per step; evaluation uses the same (routing groups!)")
    train_examples: int = flag(4096, "examples in each task's train split")
    val_examples: int = flag(256, "examples in each validation split (fewer if the held-out files "
                             "have fewer)")
    test_examples: int = flag(1024, "examples in each test split (fewer if the held-out files have "
                              "fewer)")
    context_bytes: int = flag(40, "ident: bytes of code before the identifier in the prompt")
    answer_bytes: int = flag(11, "ident: longest answer (rest of the identifier + EOS) in tokens; "
                             "generation stops after this many")
    stmt_bytes: int = flag(40, "valid / root: longest statement / expression in bytes")
    out: str = flag("", "output directory; empty = RUN_DIR (dry run: RUN_DIR/finetune_dry_run)")
    resume: bool = flag(False, "reuse the finished per-(router, seed, task) results in --out")
    workers: int = flag(2, "worker processes (each torch.set_num_threads(--threads)); 1 = in-process")
    threads: int = flag(1, "torch threads per worker")
    device: str = flag("auto", "auto | cpu | cuda")
    dry_run: bool = flag(False, "2 steps per task on a tiny suite (for tests / CI)")


DRY_RUN = dict(steps=2, warmup=1, batch_size=4, train_examples=16, val_examples=6,
               test_examples=6, context_bytes=32, stmt_bytes=32, workers=1)
# Fields that change a fine-tuning result (a finished result made with others is not reused).
RESULT_FIELDS = ("steps", "lr", "warmup", "batch_size", "train_examples", "val_examples",
                 "test_examples", "context_bytes", "answer_bytes", "stmt_bytes")
SCRATCH = report.SCRATCH     # the positive control's pseudo-router
DATA_SEED = 31_337           # fine-tuning batch order: default_rng([DATA_SEED, seed, task, step])
EVAL_SEED = tt.VAL_SEED      # torch seed during evaluation (top2_gshard's random draws)


def build_parser():
    return dataclass_parser(
        Config, "python -m lab.finetune", __doc__.split("\n\n")[0],
        "dry run: " + ", ".join(f"{k}={v}" for k, v in DRY_RUN.items()), positional=("run_dir",))


def parse_config(argv):
    """argv -> (Config, parser); --dry-run fills only the flags the user did not give."""
    parser = build_parser()
    cfg = Config(**vars(parser.parse_args(argv)))
    given = given_flags(Config, argv, positional=("run_dir",))
    if cfg.dry_run:
        for k, v in DRY_RUN.items():
            if k not in given:
                setattr(cfg, k, v)
    if not cfg.out:
        cfg.out = str(Path(cfg.run_dir) / "finetune_dry_run") if cfg.dry_run else cfg.run_dir
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    validate(cfg, parser)
    return cfg, parser


def task_list(cfg):
    return task_names(cfg.tasks)


def validate(cfg, parser):
    """Clear errors (SystemExit via parser.error) naming the flag. Checks against RUN_DIR
    (routers, seeds, batch size vs routing groups) are in resolve_run()."""
    tasks = task_list(cfg)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks or len(set(tasks)) != len(tasks):
        parser.error(f"--tasks: expected distinct tasks from {', '.join(TASKS)}; got "
                     f"{cfg.tasks!r}")
    for name in ("steps", "batch_size", "train_examples", "val_examples", "test_examples",
                 "workers", "threads"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {cfg.warmup}")
    if not cfg.lr > 0:
        parser.error(f"--lr must be > 0, got {cfg.lr}")
    if cfg.train_examples < cfg.batch_size:
        parser.error(f"--train-examples ({cfg.train_examples}) must be >= --batch-size "
                     f"({cfg.batch_size}): batches are drawn without replacement")
    for name, lo in (("context_bytes", 8), ("stmt_bytes", ROOT_MIN_BYTES), ("answer_bytes",
                                                                               IDENT_MIN_BYTES)):
        if getattr(cfg, name) < lo:
            parser.error(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(cfg, name)}")
    if cfg.device not in ("cpu", "cuda"):
        parser.error(f"--device: {cfg.device!r} not in ('auto', 'cpu', 'cuda')")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if cfg.routers and SCRATCH in cfg.routers.split(","):
        parser.error(f"--routers: {SCRATCH!r} is the positive control, added unless "
                     "--no-scratch; not a pretrained router")
    for name in ("routers", "seeds"):
        if getattr(cfg, name) and not [x for x in getattr(cfg, name).split(",") if x.strip()]:
            parser.error(f"--{name}: empty list {getattr(cfg, name)!r}")
    if cfg.seeds:
        try:
            [int(s) for s in cfg.seeds.split(",")]
        except ValueError:
            parser.error(f"--seeds: expected comma-separated integers, got {cfg.seeds!r}")


# ----------------------------------------------------------------------------------------------
# Model inputs and metrics.


def make_batch(data, idx, arch):
    """Examples idx of a split -> (*model inputs, targets); targets are -100 except on answers.

    lm: ids = prompt then answer[:-1]: ids [B, P + A - 1], targets [B, P + A - 1] (the answer
        sits at positions P-1 .. P+A-2; a 1-byte answer needs the prompt only).
    t5: enc [B, P] = prompt; dec_in [B, A] = PAD then answer[:-1]; targets [B, A] = answer."""
    prompt = torch.from_numpy(data["prompt"][idx])                       # [B, P]
    answer = torch.from_numpy(data["answer"][idx])                       # [B, A]
    tgt = answer.masked_fill(answer == PAD, -100)                        # [B, A]
    if arch == "lm":
        ids = torch.cat([prompt, answer[:, :-1]], dim=1)                 # [B, P + A - 1]
        ignore = torch.full((len(idx), prompt.shape[1] - 1), -100)
        return ids, torch.cat([ignore, tgt], dim=1)                      # [B, P + A - 1]
    dec_in = torch.cat([torch.full_like(answer[:, :1], PAD), answer[:, :-1]], dim=1)
    return prompt, dec_in, tgt


def finetune_loss(model, batch, cfg_pre):
    """Cross-entropy on the answer tokens + the router losses of pretraining (same weights):
    train_tiny.loss_fn, i.e. z_loss_weight * z-loss for every MoE layer, aux_loss_weight *
    load-balancing loss for token choice. Targets -100 (everything but the answers) are ignored
    (F.cross_entropy's default ignore_index). -> (ce, loss)."""
    ce, loss, _ = tt.loss_fn(model, batch, cfg_pre)
    return ce, loss


@torch.no_grad()
def generate(model, prompt, arch, max_len, stop_token):
    """Greedy batched decoding: prompt [B, P] -> tokens [B, max_len]. A row that emitted the
    stop token continues with PAD, as after the answer in training (its tokens still share
    the position groups of the other rows). No key-value cache: the whole sequence is re-run per
    byte (simple; the answers are short)."""
    B = prompt.shape[0]
    out = prompt.new_full((B, 0), PAD)                                    # [B, i]
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for _ in range(max_len):
        if arch == "lm":
            logits = model(torch.cat([prompt, out], dim=1))[0][:, -1]     # [B, V]
        else:
            dec = torch.cat([prompt.new_full((B, 1), PAD), out], dim=1)   # [B, i + 1]
            logits = model(prompt, dec)[0][:, -1]                         # [B, V]
        nxt = logits.argmax(-1).masked_fill(done, PAD)                    # [B]
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == stop_token
        if bool(done.all()):
            break
    return torch.cat([out, out.new_full((B, max_len - out.shape[1]), PAD)], dim=1)


@torch.no_grad()
def evaluate(model, task, data, arch, batch_size, device):
    """Score of a split in % (accuracy or exact_match) and per-example correctness [N] (0/1).
    Batches of batch_size, as in training (routing groups are positions across the batch); the
    last batch is filled with the split's first examples, whose predictions are dropped."""
    N = len(data["answer_text"])
    order = np.concatenate([np.arange(N), np.arange(-N % batch_size) % N])
    labels = torch.tensor([b[0] + BYTE0 for b in task.labels], dtype=torch.long, device=device)
    preds = []                            # classify: class indices; generate: bytes or None
    # trained expert-choice layers route as in pretraining (by group), not by their thresholds
    with routed_as(model, "group"), \
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(EVAL_SEED)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            prompt = torch.from_numpy(data["prompt"][idx]).to(device)    # [B, P]
            if task.kind == "classify":
                if arch == "lm":
                    logits = model(prompt)[0][:, -1]                       # [B, V]
                else:
                    logits = model(prompt, prompt.new_full((len(idx), 1), PAD))[0][:, 0]
                preds += rank_classify(logits, labels).tolist()
            else:
                gen = generate(model, prompt, arch, data["answer"].shape[1], task.stop)
                preds += [decode_answer(g, task.stop) for g in gen.cpu()]    # [B] answers
    preds = preds[:N]
    if task.kind == "classify":
        gold = data["label"].tolist()
        return accuracy(preds, gold), [int(p == g) for p, g in zip(preds, gold)]
    gold = [a.encode() for a in data["answer_text"]]
    return exact_match(preds, gold), [int(p == g) for p, g in zip(preds, gold)]


def lr_at(step, cfg):
    """Linear warmup to cfg.lr over cfg.warmup steps, then linear decay to 0 at cfg.steps."""
    s = step + 1
    if s <= cfg.warmup:
        return cfg.lr * s / cfg.warmup
    return cfg.lr * max(0.0, (cfg.steps - step) / max(cfg.steps - cfg.warmup, 1))


# ----------------------------------------------------------------------------------------------
# One fine-tuning per (router, seed, task).


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def code_sha256():
    """Hash of every project file this tool imports, at any depth (lab.runner.closure_sha256:
    the suite, the trainer, the layers, the model; the report too): what decides a result."""
    return closure_sha256(ROOT, "lab/finetune.py")


def result_config(cfg, suite_sha, model_sha):
    rc = {k: getattr(cfg, k) for k in RESULT_FIELDS}
    rc.update(suite_sha256=suite_sha, model_sha256=model_sha, code_sha256=code_sha256())
    return rc


def result_path(out, task, router, seed):
    return Path(out) / "finetune_runs" / f"{task}_{router}_s{seed}.json"


def pretrain_config(run_dir):
    """The pretraining Config of RUN_DIR (results.json, else the first saved model's); fields
    this version of train_tiny does not know are left out (as train_tiny.load_model does).
    FileNotFoundError if RUN_DIR has neither; ValueError naming an unreadable file."""
    res = Path(run_dir) / "results.json"
    if res.exists():
        saved = read_json(res, "results file", ("config",))["config"]
    else:
        models = sorted((Path(run_dir) / "models").glob("*.pt"))
        if not models:
            raise FileNotFoundError(f"{run_dir}: no results.json and no models/*.pt")
        saved = load_checkpoint(models[0], ("config",), "saved model")["config"]
    fields = {f.name for f in dataclasses.fields(tt.Config)}
    return tt.Config(**{k: v for k, v in saved.items() if k in fields})


def load_for_finetuning(run_dir, router, seed, device):
    """-> (model in train mode, pretraining Config, sha256 of its weights file). SCRATCH: the
    dense model of the run's config with train_tiny's init for this seed (never trained)."""
    if router == SCRATCH:
        cfg_pre = pretrain_config(run_dir)
        model = tt.build_model(cfg_pre, "dense")
        tt.init_weights(model, seed)
        model, sha = model.to(device), f"init_weights(seed={seed})"
    else:
        model, cfg_pre = tt.load_model(run_dir, router, seed, device)
        sha = file_sha256(tt.model_path(run_dir, router, seed))
    return model.train(), cfg_pre, sha


def finetune_one(cfg, router, seed, task_name, suite):
    """Fine-tune one pretrained model on one task, evaluate val and test -> result dict
    (also written to finetune_runs/ atomically)."""
    device = torch.device(cfg.device)
    task, data = TASKS[task_name], suite["tasks"][task_name]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        model, cfg_pre, model_sha = load_for_finetuning(cfg.run_dir, router, seed, device)
        torch.manual_seed(seed)                       # top2_gshard's draws during training
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                                weight_decay=0.0)
        n_train, ti = len(data["train"]["answer_text"]), list(TASKS).index(task_name)
        losses, t0 = [], time.perf_counter()
        for step in range(cfg.steps):
            rng = np.random.default_rng([DATA_SEED, seed, ti, step])
            idx = rng.choice(n_train, cfg.batch_size, replace=False)
            batch = [t.to(device) for t in make_batch(data["train"], idx, cfg_pre.arch)]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            ce, loss = finetune_loss(model, batch, cfg_pre)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            for _, moe in model.moe_layers():  # loss-free balancing: once per optimizer step
                if isinstance(moe, LossFreeMoE):
                    moe.update_bias()
            losses.append(ce.detach())
        train_time = time.perf_counter() - t0
        t1 = time.perf_counter()
        scores = {s: evaluate(model, task, data[s], cfg_pre.arch, cfg.batch_size, device)
                  for s in ("val", "test")}
        result = dict(router=router, seed=seed, task=task_name, kind=task.kind,
                      metric=task.metric, val=scores["val"][0], test=scores["test"][0],
                      val_correct="".join(map(str, scores["val"][1])),     # "0110...": one
                      test_correct="".join(map(str, scores["test"][1])),   # char per example
                      train_loss=[round(float(x), 5) for x in torch.stack(losses).cpu()],
                      train_time=train_time, eval_time=time.perf_counter() - t1,
                      s_per_step=train_time / cfg.steps, arch=cfg_pre.arch,
                      config=result_config(cfg, data["sha256"], model_sha))
        write_json(result_path(cfg.out, task_name, router, seed), result)
        return result
    finally:
        torch.set_num_threads(old_threads)


_WORKER = {}


def _worker_init(suite):
    _WORKER["suite"] = suite


def _worker_run(cfg, router, seed, task):
    return finetune_one(cfg, router, seed, task, _WORKER["suite"])


# ----------------------------------------------------------------------------------------------
# Main.


def resolve_run(cfg, parser):
    """-> (pretraining info dict, routers, seeds) of RUN_DIR, with clear errors."""
    run = Path(cfg.run_dir)
    if not run.is_dir():
        parser.error(f"RUN_DIR: {cfg.run_dir!r} is not a directory")
    res_path = run / "results.json"
    try:
        res = read_json(res_path, "results file") if res_path.exists() else {}
        cfg_pre = pretrain_config(run)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"RUN_DIR: {e}")
    if cfg_pre.data:
        parser.error(f"RUN_DIR: pretrained on --data {cfg_pre.data!r}; the suite's held-out "
                     "guarantee needs the default stdlib corpus")
    saved = sorted((run / "models").glob("*_s*.pt"))
    found = {}
    for p in saved:
        rt, s = p.stem.rsplit("_s", 1)
        found.setdefault(rt, set()).add(int(s))
    routers = [r.strip() for r in cfg.routers.split(",") if r.strip()] if cfg.routers else \
        [r for r in res.get("routers", sorted(found)) if r in found]
    if cfg.seeds:
        seeds = [int(s) for s in cfg.seeds.split(",")]
    else:
        seeds = res.get("seeds") or sorted(set().union(*found.values()))
    missing = [f"{r}_s{s}" for r in routers for s in seeds if s not in found.get(r, ())]
    if missing or not routers or not seeds:
        parser.error(f"--routers / --seeds: no saved model for {missing or 'any run'} in "
                     f"{run / 'models'} (found: {', '.join(p.stem for p in saved) or 'none'})")
    B = cfg.batch_size
    if cfg_pre.group_size and B % cfg_pre.group_size:
        parser.error(f"--batch-size {B}: the pretraining routes in position groups of "
                     f"--group-size {cfg_pre.group_size} sequences, which must divide it")
    n = cfg_pre.group_size or B                     # tokens per position group
    for rt in routers:
        try:
            spec = resolve(rt, cfg_pre.capacity_factor)            # the layer, its c and k
        except ValueError as e:
            parser.error(f"--routers: {e}")
        if spec.layer is CappedMoE:                                  # the router table's cap b
            b = spec.options["max_experts_per_token"]
            k = expert_capacity(n, cfg_pre.experts, spec.capacity_factor)
            if b * n < k * cfg_pre.experts:
                parser.error(f"--batch-size {B}: {rt} is infeasible in position groups of {n} "
                             f"tokens (need b*n >= k*e)")
    info = dict(run_dir=str(run), command=res.get("command", "?"), arch=cfg_pre.arch,
                config=dataclasses.asdict(cfg_pre), corpus=res.get("corpus", {}))
    return info, routers, seeds


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    t_start = time.time()
    cfg, parser = parse_config(argv)
    pre, routers, seeds = resolve_run(cfg, parser)
    check_out_dir(cfg.out, parser)
    tasks = task_list(cfg)
    t0 = time.time()
    try:
        suite = build_suite(cfg, tasks)
    except ValueError as e:
        parser.error(str(e))
    want = pre["corpus"].get("sha256")
    if want and want != suite["info"]["stdlib_sha256"]:
        parser.error(f"RUN_DIR: pretrained on another stdlib (corpus sha256 {want[:12]}... here "
                     f"{suite['info']['stdlib_sha256'][:12]}...): the held-out files differ")
    all_routers = routers + ([] if cfg.no_scratch else [SCRATCH])
    jobs = [(r, s, t) for s in seeds for t in tasks for r in all_routers]   # seed-major
    results, todo = [], []
    for r, s, t in jobs:
        path = result_path(cfg.out, t, r, s)
        if cfg.resume and path.exists():
            prev = read_json(path, "fine-tuning result", ("config",))
            sha = f"init_weights(seed={s})" if r == SCRATCH else \
                file_sha256(tt.model_path(cfg.run_dir, r, s))
            expected = result_config(cfg, suite["tasks"][t]["sha256"], sha)
            diff = [k for k in expected if prev["config"].get(k) != expected[k]]
            if not diff:
                results.append(prev)
                continue
            print(f"  redo {path.name}: made with different {diff}")
        todo.append((r, s, t))
    print(f"finetune: {len(jobs)} fine-tunings ({len(results)} already done) of {len(routers)} "
          f"routers + {'no scratch' if cfg.no_scratch else 'scratch'} x seeds {seeds} x tasks "
          f"{tasks}; {cfg.steps} steps, batch {cfg.batch_size}, {cfg.workers} worker(s); suite "
          f"built in {time.time() - t0:.1f} s: " + ", ".join(
              f"{t} {len(suite['tasks'][t]['train']['answer_text'])}/"
              f"{len(suite['tasks'][t]['val']['answer_text'])}/"
              f"{len(suite['tasks'][t]['test']['answer_text'])}" for t in tasks), flush=True)
    t_jobs = time.time()

    def show(i, r):
        elapsed = time.time() - t_jobs
        eta = elapsed / i * (len(todo) - i)
        print(f"[{i:>3}/{len(todo)}] {r['task']:>5} {r['router']:>13} s{r['seed']}: test "
              f"{r['test']:5.1f}  val {r['val']:5.1f}  (baseline "
              f"{suite['tasks'][r['task']]['baseline']['test']:.1f})  {r['s_per_step']:.3f} "
              f"s/step, eval {r['eval_time']:.0f} s  elapsed {clock(elapsed)} ETA "
              f"{clock(eta)}", flush=True)

    if cfg.workers == 1 or len(todo) <= 1:
        for i, (r, s, t) in enumerate(todo):
            results.append(finetune_one(cfg, r, s, t, suite))
            show(i + 1, results[-1])
    else:
        ctx = mp.get_context("spawn")                    # no fork of a torch-initialised parent
        with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(suite,)) as pool:
            futures = [pool.submit(_worker_run, cfg, r, s, t) for r, s, t in todo]
            for i, f in enumerate(as_completed(futures)):
                results.append(f.result())
                show(i + 1, results[-1])
    res = dict(command=shlex.join(["python", "-m", "lab.finetune", *argv]),
               config=dataclasses.asdict(cfg), pretraining=pre, routers=all_routers,
               seeds=seeds, tasks=tasks,
               recipe=(f"AdamW (beta 0.9/0.95, no weight decay, grad-clip 1.0), lr {cfg.lr:g}, "
                       f"linear warmup {cfg.warmup} steps then linear decay to 0, {cfg.steps} "
                       f"steps of batch {cfg.batch_size}; loss on answer tokens + the router "
                       "losses of pretraining; routing and capacity factor as in pretraining "
                       "(position groups over the fine-tuning batch), also at evaluation "
                       "(same batch size); val and test scored once after the last step"),
               suite=suite_summary(suite),
               hardware=hardware(cfg.device, cfg.workers, cfg.threads),
               versions=dict(python=platform.python_version(), torch=torch.__version__,
                             numpy=np.__version__, code_sha256=code_sha256()),
               wall_time_s=time.time() - t_start,
               finetune_time_sum_s=sum(r["train_time"] + r["eval_time"] for r in results),
               runs=sorted(results, key=lambda r: (r["task"], r["router"], r["seed"])))
    res["analysis"] = report.analyse(res)
    out = Path(cfg.out)
    write_json(out / "finetune.json", res)
    report.write(out, res)
    print("\n".join(f"* {line}" for line in res["analysis"]["verdict"]))
    print(f"wrote {out / 'finetune.json'}, {out / 'finetune.md'}, {out / 'finetune.png'}")
    return res


if __name__ == "__main__":
    main()
