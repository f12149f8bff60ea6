"""Properties of fine-tuning (lab/finetune.py, its task suite lab/finetune_tasks.py and its report
lab/finetune_report.py): the suite is deterministic and keeps val/test on held-out files, its
examples are what they claim, the metrics score hand cases right, the controls follow the
analysis plan's rules (lab/stats.py) and the comparisons get Holm, the committed reports re-derive
to their numbers, and a dry run fine-tunes a tiny pretraining run end to end (lm and t5) into the
files the report describes."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_tiny as tt
from ecmoe import MoE
from lab import finetune as ft
from lab import finetune_report as report
from lab import finetune_tasks as suite_lib
from lab import stats
from lab.runner import import_closure
from lab.corpus import stdlib_files
from lab.evaluation import expert_choice_layers

ROOT = Path(__file__).resolve().parent.parent

SMALL = dict(train_examples=256, val_examples=64, test_examples=64)


# tiny tensors on a shared machine: one torch thread (conftest.one_thread) for every test here
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def suite():
    return suite_lib.build_suite(ft.Config(**SMALL))


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A finished tiny lm pretraining run (train_tiny --dry-run) with the controls' routers."""
    out = tmp_path_factory.mktemp("pre_lm")
    tt.main(["--dry-run", "--routers", "ec2,top2,dense,top2_aa", "--seeds", "0,1",
             "--out", str(out)])
    return out


def content(data, j, task):
    """The example's content bytes: the prompt without its left padding and cue."""
    raw = bytes(int(t) - tt.BYTE0 for t in data["prompt"][j] if t != tt.PAD)
    return raw[:len(raw) - len(task.cue)] if task.cue else raw


def test_import_has_no_side_effects(tmp_path):
    """Importing the module in a fresh interpreter prints nothing and writes no file."""
    done = subprocess.run([sys.executable, "-B", "-c", "import lab.finetune"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and list(tmp_path.iterdir()) == []


def test_help_answers_as_a_module():
    """`python -m lab.finetune --help` from the repo root prints usage (every flag) and exits 0."""
    done = subprocess.run([sys.executable, "-m", "lab.finetune", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: python -m lab.finetune")
    assert "RUN_DIR" in done.stdout and "--dry-run" in done.stdout


def test_suite_is_deterministic(suite):
    """Building the suite again from scratch (cache cleared) gives identical examples."""
    suite_lib.candidate_pools.cache_clear()
    again = suite_lib.build_suite(ft.Config(**SMALL))
    for name, d in suite["tasks"].items():
        assert d["sha256"] == again["tasks"][name]["sha256"]
        for split in suite_lib.SPLITS:
            for key in ("prompt", "answer", "label"):
                assert np.array_equal(d[split][key], again["tasks"][name][split][key])
            assert d[split]["source"] == again["tasks"][name][split]["source"]


def test_val_and_test_come_only_from_held_out_files(suite):
    """Every val / test example's source file is one pretraining held out (i % 20 == 10, as
    train_tiny.load_corpus), val and test use disjoint files, train uses none of them, and no
    val / test prompt equals a train prompt."""
    root, files = stdlib_files()
    held = {str(p.relative_to(root)) for i, p in enumerate(files) if i % 20 == 10}
    assert len(held) >= 30
    for name, d in suite["tasks"].items():
        src = {s: set(d[s]["source"]) for s in suite_lib.SPLITS}
        assert src["val"] <= held and src["test"] <= held, name
        assert not src["val"] & src["test"], name
        assert not src["train"] & held, name
        train = {p.tobytes() for p in d["train"]["prompt"]}
        assert not any(p.tobytes() in train for s in ("val", "test") for p in d[s]["prompt"])


def test_sizes_and_fixed_length_prompts(suite):
    """Each split has the requested size (root: balanced, so possibly fewer); every prompt of a
    task has the same length, padding only on the left, and ends with the task's cue."""
    for name, d in suite["tasks"].items():
        task = suite_lib.TASKS[name]
        assert len(d["train"]["answer_text"]) == SMALL["train_examples"]
        for split in suite_lib.SPLITS:
            P = d[split]["prompt"]
            assert P.shape[1] == d["train"]["prompt"].shape[1]
            real = P != tt.PAD
            assert (np.diff(real.astype(int), axis=1) >= 0).all()     # PAD, PAD, ..., bytes
            cue = [b + tt.BYTE0 for b in task.cue]
            assert not cue or (P[:, P.shape[1] - len(cue):] == cue).all()
        n_test = len(d["test"]["answer_text"])
        assert n_test == SMALL["test_examples"] or (name == "root" and n_test >= 60)


def test_valid_negatives_fail_to_parse_and_positives_parse(suite):
    """'n' statements (one byte deleted) fail ast.parse; 'y' statements parse; 50/50 split."""
    task = suite_lib.TASKS["valid"]
    for split in suite_lib.SPLITS:
        d = suite["tasks"]["valid"][split]
        for j, lab in enumerate(d["label"]):
            ok = suite_lib.parses(content(d, j, task))
            assert ok == (task.labels[lab] == b"y"), content(d, j, task)
        assert abs(np.mean(d["label"]) - 0.5) < 0.01


def test_root_labels_are_the_root_node_type(suite):
    """Every root example parses as an expression whose root node has the labelled type; the
    classes are balanced."""
    task = suite_lib.TASKS["root"]
    for split in suite_lib.SPLITS:
        d = suite["tasks"]["root"][split]
        for j, lab in enumerate(d["label"]):
            body = ast.parse(content(d, j, task), mode="eval").body
            assert type(body).__name__ == task.classes[lab]
        counts = np.bincount(d["label"], minlength=len(task.labels))
        assert counts.max() - counts.min() <= 1


def test_ident_answer_completes_an_identifier_of_the_context(suite):
    """An ident prompt ends with the identifier's first 2 bytes and the whole identifier occurs
    earlier in the prompt; the answer is the rest, then EOS."""
    task = suite_lib.TASKS["ident"]
    for split in suite_lib.SPLITS:
        d = suite["tasks"]["ident"][split]
        for j, rest in enumerate(d["answer_text"]):
            text = content(d, j, task)
            ident = text[-suite_lib.IDENT_HINT:] + rest.encode()
            assert ident in text[:-suite_lib.IDENT_HINT]
            assert (ident[:1].isalpha() or ident[:1] == b"_") and len(ident) >= 4
            ans = d["answer"][j]
            assert list(ans[:len(rest) + 1]) == [b + tt.BYTE0 for b in rest.encode()] + [tt.EOS]


def test_lm_and_t5_batches_put_the_answer_where_the_loss_is():
    """lm: targets are -100 except answer positions P-1.., ids continue the prompt with the
    answer; t5: encoder gets the prompt, decoder input is the answer shifted right after PAD."""
    data = dict(prompt=np.array([[0, 5, 6], [7, 8, 9]]), answer=np.array([[10, 1, 0],
                                                                            [11, 12, 1]]))
    ids, tgt = ft.make_batch(data, np.array([0, 1]), "lm")
    assert ids.tolist() == [[0, 5, 6, 10, 1], [7, 8, 9, 11, 12]]
    assert tgt.tolist() == [[-100, -100, 10, 1, -100], [-100, -100, 11, 12, 1]]
    enc, dec, tgt = ft.make_batch(data, np.array([1]), "t5")
    assert enc.tolist() == [[7, 8, 9]] and dec.tolist() == [[0, 11, 12]]
    assert tgt.tolist() == [[11, 12, 1]]


def test_metrics_on_hand_cases():
    """Exact match, accuracy, rank classification (ties: first label), answer decoding."""
    assert suite_lib.exact_match([b"ab", None, b"c"], [b"ab", b"x", b"d"]) == pytest.approx(100 / 3)
    assert suite_lib.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 75.0
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [9.0, 0.0, 3.0, 3.0]])
    assert suite_lib.rank_classify(logits, torch.tensor([2, 3])).tolist() == [1, 0]
    B = tt.BYTE0
    assert suite_lib.decode_answer([ord("a") + B, ord("b") + B, tt.EOS, 0], tt.EOS) == b"ab"
    assert suite_lib.decode_answer([ord("a") + B, ord("b") + B], tt.EOS) is None       # never ended
    assert suite_lib.decode_answer([tt.PAD, tt.EOS], tt.EOS) is None                   # not a byte


class ScriptedLM(torch.nn.Module):
    """Stub lm: row b emits the bytes of scripts[b] one per step (argmax), then EOS."""
    def __init__(self, scripts, V=260):
        super().__init__()
        self.scripts, self.V, self.P, self.seen = scripts, V, None, []

    def forward(self, ids):
        B, T = ids.shape
        self.P = self.P or T
        self.seen.append(ids.clone())
        logits = torch.zeros(B, T, self.V)
        i = T - self.P                                   # answer tokens so far
        for b, s in enumerate(self.scripts):
            tok = s[i] + tt.BYTE0 if i < len(s) else tt.EOS
            logits[b, -1, tok] = 1.0
        return logits, []

    def moe_layers(self):                                # no MoE layer
        return []


def test_generate_stops_and_pads_finished_rows():
    """Greedy decoding stops at the stop token; a finished row continues with PAD (as after
    the answer in training); the output always has max_len columns."""
    model = ScriptedLM([b"a", b"bcd"])
    out = ft.generate(model, torch.full((2, 3), 7), "lm", 6, tt.EOS)
    B = tt.BYTE0
    assert out.tolist() == [[ord("a") + B, tt.EOS, 0, 0, 0, 0],
                            [ord("b") + B, ord("c") + B, ord("d") + B, tt.EOS, 0, 0]]
    assert len(model.seen) == 4                          # stopped when both rows ended
    assert model.seen[-1][0, -2:].tolist() == [tt.EOS, tt.PAD]
    assert [suite_lib.decode_answer(r, tt.EOS) for r in out] == [b"a", b"bcd"]


def test_evaluate_pads_the_last_batch_and_scores_each_example_once():
    """5 examples in batches of 2: every batch has 2 rows, 5 scores come back, the padded
    row is not scored."""
    scripts = [b"ab", b"c", b"ab", b"xy", b"q"]
    gold = ["ab", "c", "zz", "xy", "q"]

    class ByPrompt(ScriptedLM):
        def forward(self, ids):
            self.scripts = [scripts[int(r[0]) - 10] for r in ids]
            return super().forward(ids)

    model = ByPrompt(scripts)
    data = dict(prompt=np.array([[10 + j, 3, 3] for j in range(5)]), answer_text=gold,
                answer=np.zeros((5, 4), np.int64), label=np.full(5, -1))
    score, correct = ft.evaluate(model, suite_lib.TASKS["ident"], data, "lm", 2, torch.device("cpu"))
    assert correct == [1, 1, 0, 1, 1] and score == 80.0
    assert {len(x) for x in model.seen} == {2}


def test_evaluate_routes_trained_expert_choice_by_group_as_in_pretraining(monkeypatch):
    """A trained expert-choice model (default eval_routing "auto") is scored with group routing,
    as the committed fine-tuning results were, never by its thresholds; its eval_routing and
    train mode come back afterwards."""
    cfg, _ = tt.parse_config(["--dry-run"])
    model = tt.build_model(cfg, "ec2")
    tt.init_weights(model, 0)
    model(torch.randint(tt.BYTE0, 200, (4, 8)))          # a training forward: thresholds learned
    seen, routes = [], MoE.routes_by_threshold
    monkeypatch.setattr(MoE, "routes_by_threshold", lambda self: seen.append(routes(self)) or seen[-1])
    data = dict(prompt=np.full((3, 4), 10), answer_text=["a", "b", "c"],
                answer=np.zeros((3, 2), np.int64), label=np.full(3, -1))
    ft.evaluate(model, suite_lib.TASKS["ident"], data, "lm", 2, torch.device("cpu"))
    assert seen and not any(seen)
    assert model.training and all(m.eval_routing == "auto" for m in expert_choice_layers(model))


def test_evaluate_classify_is_rank_classification_over_the_label_bytes():
    """Classification scores the label bytes' logits at the last prompt position: here the
    stub prefers 'n' for prompts starting with an odd token, 'y' otherwise; other tokens have
    higher logits but are not labels."""
    task = suite_lib.TASKS["valid"]
    y, n = (lab[0] + tt.BYTE0 for lab in task.labels)

    class Stub(torch.nn.Module):
        def forward(self, ids):
            logits = torch.zeros(*ids.shape, 260)
            logits[:, -1, 99] = 10.0                               # not a label: ignored
            odd = ids[:, 0] % 2 == 1
            logits[:, -1, n] = odd.float()
            logits[:, -1, y] = (~odd).float()
            return logits, []

        def moe_layers(self):
            return []

    data = dict(prompt=np.array([[4, 3], [5, 3], [6, 3]]), label=np.array([0, 1, 1]),
                answer_text=["y", "n", "n"], answer=np.zeros((3, 1), np.int64))
    score, correct = ft.evaluate(Stub(), task, data, "lm", 2, torch.device("cpu"))
    assert correct == [1, 1, 0] and score == pytest.approx(200 / 3)


def test_scratch_is_the_dense_model_at_init(lm_run):
    """The positive control starts from train_tiny.init_weights of the run's dense model,
    not from the pretrained dense weights."""
    scratch, _, sha = ft.load_for_finetuning(lm_run, ft.SCRATCH, 1, torch.device("cpu"))
    pre, cfg = tt.load_model(lm_run, "dense", 1)
    init = tt.build_model(cfg, "dense")
    tt.init_weights(init, 1)
    for (name, a), b, c in zip(scratch.state_dict().items(), init.state_dict().values(),
                               pre.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(scratch.state_dict().values(),
                                                       pre.state_dict().values()))
    assert sha == "init_weights(seed=1)"


def test_schedule_warms_up_then_decays_to_zero():
    """Linear warmup to --lr over --warmup steps, linear decay to 0 at --steps."""
    cfg = ft.Config(steps=10, warmup=2, lr=1.0)
    lrs = [ft.lr_at(s, cfg) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == 1.0 and lrs[-1] == pytest.approx(0.125)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_analysis_pairs_by_seed_and_counts_wins_per_seed():
    """Paired differences use the same seed on both sides; wins count tasks per seed."""
    runs = []
    table = {"ec2": {"a": [60, 70], "b": [50, 50]}, "dense": {"a": [50, 60], "b": [55, 40]}}
    for rt, tasks in table.items():
        for task, scores in tasks.items():
            runs += [dict(router=rt, seed=s, task=task, val=v, test=v, s_per_step=0.1)
                     for s, v in enumerate(scores)]
    res = dict(runs=runs, routers=["ec2", "dense"], tasks=["a", "b"])
    a = report.analyse(res)
    p = next(p for p in a["pairs"] if (p["challenger"], p["baseline"]) == ("ec2", "dense"))
    assert p["by_task"]["a"]["per_seed"] == [10, 10] and p["by_task"]["a"]["mean"] == 10
    assert p["by_task"]["b"]["per_seed"] == [-5, 10]
    assert p["wins_per_seed"] == {0: 1, 1: 2} and p["n_tasks"] == 2
    assert a["routers"][report.AVERAGE]["ec2"]["per_seed"] == {0: 55.0, 1: 60.0}
    assert a["positive"] is None and a["null"] is None


def scores_result(table):
    """A finetune result dict from {router: {task: [score per seed]}} (test = val = score)."""
    runs = [dict(router=rt, seed=s, task=task, val=v, test=v, s_per_step=0.1)
            for rt, tasks in table.items() for task, scores in tasks.items()
            for s, v in enumerate(scores)]
    return dict(runs=runs, routers=list(table), tasks=list(next(iter(table.values()))))


def test_controls_follow_the_analysis_plan():
    """The positive control passes exactly when stats.positive_control passes on the differences
    with the sign of a loss (pretrained dense scores higher, interval excludes 0): a consistent
    small gain passes even when its mean is under 2 sd (the old v0 clause is gone). The null
    control fails exactly when the interval excludes 0. One seed: neither is judged (None). The
    verdict names the plan."""
    table = {"dense": {"a": [60, 70, 80, 50], "b": [50, 52, 54, 56]},
             ft.SCRATCH: {"a": [58, 67, 74, 43], "b": [50, 52, 54, 56]},
             "top2": {"a": [40, 41, 42, 43], "b": [60, 60, 60, 60]},
             "top2_aa": {"a": [40, 42, 41, 44], "b": [70, 71, 72, 73]}}
    a = report.analyse(scores_result(table))
    pos, null = a["positive"]["by_task"], a["null"]["by_task"]
    d = pos["a"]["per_seed"]
    assert d == [2, 3, 6, 7] and abs(np.mean(d)) < 2 * np.std(d, ddof=1)   # v0 would fail it
    assert pos["a"]["passes"] is True is stats.positive_control([-x for x in d])["passed"]
    assert pos["b"]["passes"] is False                       # no difference at all
    assert null["a"]["null_ok"] is True and null["b"]["null_ok"] is False
    assert null["b"]["null_ok"] is stats.null_control(null["b"]["per_seed"])["passed"]
    text = " ".join(a["verdict"])
    assert f"analysis plan v{stats.PLAN_VERSION}" in text and "INTERVAL EXCLUDES 0 on b" in text
    one = report.analyse(scores_result({rt: {t: v[:1] for t, v in x.items()} for rt, x in table.items()}))
    assert one["positive"]["by_task"]["a"]["passes"] is None
    assert one["null"]["by_task"]["b"]["null_ok"] is None
    assert one["positive"]["by_task"]["a"]["lo"] is None     # one seed: no interval
    assert "not judged" in " ".join(one["verdict"])


def test_comparisons_get_holm_over_the_family():
    """Each comparison's average carries the Holm-adjusted p of the family of comparisons
    (stats.holm of their paired-t p, in order); the controls are not in the family; the verdict
    and the table quote it."""
    table = {"ec1": {"a": [60, 62, 64, 66], "b": [50, 51, 52, 53]},
             "top1": {"a": [50, 51, 52, 54], "b": [50, 50, 52, 52]},
             "ec2": {"a": [55, 56, 57, 58], "b": [50, 51, 50, 51]},
             "top2": {"a": [55, 55, 58, 58], "b": [51, 51, 50, 50]},
             "top2_aa": {"a": [55, 56, 57, 59], "b": [51, 50, 50, 51]}}
    a = report.analyse(scores_result(table))
    family = [p["by_task"][report.AVERAGE] for p in a["pairs"]]
    assert [(p["challenger"], p["baseline"]) for p in a["pairs"]] == [("ec1", "top1"), ("ec2", "top2")]
    assert [d["p_holm"] for d in family] == stats.holm([d["p"] for d in family])
    assert family[0]["p_holm"] == pytest.approx(min(1.0, 2 * min(d["p"] for d in family)))
    assert "p_holm" not in a["null"]["by_task"][report.AVERAGE]
    assert f"Holm p = {family[0]['p_holm']:.3g} over the 2 comparisons" in a["verdict"][2]
    assert [role for role, _ in report.rows_of(a)] == ["null control", "", ""]   # no positive


def test_labels_pair_at_one_capacity_factor():
    """Run labels carry the c a run used when it differs from the router table's (moe/routers.py):
    "ec2@c1" pairs with "top2@c1" (the ec2 - top2 pair at c = 1) and with dense (no c), never
    with "top2" (c = 2); the null control "top2_aa@c1" pairs with "top2@c1"."""
    table = {rt: {"a": [50, 52, 54], "b": [60, 61, 62]}
             for rt in ("ec2@c1", "top2@c1", "top2", "dense", "top2_aa@c1")}
    a = report.analyse(scores_result(table))
    assert [(p["challenger"], p["baseline"]) for p in a["pairs"]] == [
        ("ec2@c1", "top2@c1"), ("ec2@c1", "dense"), ("top2@c1", "dense"), ("top2", "dense")]
    assert (a["null"]["challenger"], a["null"]["baseline"]) == ("top2_aa@c1", "top2@c1")


@pytest.mark.parametrize("name", ["lm_finetune", "lm_finetune_after_ec"])
def test_committed_reports_re_derive(name, tmp_path):
    """assets/NAME/finetune.json (written by the earlier finetune.py) re-derives, through
    python -m lab.finetune_report, every score, difference, interval and control it holds
    (the new Holm clause aside, the comparisons' verdict lines are the committed ones) into
    finetune.md and a figure."""
    path = ROOT / "assets" / name / "finetune.json"
    res = json.loads(path.read_text())
    again = report.analyse(res)
    old = res["analysis"]
    assert again["tasks"] == old["tasks"]
    for role in ("positive", "null"):
        for task, d in again[role]["by_task"].items():
            for key in ("mean", "lo", "hi"):
                assert d[key] == pytest.approx(old[role]["by_task"][task][key]), (role, task, key)
    assert all(d["passes"] is True for d in again["positive"]["by_task"].values())
    assert all(d["null_ok"] is True for d in again["null"]["by_task"].values())
    assert [(p["challenger"], p["baseline"]) for p in again["pairs"]] == \
        [(p["challenger"], p["baseline"]) for p in old["pairs"]]
    for p, q in zip(again["pairs"], old["pairs"]):
        for task, d in p["by_task"].items():
            assert [d[k] for k in ("mean", "lo", "hi", "n")] == \
                pytest.approx([q["by_task"][task][k] for k in ("mean", "lo", "hi", "n")]), task
        assert json.loads(json.dumps(p["wins_per_seed"])) == q["wins_per_seed"]
    n = len(again["pairs"])
    assert [re.sub(r"; Holm p = \S+ over the \d+ comparisons", "", v) for v in again["verdict"][2:]] \
        == old["verdict"][2:] and n == len(old["verdict"]) - 2
    assert report.main([str(path), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "finetune.md").read_text()
    assert f"analysis plan v{stats.PLAN_VERSION}" in md and "Holm p (average)" in md
    assert (tmp_path / "finetune.png").read_bytes()[:4] == b"\x89PNG"


def test_code_hash_covers_the_suite_and_the_report():
    """A fine-tuning result's code_sha256 covers this tool, its task suite and its report (the
    files it imports, lab.runner.import_closure), and the trainer's files."""
    files = import_closure(ROOT, "lab/finetune.py")
    for f in ("lab/finetune.py", "lab/finetune_tasks.py", "lab/finetune_report.py",
              "train_tiny.py", "ecmoe.py", "moe/grouped.py"):
        assert f in files, f


def test_dry_run_end_to_end_lm_and_resume(lm_run, capsys):
    """A dry run fine-tunes every (router, seed, task) plus scratch, writes finetune.json / .md /
    .png, the markdown shows each router, task, baseline and control; --resume reuses all."""
    res = ft.main([str(lm_run), "--dry-run"])
    out = lm_run / "finetune_dry_run"
    assert {"finetune.json", "finetune.md", "finetune.png"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "finetune.json").read_text())
    routers = ["ec2", "top2", "dense", "top2_aa", ft.SCRATCH]
    assert saved["routers"] == routers and saved["seeds"] == [0, 1]
    assert len(saved["runs"]) == len(routers) * 2 * len(suite_lib.TASKS)
    assert all(r["arch"] == "lm" and 0 <= r["test"] <= 100 for r in saved["runs"])
    assert len(list((out / "finetune_runs").glob("*.json"))) == len(saved["runs"])
    md = (out / "finetune.md").read_text()
    for word in routers + list(suite_lib.TASKS) + ["positive control", "null control",
                                            "majority baseline", "ec2 - top2", "ec2 - dense"]:
        assert word in md
    for name, s in saved["suite"].items():
        if name != "info":
            assert f"{s['baseline']['test']:.1f}%" in md
    assert (out / "finetune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["analysis"]["positive"]["challenger"] == "dense"
    assert saved["analysis"]["null"]["challenger"] == "top2_aa"
    assert saved["command"].startswith("python -m lab.finetune ")
    assert f"analysis plan v{stats.PLAN_VERSION}" in md
    capsys.readouterr()
    again = ft.main([str(lm_run), "--dry-run", "--resume"])
    assert "(30 already done)" in capsys.readouterr().out
    key = [(r["task"], r["router"], r["seed"], r["test"]) for r in res["runs"]]
    assert key == [(r["task"], r["router"], r["seed"], r["test"]) for r in again["runs"]]


def test_dry_run_t5(tmp_path):
    """The t5 arch fine-tunes too: encoder gets the prompt, decoder the answer."""
    tt.main(["--arch", "t5", "--dry-run", "--routers", "ec2,dense", "--seeds", "0",
             "--out", str(tmp_path)])
    res = ft.main([str(tmp_path), "--dry-run", "--tasks", "ident,valid"])
    assert {r["arch"] for r in res["runs"]} == {"t5"}
    assert len(res["runs"]) == 3 * 2
    assert (tmp_path / "finetune_dry_run" / "finetune.md").exists()


@pytest.mark.parametrize("argv, flag", [
    (["--tasks", "ident,glue"], "--tasks"),
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--seeds", "0,x"], "--seeds"),
    (["--routers", "top1"], "--routers"),
    (["--routers", "scratch"], "--routers"),
    (["--seeds", "7"], "--seeds"),
    (["--batch-size", "64", "--train-examples", "32"], "--train-examples"),
    (["--stmt-bytes", "4"], "--stmt-bytes"),
])
def test_bad_input_names_the_flag(lm_run, capsys, argv, flag):
    """Bad flags stop with a message that names the flag."""
    with pytest.raises(SystemExit):
        ft.main([str(lm_run), "--dry-run", *argv])
    assert flag in capsys.readouterr().err


def test_missing_run_dir_is_a_clear_error(tmp_path, capsys):
    """A RUN_DIR that does not exist, or has no saved models, is named in the error."""
    for d in (tmp_path / "nope", tmp_path):
        with pytest.raises(SystemExit):
            ft.main([str(d), "--dry-run"])
        assert "RUN_DIR" in capsys.readouterr().err
