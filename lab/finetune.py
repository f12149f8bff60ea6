"""Fine-tuning after pretraining: does expert choice fine-tune better on downstream tasks?

What it does
    The paper's second claim (Zhou et al. 2022, Sec. 4.3, Table 2): after pretraining, expert
    choice fine-tunes better on GLUE / SuperGLUE (100M/32E, average: top-1 80.6, top-2 83.5,
    EC-CF2 85.0). GLUE cannot be downloaded here, so this file builds a small downstream suite
    from the Python standard library source (parsed with `ast`) and fine-tunes every finished
    train_tiny run (every router, every seed) on it with one recipe, then compares the routers
    paired by seed, with a positive and a null control judged by the analysis plan's rules
    (docs/analysis_plan.md, lab/stats.py).

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

The task suite (built in ~3-5 s on 2 cores, deterministic: numpy default_rng with fixed seeds)
    Pretraining (lab.corpus.load_corpus) holds out every 20th stdlib file (i % 20 == 10 of the
    sorted list of lab.corpus.stdlib_files()). Splits, by FILE:
        train       pretraining-train files (i % 20 != 10): seen in pretraining, as GLUE's
                    training text may be; only the task format is new
        validation  held-out files 0, 2, 4, ... (of the sorted held-out list)
        test        held-out files 1, 3, 5, ...
    so no validation or test example comes from a file the model was pretrained on. Within a
    split, examples are unique by prompt; validation and test also drop every prompt that occurs
    in the train pool (identical code appears in several files, e.g. the encodings/ modules).

    task   kind and content                          prompt -> answer            metric, baseline
    ident  generation: complete an identifier that   'self.title = title\n'      exact match;
           occurs earlier in the prompt, from its    '    print(ti' -> 'tle'     majority = the
           first 2 bytes (--context-bytes of code                              most frequent
           before it; greedy, stops at EOS or                                  train answer
           --answer-bytes; not self / cls)
    valid  binary: a one-line simple statement as     'x = int(s)  # ' -> 'y'    accuracy;
           written (y) or with one non-space byte     'x = in(s)  # ' -> 'n'     balanced 50/50
           deleted (n; checked: ast.parse fails on
           it, and parses every y statement)
    root   5-way: the type of a one-line expression's 'x.y[i] + 1  # ' -> 'o'    accuracy;
           root node: c Call, a Attribute, s                                   balanced, 20%
           Subscript, o BinOp, = Compare
    Statements and expressions are single-line ast nodes of at most --stmt-bytes bytes (and at
    least 12). Prompts are FIXED-LENGTH per task, left-padded with PAD (token 0): all rows of a
    batch share positions, and the MoE layers route in position groups (tokens at one position
    across the batch, as in pretraining). Classification is rank classification: one forward,
    the label bytes' logits at the answer position are compared (training: cross-entropy over
    the full vocabulary on the answer byte).
    Tried and dropped (one pretrained dense model, seed 0, 200 steps): `name` (a function's
    body -> its name) stayed at its majority baseline (always `__init__`, 9% test) and scratch
    at 0%; `valid` with a deleted BRACKET was solved by counting (94% pretrained, 93% scratch).

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

Controls (the rules are the analysis plan's, docs/analysis_plan.md v1: lab.stats
positive_control and null_control, applied to test scores, where higher is better)
    positive  "scratch": the same fine-tuning from a randomly initialised (train_tiny
              .init_weights, per seed) dense model. Pretrained dense must beat it, paired by
              seed: passes when pretrained dense scores higher and the 95% t interval of the
              paired differences excludes 0 (stats.positive_control; one seed: not judged).
              Where it does not, pretraining does not show on that task and the task cannot
              rank pretrained routers.
    null      top2_aa (same router and init as top2, pretrained on another data order) vs top2:
              must come out null; fails exactly when the 95% t interval of the paired
              differences excludes 0 (stats.null_control, one test; one seed: not judged).

Outputs (written atomically into RUN_DIR, or --out): finetune_runs/TASK_ROUTER_sSEED.json as
each fine-tuning finishes (--resume skips those), and at the end finetune.json (every raw score,
recipe, suite, command, hardware, wall time), finetune.md (tables with baselines beside) and
finetune.png (per-task scores with 95% CIs; paired differences with the zero line).

References: Zhou et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS 2022
(arXiv:2202.09368), Sec. 4.3 and Table 2; Raffel et al. 2020 (T5 fine-tuning as text-to-text,
rank classification).

Shape legend: B batch, P prompt length, A answer length, S encoder length, T decoder / LM length,
V vocab, K number of labels, N examples.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import gc
import hashlib
import multiprocessing as mp
import platform
import shlex
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import train_tiny as tt
from ecmoe import expert_capacity
from lab import stats
from lab.cli import check_out_dir, dataclass_parser, flag, given_flags
from lab.corpus import stdlib_files
from lab.files import atomic_write, clock, load_checkpoint, read_json, write_json, write_text
from lab.runner import hardware
from moe.capped import CappedMoE
from moe.routers import ROUTERS, base_router, capacity_factor
from moe.token_choice import LossFreeMoE

PAD, EOS, BYTE0 = tt.PAD, tt.EOS, tt.BYTE0


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
SCRATCH = "scratch"          # the positive control's pseudo-router
SPLIT_SEED = 20_220_209      # sampling of the suite (fixed: the same suite for every run)
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
    return [t.strip() for t in cfg.tasks.split(",") if t.strip()]


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
# The task suite: examples from ast nodes of stdlib files, split by file.


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                 # "generate" | "classify"
    metric: str               # what the score (in %) measures
    cue: bytes                # appended to the content: ends every prompt
    labels: tuple = ()        # classify: one answer byte per class
    classes: tuple = ()       # classify: what each label means
    stop: int = 0             # generate: the token that ends an answer


TASKS = {
    "ident": Task("ident", "generate", "exact match", b"", stop=EOS),
    "valid": Task("valid", "classify", "accuracy", b"  # ", labels=(b"y", b"n"),
                  classes=("parses", "one byte deleted")),
    "root": Task("root", "classify", "accuracy", b"  # ", labels=(b"c", b"a", b"s", b"o", b"="),
                 classes=("Call", "Attribute", "Subscript", "BinOp", "Compare")),
}
SPLITS = ("train", "val", "test")
IDENT_MIN_BYTES = 4            # ident: no 1-3 byte names (i, x, fp, obj)
IDENT_HINT = 2                 # ident: the prompt ends with the identifier's first 2 bytes
IDENT_EVERY = 2                # ident: every 2nd identifier occurrence of a file (walk order)
IDENT_SKIP = (b"self", b"cls")  # ident: too frequent (a third of all candidates)
ROOT_MIN_BYTES = 12            # root: shorter expressions are mostly a name and one call
VALID_MIN_BYTES = 12           # valid: shorter statements are mostly `pass`, `return x`
SIMPLE_STMTS = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return, ast.Delete,
                ast.Raise, ast.Assert, ast.Import, ast.ImportFrom)


def parses(src, mode="exec"):
    """Whether src (bytes) is syntactically valid Python (ast.parse; no compile-time checks)."""
    try:
        ast.parse(src, mode=mode)
        return True
    except (SyntaxError, ValueError):
        return False


def split_files(files):
    """Sorted stdlib files -> {split: [file index]}: pretraining's held-out files (i % 20 == 10)
    alternate between val and test; train = every pretraining-train file."""
    held = [i for i in range(len(files)) if i % 20 == 10]
    return dict(train=[i for i in range(len(files)) if i % 20 != 10], val=held[0::2],
                test=held[1::2])


def _walk(tree):
    """All nodes of an ast (like ast.walk, without the shared Load/Store context nodes; 2x
    faster, which matters over 700 files)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for name in node._fields:
            v = getattr(node, name, None)
            if isinstance(v, list):
                stack.extend(x for x in v if isinstance(x, ast.AST))
            elif isinstance(v, ast.AST) and name != "ctx":
                stack.append(v)


def file_candidates(src, cfg):
    """Candidate examples of one file (bytes): {task: [(content bytes, answer)]}.

    ident: (the context_bytes before an identifier + its first IDENT_HINT bytes, the rest of
    it), for every IDENT_EVERY-th Name / Attribute identifier of IDENT_MIN_BYTES ..
    answer_bytes + 1 ASCII bytes (not self / cls) that also occurs in that context.
    valid: (a one-line simple statement, None); root: (a one-line expression of one of the
    root classes, class index). Offsets are ast's UTF-8 byte offsets. Whether a valid / root
    content parses on its own is checked when it is sampled (check_candidate), not here: that
    would be ~200k parses."""
    out = {t: [] for t in TASKS}
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return out
    lines = src.splitlines()             # the line breaks Python counts: \n, \r\n, \r
    starts = np.cumsum([0] + [len(r) for r in src.splitlines(keepends=True)])
    roots = {c: i for i, c in enumerate(TASKS["root"].classes)}
    n_ident = 0
    for node in _walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute)):
            ident = (node.id if isinstance(node, ast.Name) else node.attr).encode()
            if IDENT_MIN_BYTES <= len(ident) <= cfg.answer_bytes + 1 and ident.isascii() \
                    and ident not in IDENT_SKIP:
                n_ident += 1
                if n_ident % IDENT_EVERY == 0:
                    line, col = (node.lineno, node.col_offset) if isinstance(node, ast.Name) \
                        else (node.end_lineno, node.end_col_offset - len(ident))
                    at = int(starts[line - 1]) + col            # byte offset in the file
                    context = src[max(0, at - cfg.context_bytes):at]
                    if src[at:at + len(ident)] == ident and ident in context:
                        out["ident"].append((context + ident[:IDENT_HINT], ident[IDENT_HINT:]))
        if getattr(node, "end_lineno", None) is None or node.lineno != node.end_lineno:
            continue
        simple, root = isinstance(node, SIMPLE_STMTS), roots.get(type(node).__name__)
        if not simple and root is None:
            continue
        text = lines[node.lineno - 1][node.col_offset:node.end_col_offset]
        if len(text) > cfg.stmt_bytes:
            continue
        if simple and len(text) >= VALID_MIN_BYTES:
            out["valid"].append((text, None))
        if root is not None and len(text) >= ROOT_MIN_BYTES:
            out["root"].append((text, root))
    return out


def check_candidate(task, content, answer):
    """valid: the statement parses on its own; root: the expression parses on its own with
    the same root type (not, e.g., a piece of an f-string). ident: always usable."""
    if task.name == "valid":
        return parses(content)
    if task.name == "root":
        try:
            body = ast.parse(content, mode="eval").body
        except (SyntaxError, ValueError):
            return False
        return type(body).__name__ == task.classes[answer]
    return True


def delete_byte(text, rng):
    """Delete one non-space byte of text (bytes) so that it no longer parses -> bytes, or None
    when no single deletion breaks it. Positions are tried in random order."""
    pos = [i for i, b in enumerate(text) if b not in b" \t"]
    for i in rng.permutation(pos):
        bad = text[:i] + text[i + 1:]
        if not parses(bad):
            return bad
    return None


def _pad_left(tokens, length):
    return [PAD] * (length - len(tokens)) + tokens


def encode_examples(task, items, cfg):
    """[(content, answer bytes, source)] -> split dict of fixed-length token arrays:
    prompt [N, P] (left-padded content + cue), answer [N, A] (PAD after the end), label [N]
    (classify: class index, else -1), and text / answer_text / source lists."""
    width = cfg.context_bytes + IDENT_HINT if task.kind == "generate" else cfg.stmt_bytes
    P = width + len(task.cue)
    A = cfg.answer_bytes if task.kind == "generate" else 1
    prompt = np.zeros((len(items), P), np.int64)
    answer = np.zeros((len(items), A), np.int64)
    for j, (content, ans, _) in enumerate(items):
        prompt[j] = _pad_left([b + BYTE0 for b in content + task.cue], P)
        ans = [b + BYTE0 for b in ans] + ([task.stop] if task.kind == "generate" else [])
        answer[j, :len(ans)] = ans
    label = np.array([task.labels.index(a) if task.kind == "classify" else -1
                      for _, a, _ in items], np.int64)
    return dict(prompt=prompt, answer=answer, label=label,
                text=[c.decode("utf-8", "replace") for c, _, _ in items],
                answer_text=[a.decode() for _, a, _ in items], source=[s for _, _, s in items])


def _unique(cands, exclude=()):
    """Drop repeated contents (first occurrence kept) and contents in `exclude`."""
    seen, out = set(exclude), []
    for c in cands:
        if c[0] not in seen:
            seen.add(c[0])
            out.append(c)
    return out


def sample_split(task, pool, n, rng):
    """Deterministic examples of one split from its pool -> [(content, answer bytes, source)].

    ident: n random candidates. valid: n statements, the first n // 2 (of a random order) with
    one byte deleted (statements where no single deletion breaks parsing are skipped). root:
    n // K per class (the first n % K classes one more); when a class has fewer usable
    examples, every class gets that many (balanced). Contents failing check_candidate are
    skipped."""
    if task.kind == "generate":
        return [pool[i] for i in rng.permutation(len(pool))[:n]]
    if task.name == "valid":
        out, n_bad = [], n // 2
        for i in rng.permutation(len(pool)):
            text, _, src = pool[i]
            if not check_candidate(task, text, None):
                continue
            if len(out) < n_bad:
                bad = delete_byte(text, rng)
                if bad is not None:
                    out.append((bad, b"n", src))
            else:
                out.append((text, b"y", src))
            if len(out) == n:
                break
        return [out[i] for i in rng.permutation(len(out))]
    K = len(task.labels)
    taken = []
    for k in range(K):
        cands = [c for c in pool if c[1] == k]
        want, got = n // K + (k < n % K), []
        for i in rng.permutation(len(cands)):
            if len(got) == want:
                break
            if check_candidate(task, cands[i][0], k):
                got.append((cands[i][0], task.labels[k], cands[i][2]))
        taken.append(got)
    per = min(len(g) for g in taken)        # a class short of n // K: all get as many
    out = [x for g in taken for x in (g if per >= n // K else g[:per])]
    return [out[i] for i in rng.permutation(len(out))]


def majority_baseline(task, data):
    """Most frequent train answer applied to every val / test example -> {split: score %}."""
    top = Counter(data["train"]["answer_text"]).most_common(1)[0][0]
    return dict(answer=top, **{s: 100.0 * float(np.mean([a == top for a in
                                                          data[s]["answer_text"]]))
                               for s in ("val", "test")})


@functools.lru_cache(maxsize=2)
def candidate_pools(context_bytes, answer_bytes, stmt_bytes):
    """Parse every stdlib file once -> ({split: {task: [(content, answer, file)]}}, info).
    The expensive part of build_suite (~3 s); cached in memory (by the flags that shape it),
    so one process builds it once. The lists are never modified."""
    cfg = Config(context_bytes=context_bytes, answer_bytes=answer_bytes, stmt_bytes=stmt_bytes)
    root, files = stdlib_files()
    parts = split_files(files)
    sha = hashlib.sha256()
    pools = {s: {t: [] for t in TASKS} for s in SPLITS}
    enabled = gc.isenabled()
    gc.disable()            # ast trees are many small objects: collection cycles cost seconds
    try:
        for split in SPLITS:
            for i in parts[split]:
                src = files[i].read_bytes()
                rel = str(files[i].relative_to(root))
                for t, cands in file_candidates(src, cfg).items():
                    pools[split][t] += [(c, a, rel) for c, a in cands]
        for p in files:
            sha.update(p.read_bytes())
    finally:
        if enabled:
            gc.enable()
    files_of = {s: [str(files[i].relative_to(root)) for i in parts[s]] for s in ("val", "test")}
    info = dict(source=f"python stdlib *.py ({root})", n_files=len(files),
                stdlib_sha256=sha.hexdigest(), files=files_of,
                n_train_files=len(parts["train"]),
                split="train: pretraining-train files (i % 20 != 10); val / test: held-out "
                      "files (i % 20 == 10), alternating")
    return pools, info


def build_suite(cfg, tasks=None):
    """-> dict(tasks={task: {train, val, test: encode_examples dicts, baseline, ...}}, info).

    Deterministic: a pure function of the installed stdlib and the size flags."""
    tasks = list(tasks or task_list(cfg))
    pools, info = candidate_pools(cfg.context_bytes, cfg.answer_bytes, cfg.stmt_bytes)
    out = {}
    n_want = dict(train=cfg.train_examples, val=cfg.val_examples, test=cfg.test_examples)
    for ti, name in enumerate(tasks):
        task = TASKS[name]
        train_pool = _unique(pools["train"][name])
        seen = {c[0] for c in train_pool}
        data = dict(task={k: v.decode() if isinstance(v, bytes) else
                          [x.decode() for x in v] if k == "labels" else v
                          for k, v in dataclasses.asdict(task).items()}, pool={})
        for si, split in enumerate(SPLITS):
            pool = train_pool if split == "train" else _unique(pools[split][name], seen)
            rng = np.random.default_rng([SPLIT_SEED, list(TASKS).index(name), si])
            items = sample_split(task, pool, n_want[split], rng)
            if len(items) < (cfg.batch_size if split == "train" else 1):
                raise ValueError(f"task {name!r}: only {len(items)} {split} examples (pool "
                                 f"{len(pool)}); lower --batch-size or raise --stmt-bytes / "
                                 "--context-bytes")
            data[split] = encode_examples(task, items, cfg)
            data["pool"][split] = len(pool)
        data["baseline"] = majority_baseline(task, data)
        data["chance"] = 100.0 / len(task.labels) if task.kind == "classify" else None
        h = hashlib.sha256()
        for split in SPLITS:
            h.update(data[split]["prompt"].tobytes() + data[split]["answer"].tobytes())
        data["sha256"] = h.hexdigest()
        out[name] = data
    return dict(tasks=out, info=info)


def suite_summary(suite):
    """JSON-friendly description of the suite: sizes, baselines, a few test examples."""
    out = {}
    for name, d in suite["tasks"].items():
        out[name] = dict(task=d["task"], sizes={s: len(d[s]["answer_text"]) for s in SPLITS},
                         pool=d["pool"], baseline=d["baseline"], chance=d["chance"],
                         prompt_len=int(d["train"]["prompt"].shape[1]),
                         answer_len=int(d["train"]["answer"].shape[1]), sha256=d["sha256"],
                         examples=[dict(text=d["test"]["text"][j],
                                        answer=d["test"]["answer_text"][j],
                                        source=d["test"]["source"][j]) for j in range(3)
                                   if j < len(d["test"]["text"])])
        if d["task"]["kind"] == "classify":
            out[name]["label_counts"] = {s: np.bincount(d[s]["label"], minlength=len(
                d["task"]["labels"])).tolist() for s in SPLITS}
    return dict(out, info=suite["info"])


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


def rank_classify(logits, label_tokens):
    """logits [N, V] at the answer position -> predicted class [N]: the label token with the
    highest logit (ties: the first label)."""
    return logits[:, label_tokens].argmax(-1)                            # [N]


def accuracy(pred, gold):
    """Fraction of equal entries (two sequences of class indices) in %."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    return 100.0 * float(np.mean(pred == gold))


def decode_answer(tokens, stop):
    """Generated tokens [A] -> the answer bytes before the stop token, or None when the stop
    token never came or a non-byte token came first (the answer did not end: always wrong)."""
    out = bytearray()
    for t in tokens:
        t = int(t)
        if t == stop:
            return bytes(out)
        if t < BYTE0 or t >= BYTE0 + 256:
            return None
        out.append(t - BYTE0)
    return None


def exact_match(preds, golds):
    """Fraction of predictions (bytes or None) equal to their gold answers, in %."""
    return 100.0 * float(np.mean([p is not None and p == g for p, g in zip(preds, golds)]))


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
    model.eval()
    preds = []                            # classify: class indices; generate: bytes or None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
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
    model.train()
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
    """This file + the files train_tiny.code_sha256 hashes (train_tiny.CODE: the trainer, the
    layers, the model): what decides a fine-tuning result."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(tt.code_sha256().encode())
    return h.hexdigest()


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
# Analysis: per-router scores, paired differences, controls.

PAIRS = (("ec1", "top1"), ("ec2", "top2"), ("ec2", "top2_dropless"), ("ec2", "dense"),
         ("ec1", "dense"), ("ec2", "top2_gshard"), ("cap2", "top2"), ("cap3", "top2"),
         ("top2", "dense"),
         ("et2", "ec2"), ("et2", "top2"), ("et1", "top1"), ("top2_lossfree", "top2_dropless"))  # issue 18
POSITIVE = ("dense", SCRATCH)      # pretrained dense - the same model never pretrained
NULL = ("top2_aa", "top2")
AVERAGE = "average"                # mean over the tasks of one run (GLUE's average score)
PLAN = f"rule of analysis plan v{stats.PLAN_VERSION}, docs/analysis_plan.md"   # the controls' rules


def scores_by(runs, split="test"):
    """runs -> {task: {router: {seed: score}}}, plus AVERAGE over tasks for runs that have
    every task."""
    by = {}
    for r in runs:
        by.setdefault(r["task"], {}).setdefault(r["router"], {})[r["seed"]] = r[split]
    tasks = list(by)
    if len(tasks) > 1:
        avg = {}
        for rt in {rt for t in tasks for rt in by[t]}:
            seeds = set.intersection(*[set(by[t].get(rt, {})) for t in tasks])
            if seeds:
                avg[rt] = {s: float(np.mean([by[t][rt][s] for t in tasks])) for s in seeds}
        by[AVERAGE] = avg
    return by


def paired_diff(a, b):
    """Challenger minus baseline scores ({seed: score} each), paired by seed -> dict with the
    per-seed differences, wins / ties / losses, and stats.paired_t of the differences (n, mean,
    95% t interval lo / hi, sd, two-sided p; lo, hi, sd and p are None with one seed)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    out = dict(seeds=seeds, per_seed=d, wins=sum(x > 0 for x in d), ties=sum(x == 0 for x in d),
               losses=sum(x < 0 for x in d))
    if seeds:
        out.update(stats.paired_t(d))
    return out


def analyse(res):
    """-> dict(routers, pairs, positive, null, verdict) from res['runs'] and res['suite']."""
    test, val = scores_by(res["runs"]), scores_by(res["runs"], "val")
    tasks = [t for t in res["tasks"] if t in test] + ([AVERAGE] if AVERAGE in test else [])
    order = [r for r in res["routers"] if any(r in test[t] for t in tasks)]
    routers = {t: {rt: dict(test=stats.paired_t(list(test[t][rt].values())),   # mean, t interval
                            val=stats.paired_t(list(val[t][rt].values())), per_seed=test[t][rt])
                   for rt in order if rt in test[t]} for t in tasks}

    def pair(a, b, role):
        by_task = {t: paired_diff(test[t][a], test[t][b]) for t in tasks
                   if a in test[t] and b in test[t]}
        seeds = sorted(set.intersection(*[set(by_task[t]["seeds"]) for t in by_task
                                          if t != AVERAGE])) if by_task else []
        per_seed = {s: sum(test[t][a][s] > test[t][b][s] for t in by_task if t != AVERAGE)
                    for s in seeds}
        n_tasks = len([t for t in by_task if t != AVERAGE])
        return dict(challenger=a, baseline=b, role=role, by_task=by_task, n_tasks=n_tasks,
                    wins_per_seed=per_seed,
                    wins_summary=stats.paired_t(list(per_seed.values())) if per_seed else None)

    have = set(order)
    pairs = [pair(a, b, "comparison") for a, b in PAIRS if a in have and b in have]
    positive = pair(*POSITIVE, "positive control") if set(POSITIVE) <= have else None
    null = pair(*NULL, "null control") if set(NULL) <= have else None
    # The analysis plan's control rules (lab/stats.py): True / False, None = one seed (not judged).
    if positive:          # the plan's rule is for losses (< 0 = better): scores flip the sign
        for t, d in positive["by_task"].items():
            d["passes"] = stats.positive_control([-x for x in d["per_seed"]])["passed"] \
                if d["per_seed"] else None
    if null:
        for t, d in null["by_task"].items():
            d["null_ok"] = stats.null_control(d["per_seed"])["passed"] if d["per_seed"] else None
    a = dict(tasks=tasks, routers=routers, pairs=pairs, positive=positive, null=null)
    a["verdict"] = verdict(res, a)
    return a


def _ci(d, fmt="{:+.1f}"):
    if not d or "mean" not in d:
        return "-"
    if d["n"] < 2:
        return fmt.format(d["mean"]) + " (1 seed)"
    return f"{fmt.format(d['mean'])} [{fmt.format(d['lo'])}, {fmt.format(d['hi'])}]"


def _wins(p):
    if not p["wins_per_seed"]:
        return "-"
    counts = ", ".join(f"s{s}: {c}" for s, c in p["wins_per_seed"].items())
    return f"{p['wins_summary']['mean']:.1f} of {p['n_tasks']} tasks per seed ({counts})"


def verdict(res, a):
    """Plain sentences: controls first, then each comparison."""
    lines = []
    pos, null = a["positive"], a["null"]
    real = [t for t in a["tasks"] if t != AVERAGE]
    if pos:
        ok = [t for t in real if pos["by_task"].get(t, {}).get("passes")]
        unjudged = [t for t in real if t in pos["by_task"] and pos["by_task"][t]["passes"] is None]
        lines.append(f"Positive control (pretrained dense - scratch dense, test score; {PLAN}: "
                     "passes when pretrained dense scores higher and the 95% t interval of the "
                     "paired differences excludes 0): passes on "
                     f"{len(ok)} of {len(real)} tasks ({', '.join(ok) or 'none'})"
                     + (f", not judged on {', '.join(unjudged)} (one seed)" if unjudged else "")
                     + "; " + "; ".join(f"{t} {_ci(pos['by_task'][t])} pts" for t in a["tasks"]
                                        if t in pos["by_task"])
                     + ". Tasks where it fails cannot show an effect of pretraining.")
    else:
        lines.append("Positive control missing (needs dense and scratch runs).")
    if null:
        checked = [t for t in a["tasks"] if t in null["by_task"]]
        bad = [t for t in checked if null["by_task"][t]["null_ok"] is False]
        unjudged = [t for t in checked if null["by_task"][t]["null_ok"] is None]
        word = (f"INTERVAL EXCLUDES 0 on {', '.join(bad)}: differences of that size are noise"
                if bad else f"not judged on {', '.join(unjudged)} (one seed)" if unjudged else
                "no difference on any task, as it must")
        lines.append(f"Null control (top2_aa - top2; {PLAN}: fails exactly when the 95% t "
                     "interval excludes 0): " + word + "; "
                     + "; ".join(f"{t} {_ci(d)} pts" for t, d in null["by_task"].items()) + ".")
    else:
        lines.append("Null control missing (needs top2 and top2_aa).")
    for p in a["pairs"]:
        avg = p["by_task"].get(AVERAGE)
        lines.append(f"{p['challenger']} - {p['baseline']}: "
                     + "; ".join(f"{t} {_ci(d)}" for t, d in p["by_task"].items())
                     + f" pts. {p['challenger']} scores higher on {_wins(p)}"
                     + ("" if not avg or avg.get("n", 0) < 2 else
                        " (average: interval " + ("excludes 0)" if not avg["lo"] <= 0 <= avg["hi"]
                                                 else "includes 0)")))
    return lines


# ----------------------------------------------------------------------------------------------
# Report: markdown and plot.


def markdown(res):
    a, cfg, suite = res["analysis"], res["config"], res["suite"]
    pre = res["pretraining"]
    out = ["# Fine-tuning on a stdlib task suite (Zhou et al. 2022, Table 2 analogue)", "",
           f"Command: `{res['command']}`  ",
           f"Pretraining run: `{pre['run_dir']}` (`{pre['command']}`), arch {pre['arch']}  ",
           f"Hardware: {res['hardware']['summary']}; wall time {res['wall_time_s']:.0f} s "
           f"(sum over fine-tunings {res['finetune_time_sum_s']:.0f} s); seeds "
           f"{', '.join(map(str, res['seeds']))}  ",
           f"Recipe: {res['recipe']}", "", "## Verdict", ""]
    out += [f"- {line}" for line in a["verdict"]]
    out += ["", "## Tasks", "", f"Source: {suite['info']['source']}; {suite['info']['split']}. "
            f"Val files: {', '.join(suite['info']['files']['val'])}. Test files: "
            f"{', '.join(suite['info']['files']['test'])}.", "",
            "| task | kind | metric | train / val / test examples | prompt + answer tokens | "
            "majority baseline (test) | chance | test example |",
            "|---|---|---|---|---|---|---|---|"]
    for t in a["tasks"]:
        if t == AVERAGE:
            continue
        s = suite[t]
        ex = s["examples"][0] if s["examples"] else dict(text="", answer="")
        show = (ex["text"] + s["task"]["cue"]).replace("\n", "\\n").replace("|", "\\|")
        out.append(f"| {t} | {s['task']['kind']} | {s['task']['metric']} | "
                   f"{s['sizes']['train']} / {s['sizes']['val']} / {s['sizes']['test']} | "
                   f"{s['prompt_len']} + {s['answer_len']} | {s['baseline']['test']:.1f}% "
                   f"({s['baseline']['answer']!r}) | "
                   + (f"{s['chance']:.0f}%" if s["chance"] else "-")
                   + f" | `{show}` -> `{ex['answer']}` |")
    out += ["", "## Scores per router (test, %; mean over seeds [95% t interval]; val mean)", "",
            "| router | " + " | ".join(a["tasks"]) + " |",
            "|---|" + "---|" * len(a["tasks"])]
    base = {t: suite[t]["baseline"]["test"] for t in a["tasks"] if t != AVERAGE}
    out.append("| *majority baseline* | " + " | ".join(
        f"{base[t]:.1f}" if t in base else f"{np.mean(list(base.values())):.1f}"
        for t in a["tasks"]) + " |")
    for rt in res["routers"]:
        cells = []
        for t in a["tasks"]:
            row = a["routers"][t].get(rt)
            cells.append("-" if row is None else
                         f"{_ci(row['test'], '{:.1f}')} (val {row['val']['mean']:.1f})")
        out.append(f"| {rt} | " + " | ".join(cells) + " |")
    out += ["", "## Paired differences (challenger - baseline, test points; > 0: challenger "
            "better)", "",
            "Mean over seeds [95% t interval]; wins = tasks (not counting the average) on which "
            "the challenger scores higher, counted in each seed, then averaged.", "",
            "| pair | role | " + " | ".join(a["tasks"]) + " | wins per seed |",
            "|---|---|" + "---|" * len(a["tasks"]) + "---|"]
    rows = ([a["positive"]] if a["positive"] else []) + ([a["null"]] if a["null"] else []) + \
        a["pairs"]
    for p in rows:
        out.append(f"| {p['challenger']} - {p['baseline']} | {p['role']} | "
                   + " | ".join(_ci(p["by_task"].get(t)) for t in a["tasks"])
                   + f" | {_wins(p)} |")
    sps = [r["s_per_step"] for r in res["runs"]]
    out += ["", f"Fine-tuning speed: {np.mean(sps):.3f} s/step on average (min {min(sps):.3f}, "
            f"max {max(sps):.3f}); raw per-run scores and per-example correctness (one 0/1 "
            "character per example, in split order) in "
            "finetune.json. Paper, Table 2 (100M/32E, GLUE+SuperGLUE average): top-1 80.6, "
            "top-2 83.5, EC-CF2 85.0."]
    return "\n".join(out) + "\n"


def plot(path, res):
    """Top: test score per router per task (mean, 95% t interval) with the majority baseline.
    Bottom: paired differences challenger - baseline per task with the zero line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    a = res["analysis"]
    tasks = a["tasks"]
    fig = plt.figure(figsize=(3.2 * len(tasks) + 1, 8))
    grid = fig.add_gridspec(2, len(tasks))
    for j, t in enumerate(tasks):
        ax = fig.add_subplot(grid[0, j])
        rows = list(a["routers"][t].items())
        for i, (rt, row) in enumerate(rows):
            m, lo, hi = row["test"]["mean"], row["test"]["lo"], row["test"]["hi"]
            err = [[0 if lo is None else m - lo], [0 if hi is None else hi - m]]   # 1 seed: none
            ax.errorbar([i], [m], yerr=err, fmt="o", capsize=3)
            ax.plot([i] * len(row["per_seed"]), list(row["per_seed"].values()), ".",
                    color="gray", alpha=0.5)
        if t != AVERAGE:
            ax.axhline(res["suite"][t]["baseline"]["test"], ls="--", color="black", lw=0.8,
                       label="majority baseline")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(rows)), [r for r, _ in rows], rotation=45, fontsize=7)
        ax.set_title(f"{t} (test, %)", fontsize=9)
        ax.grid(alpha=0.3)
    bx = fig.add_subplot(grid[1, :])
    rows = ([a["positive"]] if a["positive"] else []) + ([a["null"]] if a["null"] else []) + \
        a["pairs"]
    width = 0.8 / max(len(tasks), 1)
    for j, t in enumerate(tasks):
        xs, ms, errs = [], [], [[], []]
        for i, p in enumerate(rows):
            d = p["by_task"].get(t)
            if not d or "mean" not in d:
                continue
            xs.append(i + (j - (len(tasks) - 1) / 2) * width)
            ms.append(d["mean"])
            errs[0].append(0 if d["lo"] is None else d["mean"] - d["lo"])
            errs[1].append(0 if d["hi"] is None else d["hi"] - d["mean"])
        bx.errorbar(xs, ms, yerr=errs, fmt="o", capsize=3, label=t)
    bx.axhline(0, color="black", lw=0.8)
    bx.set_xticks(range(len(rows)), [f"{p['challenger']} - {p['baseline']}"
                                     + (f"\n({p['role']})" if p["role"] != "comparison" else "")
                                     for p in rows], fontsize=7)
    bx.set_ylabel("paired difference, test points (> 0: challenger better)")
    bx.set_title("challenger - baseline, paired by seed (mean, 95% t interval)", fontsize=9)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    pre = res["pretraining"]
    fig.suptitle(f"fine-tuning of {pre['run_dir']} ({pre['arch']}), seeds "
                 f"{', '.join(map(str, res['seeds']))}: {res['recipe'][:110]}...", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


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
        spec = ROUTERS.get(base_router(rt))
        if spec is not None and spec.layer is CappedMoE:           # the router table's cap b
            b = spec.options["max_experts_per_token"]
            c = capacity_factor(rt, cfg_pre.capacity_factor)         # the layer's c and k
            k = expert_capacity(n, cfg_pre.experts, c)
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
    res["analysis"] = analyse(res)
    out = Path(cfg.out)
    write_json(out / "finetune.json", res)
    write_text(out / "finetune.md", markdown(res))
    plot(out / "finetune.png", res)
    print("\n".join(f"* {line}" for line in res["analysis"]["verdict"]))
    print(f"wrote {out / 'finetune.json'}, {out / 'finetune.md'}, {out / 'finetune.png'}")
    return res


if __name__ == "__main__":
    main()
