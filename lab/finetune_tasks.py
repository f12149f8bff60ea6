"""The downstream task suite of lab/finetune.py: small tasks built from held-out stdlib files.

GLUE cannot be downloaded here, so the suite is made from the Python standard library source
(parsed with `ast`). Built in ~3-5 s on 2 cores, deterministic (numpy default_rng with fixed
seeds): a pure function of the installed stdlib and the size fields of lab.finetune.Config.

Splits, by FILE. Pretraining (lab.corpus.load_corpus) holds out every 20th stdlib file
(i % 20 == 10 of the sorted list of lab.corpus.stdlib_files()):
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

`cfg` below is any object with the size fields of lab.finetune.Config (context_bytes,
answer_bytes, stmt_bytes; build_suite also train_examples, val_examples, test_examples,
batch_size and tasks). Tokens are train_tiny's: byte + BYTE0, PAD and EOS.
Shape legend: N examples, P prompt length, A answer length.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import gc
import hashlib
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from lab.corpus import stdlib_files
from train_tiny import BYTE0, EOS, PAD    # the pretraining vocabulary: token = byte + BYTE0

SPLIT_SEED = 20_220_209      # sampling of the suite (fixed: the same suite for every run)


def task_names(text):
    """'ident, valid' -> ['ident', 'valid'] (the --tasks flag)."""
    return [t.strip() for t in text.split(",") if t.strip()]


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
    cfg = SimpleNamespace(context_bytes=context_bytes, answer_bytes=answer_bytes,
                          stmt_bytes=stmt_bytes)
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
    tasks = list(tasks or task_names(cfg.tasks))
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
# Metrics.


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

