"""Properties of train_tiny.py and its lab/ helpers: the pretraining comparison (lm and t5) runs
end to end, is causal, resumes to the same result, is deterministic, writes strict JSON, and rejects
bad input (flags, truncated files) with a message naming the flag or the file."""
import dataclasses
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ecmoe
import train_tiny as tt
from lab import model as tiny_model
from lab import sample
from lab.corpus import load_corpus
from lab.evaluation import evaluate, expert_choice_layers
from lab.runner import Progress
from moe import routers
from moe.routers import ROUTERS, parse_routers, resolve
from moe.token_choice import TokenChoiceMoE

# A tiny config (seconds per run) given as flags, so the tests exercise the real parser.
TINY = ["--d-model", "32", "--d-ff", "32", "--n-heads", "2", "--enc-layers", "2",
        "--dec-layers", "2", "--experts", "4", "--batch-size", "4", "--chunk-bytes", "48",
        "--val-batches", "1", "--warmup", "2", "--workers", "1"]


# tiny tensors on a shared machine: one torch thread (conftest.one_thread) for every test here
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A real UTF-8 text file (Python source) for --data: faster than loading the stdlib."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(inspect.getsource(tt) * 2, encoding="utf-8")
    return str(path)


def tiny_cfg(**kw):
    cfg, _ = tt.parse_config(["--dry-run", "--device", "cpu"])
    return dataclasses.replace(cfg, **kw)


def corpus_of(cfg):
    return load_corpus(cfg.data, cfg.chunk_bytes)


def t5_cfg(**kw):
    return tiny_cfg(arch="t5", **kw)


def test_import_has_no_side_effects(tmp_path):
    """Importing the module in a fresh interpreter prints nothing and writes no file."""
    root = os.path.dirname(os.path.abspath(tt.__file__))
    done = subprocess.run([sys.executable, "-B", "-c", "import train_tiny"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and list(tmp_path.iterdir()) == []


def test_span_corruption_round_trip():
    """Inputs keep the unmasked bytes with one sentinel per span; targets hold the masked spans;
    splicing targets into the sentinels gives back the original chunk. Lengths are fixed."""
    cfg = t5_cfg(chunk_bytes=40)  # 40 * 0.15 = 6 noise bytes in round(6 / 3) = 2 spans
    assert tt.span_counts(cfg) == (6, 2, 40 - 6 + 2 + 1, 6 + 2 + 1)
    chunk = np.frombuffer(b"def f(x):\n    return x * 2  # double it", np.uint8)
    inputs, targets = tt.span_corrupt(chunk, np.random.default_rng(0), cfg)
    assert inputs[-1] == tt.EOS and targets[-1] == tt.EOS
    spans, current = {}, None
    for t in targets[:-1]:
        if t >= tt.SENTINEL0:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    rebuilt = [x for t in inputs[:-1] for x in (spans[t] if t >= tt.SENTINEL0 else [t])]
    assert (np.array(rebuilt) - tt.BYTE0).astype(np.uint8).tobytes() == chunk.tobytes()


@pytest.mark.parametrize("arch", ["lm", "t5"])
def test_batches_depend_only_on_seed_and_step(text_file, arch):
    """Training batches are a pure function of (seed, step): paired across routers, resumable."""
    cfg = tiny_cfg(data=text_file, arch=arch)
    corpus = corpus_of(cfg)
    a, b = tt.train_batch(corpus, 3, 7, cfg), tt.train_batch(corpus, 3, 7, cfg)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], tt.train_batch(corpus, 3, 8, cfg)[0])


def test_lm_targets_are_the_next_byte(text_file):
    """lm batches: targets are the inputs shifted left by one byte, every position a target."""
    cfg = tiny_cfg(data=text_file)
    ids, tgt = tt.train_batch(corpus_of(cfg), 0, 0, cfg)
    assert ids.shape == tgt.shape == (cfg.batch_size, cfg.chunk_bytes)
    assert torch.equal(ids[:, 1:], tgt[:, :-1])
    assert tt.target_tokens_per_batch(cfg) == tgt.numel()


@pytest.mark.parametrize("arch", ["lm", "t5"])
def test_routers_share_initial_non_moe_weights(arch):
    """Within a seed every router starts from the same shared (non-MoE) weights, and every MoE
    router from the same router weights (std 0.02, ecmoe.MoE's documented init)."""
    models = {r: tt.build_model(tiny_cfg(arch=arch), r) for r in ("top2", "ec2", "top2_aa",
                                                                  "dense")}
    for m in models.values():
        tt.init_weights(m, seed=5)
    ref = dict(models["top2"].named_parameters())
    for r in ("ec2", "top2_aa", "dense"):
        for name, p in models[r].named_parameters():
            if name in ref and (r != "dense" or ".ffn." not in name
                                or name.split(".")[1] in ("0", "2")):
                assert torch.equal(p, ref[name]), (r, name)
    router = [p for n, p in ref.items() if n.endswith("w_router")]
    assert router and all(abs(p.std().item() - 0.02) < 0.01 for p in router)


def _perturbation_test(model, forward, T, V, causal=True):
    """Perturb the tokens after position t; the logits at <= t must not move (if causal)."""
    with torch.no_grad():
        base = forward(None)
        for t in (0, 5, T - 2):
            out = forward(t)
            if causal:
                assert torch.allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0), t
                assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])  # the change bites
            elif not torch.allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0):
                return True
    return False


def _lm_forward(model, ids, V):
    def forward(t):
        x = ids.clone()
        if t is not None:
            x[:, t + 1:] = torch.randint(0, V, (x.shape[0], x.shape[1] - t - 1),
                                         generator=torch.Generator().manual_seed(t))
        return model(x)[0]
    return forward


@pytest.mark.parametrize("router", ["ec2", "ec1", "cap2", "top2", "top1", "top2_dropless",
                                    "top2_gshard"])
@pytest.mark.parametrize("group_size", [0, 2])
def test_lm_is_causal(router, group_size):
    """lm: perturbing tokens after position t leaves the logits at positions <= t unchanged for
    every router (position groups, whole batch or groups of 2 sequences), on the whole model."""
    torch.manual_seed(0)
    cfg = tiny_cfg(group_size=group_size, chunk_bytes=12)
    model = tt.build_model(cfg, router)
    tt.init_weights(model, 0)
    V = tt.vocab_size(cfg)
    ids = torch.randint(0, V, (4, 12))
    fwd = _lm_forward(model, ids, V)
    if router == "top2_gshard":            # same random second-expert draws for every forward
        fwd0 = fwd

        def fwd(t):
            torch.manual_seed(1)
            return fwd0(t)
    _perturbation_test(model, fwd, 12, V)


def test_lm_batch_groups_leak_the_future_for_expert_choice():
    """Negative control: EC over the whole batch (the paper's literal n) sees the future."""
    torch.manual_seed(0)
    cfg = tiny_cfg(decoder_group="batch", chunk_bytes=12)
    model = tt.build_model(cfg, "ec2")
    tt.init_weights(model, 0)
    V = tt.vocab_size(cfg)
    assert _perturbation_test(model, _lm_forward(model, torch.randint(0, V, (4, 12)), V), 12, V,
                              causal=False)


def test_subgroups_route_each_group_alone():
    """--group-size g: position groups hold g consecutive sequences of the batch, so the output
    of sequences 0..g-1 does not depend on the others; inside a group it does (EC competes).
    to_subgroups / from_subgroups are inverse."""
    x = torch.randn(8, 5, 16)
    assert torch.equal(tiny_model.from_subgroups(tiny_model.to_subgroups(x, 4), 8, 5), x)
    torch.manual_seed(0)
    moe = ecmoe.MoE(16, 8, 4, capacity_factor=1.0, group="position")
    with torch.no_grad():
        def y(inp):
            return tiny_model.from_subgroups(moe(tiny_model.to_subgroups(inp, 4)).y, 8, 5)
        base = y(x)
        other = x.clone()
        other[4:] = torch.randn(4, 5, 16)                 # the second group only
        assert torch.equal(y(other)[:4], base[:4])
        same_group = x.clone()
        same_group[1:4] = torch.randn(3, 5, 16)           # the rest of sequence 0's group
        assert not torch.allclose(y(same_group)[0], base[0])


CAUSAL = [("ec2", "same"), ("cap2", "same"), ("ec1", "same"), ("top2", "same"), ("top1", "same"),
          ("ec2", "token")]


@pytest.mark.parametrize("router,decoder_router", CAUSAL)
def test_t5_decoder_is_causal(router, decoder_router):
    """t5: perturbing decoder inputs after position t leaves the logits at positions <= t
    unchanged (decoder MoE layers route in group='position'), on the whole model."""
    torch.manual_seed(0)
    cfg = t5_cfg(decoder_router=decoder_router)
    model = tt.build_model(cfg, router)
    tt.init_weights(model, 0)
    B, S, T, V = 4, 20, 12, tt.vocab_size(cfg)
    enc = torch.randint(0, V, (B, S))
    dec = torch.randint(0, V, (B, T))

    def forward(t):
        d = dec.clone()
        if t is not None:
            d[:, t + 1:] = torch.randint(0, V, (B, T - t - 1))
        return model(enc, d)[0]
    _perturbation_test(model, forward, T, V)


def test_t5_decoder_sequence_groups_leak_for_expert_choice():
    """Negative control: EC routing each decoder sequence as one group sees the future."""
    torch.manual_seed(0)
    cfg = t5_cfg(decoder_group="sequence")
    model = tt.build_model(cfg, "ec2")
    tt.init_weights(model, 0)
    V = tt.vocab_size(cfg)
    enc, dec = torch.randint(0, V, (4, 20)), torch.randint(0, V, (4, 12))
    with torch.no_grad():
        base, _ = model(enc, dec)
        dec2 = dec.clone()
        dec2[:, 4:] = torch.randint(0, V, (4, 8))
        out, _ = model(enc, dec2)
    assert not torch.allclose(out[:, :4], base[:, :4], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["lm", "t5"])
def test_dry_run_end_to_end(tmp_path, arch):
    """`--dry-run` trains every router (and the A/A control) for two steps on the stdlib and
    writes all result files, with both controls and every matched pair analysed."""
    res = tt.main(["--dry-run", "--arch", arch, "--out", str(tmp_path)])
    assert {"results.json", "results.md", "differences.png"} <= {p.name for p in tmp_path.iterdir()}
    saved = json.loads((tmp_path / "results.json").read_text())
    a = saved["analysis"]
    assert set(a["routers"]) == set(ROUTERS) | {"top2_aa"}
    assert len(saved["runs"]) == 2 * (len(ROUTERS) + 1) and saved["seeds"] == [0, 1]
    assert saved["corpus"]["total_bytes"] > 1_000_000 and len(saved["corpus"]["sha256"]) == 64
    j = a["judgment"]                 # lab/compare.py's analysis (lab/stats.py's judgment)
    assert j["positive_control"]["baseline"] == "dense"
    assert [s["pair"] for s in j["null_controls"]] == ["top2_aa - top2"]
    assert {"ec2 - top2", "ec1 - top1", "ec2 - top2_dropless", "ec2 - top2_gshard"} <= \
        {s["pair"] for s in j["pairs"]}
    layer = "dec1"
    assert a["routers"]["ec2"]["stats"][layer]["dropped_fraction"] == 0.0
    assert a["routers"]["top2_dropless"]["stats"][layer]["dropped_fraction"] == 0.0
    assert a["verdict"] == ["Dry run (a few steps of a tiny model): the numbers test the plumbing, "
                            "no verdict."] and res["wall_time_s"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "| ec2 |" in md and "NOT reproduced" not in md and "null control" in md.lower()
    assert not list(tmp_path.glob("**/*.tmp")) and not list((tmp_path / "ckpt").glob("*.pt"))
    assert (os.stat(tmp_path / "results.json").st_mode & 0o777) != 0o600   # not mkstemp's mode
    # inference at batch size 1: every run measured it; threshold routing is batch-independent
    for r in saved["runs"]:
        inf = r["inference"]
        if resolve(r["router"]).base in ("ec1", "ec2"):
            assert abs(inf["threshold_B"] - inf["threshold_1"]) < 1e-4
            assert len(r["val_loss_threshold"]) == len(r["val_step"])
            assert len(r["thresholds_over_training"][layer]) == len(r["val_step"])
        elif resolve(r["router"]).base in ("cap2", "cap3"):   # a group of 1 token
            assert inf["group_1"] is None and "infeasible" in inf["error"]
        else:
            assert inf["group_1"] > 0
    assert "## Inference at batch size 1" in md and "| ec2 | threshold |" in md
    model, cfg = tt.load_model(tmp_path, "ec2", 1)
    assert cfg.arch == arch and not model.training
    assert all(int(m.threshold_updates) == cfg.steps for m in expert_choice_layers(model))
    # what "validation_routing" says is what val_loss and val_loss_threshold measured: the
    # final model in its training groups at the training batch size, and by its thresholds
    vals = tt.val_batches(load_corpus(cfg.data, cfg.chunk_bytes), cfg)
    run = next(r for r in saved["runs"] if r["router"] == "ec2" and r["seed"] == 1)
    device = torch.device("cpu")
    assert float(np.mean(evaluate(model, vals, device, "group"))) == run["val_loss"][-1]
    assert float(np.mean(evaluate(model, vals, device, "threshold"))) == \
        run["val_loss_threshold"][-1]
    assert saved["validation_routing"] == tt.validation_routing(cfg)
    group = {"lm": "lm: position groups of n=4 tokens", "t5": "decoder: position groups of n=4"}
    assert group[arch] in saved["validation_routing"]


def test_dry_run_does_not_write_the_default_out_dir(tmp_path, monkeypatch):
    """--dry-run without --out writes runs/dry_run, not runs/tiny (so the README's sequence,
    dry run then the default run then --resume, does not meet stale dry-run files)."""
    monkeypatch.chdir(tmp_path)
    tt.main(["--dry-run", "--routers", "top2", "--seeds", "0"])
    assert (tmp_path / "runs" / "dry_run" / "results.json").exists()
    assert not (tmp_path / "runs" / "tiny").exists()


def test_help_prints_every_flag_with_its_default(capsys):
    """`--help` works (a literal % in a help string once crashed it) and lists every flag with its
    default; so does python -m lab.sample --help."""
    with pytest.raises(SystemExit) as e:
        tt.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all("--" + f.name.replace("_", "-") in text for f in dataclasses.fields(tt.Config))
    assert text.count("(default:") == len(dataclasses.fields(tt.Config))
    flat = " ".join(text.split())
    assert "(50 of 600" in flat and "fractions of" in flat       # the schedule scales with --steps
    with pytest.raises(SystemExit) as e:
        sample.main(["--help"])
    assert e.value.code == 0 and "RUN_DIR" in capsys.readouterr().out.upper()


@pytest.fixture(scope="module")
def uninterrupted(text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    argv = TINY + ["--data", text_file, "--routers", "top2,ec2,top2_gshard", "--seeds", "0",
                   "--steps", "8", "--eval-every", "2"]
    return argv, tt.main(argv + ["--out", str(out)])


def _curves(res):
    return {(r["router"], r["seed"]): (r["train_loss"], r["val_loss"]) for r in res["runs"]}


def test_same_seed_same_loss_curve(uninterrupted, tmp_path):
    """Running the same config and seed again gives bitwise the same training and val losses
    (also for top2_gshard, whose second expert is random)."""
    argv, first = uninterrupted
    again = tt.main(argv + ["--out", str(tmp_path)])
    assert _curves(again) == _curves(first)


def test_resume_equals_uninterrupted(uninterrupted, tmp_path):
    """A run stopped at step 4 and continued with --resume ends bitwise equal to an
    uninterrupted one (model, optimiser, RNG, step and log from a weights_only checkpoint)."""
    argv, first = uninterrupted
    assert tt.main(argv + ["--out", str(tmp_path), "--stop-after", "3"]) is None
    ckpt = torch.load(tmp_path / "ckpt" / "ec2_s0.pt", weights_only=True)
    assert ckpt["step"] == 4 and len(ckpt["log"]["train_loss"]) == 4
    resumed = tt.main(argv + ["--out", str(tmp_path), "--resume"])
    assert _curves(resumed) == _curves(first)
    thresholds = [{r["router"]: r.get("thresholds_over_training") for r in res["runs"]}
                  for res in (resumed, first)]
    assert thresholds[0] == thresholds[1] and thresholds[0]["ec2"]    # buffers were checkpointed
    # resuming a finished run reuses its saved result
    assert _curves(tt.main(argv + ["--out", str(tmp_path), "--resume"])) == _curves(first)


def test_resume_refuses_another_corpus_or_code(uninterrupted, tmp_path, capsys):
    """A checkpoint records the corpus and code hashes; --resume with another corpus (or code)
    stops with an error naming what differs."""
    argv, _ = uninterrupted
    assert tt.main(argv + ["--out", str(tmp_path), "--stop-after", "3"]) is None
    other = tmp_path / "other.txt"
    other.write_text(inspect.getsource(tt) * 3, encoding="utf-8")
    i = argv.index("--data")
    with pytest.raises(SystemExit):
        tt.main(argv[:i] + ["--data", str(other)] + argv[i + 2:] + ["--out", str(tmp_path),
                                                                      "--resume"])
    assert "corpus_sha256" in capsys.readouterr().err
    ck = tmp_path / "ckpt" / "ec2_s0.pt"
    state = torch.load(ck, weights_only=True)
    state["config"]["code_sha256"] = "0" * 64
    torch.save(state, ck)
    with pytest.raises(SystemExit):
        tt.main(argv + ["--out", str(tmp_path), "--resume"])
    assert "code_sha256" in capsys.readouterr().err


def test_worker_processes_match_in_process(uninterrupted, tmp_path):
    """The worker pool (spawned processes, one thread each) gives the in-process losses."""
    argv, first = uninterrupted
    pooled = tt.main(argv + ["--out", str(tmp_path), "--workers", "2"])
    assert _curves(pooled) == _curves(first)


def test_aa_control_same_init_other_data(text_file):
    """top2_aa trains top2's model from top2's initial weights on another data order."""
    cfg = tiny_cfg(data=text_file)
    corpus = corpus_of(cfg)
    a = tt.run_one(dataclasses.replace(cfg, out="/tmp/unused_aa", steps=1), "top2", 0, corpus,
                   report=lambda m: None)
    b = tt.run_one(dataclasses.replace(cfg, out="/tmp/unused_aa", steps=1), "top2_aa", 0, corpus,
                   report=lambda m: None)
    assert a["data_seed"] == 0 and b["data_seed"] == tt.AA_DATA_SEED
    assert a["train_loss"] != b["train_loss"]


@pytest.mark.parametrize("flags,named", [
    (["--routers", "top1,top3"], "--routers"),
    (["--routers", "top3_aa"], "--routers"),
    (["--steps", "0"], "--steps"),
    (["--seeds", "0,x"], "--seeds"),
    (["--experts", "1"], "--experts"),
    (["--arch", "gpt"], "--arch"),
    (["--group-size", "3"], "--group-size"),
    (["--decoder-router", "bogus"], "--decoder-router"),
    (["--decoder-group", "bogus"], "--decoder-group"),
    (["--arch", "t5", "--encoder-group", "bogus", "--routers", "cap2"], "--encoder-group"),
    (["--data", "/nonexistent/corpus.txt"], "--data"),
    (["--routers", "top2,top2"], "--routers"),          # would write the same files twice
    (["--routers", "ec2,,top2"], "--routers"),
    (["--routers", ""], "--routers"),
    (["--seeds", "0,0"], "--seeds"),
    (["--capacity-factor", "0"], "--capacity-factor"),
    (["--routers", "cap2", "--capacity-factor", "3"], "--capacity-factor"),   # cap2: c <= 2
    (["--steps", "60", "--cooldown", "150"], "--cooldown"),   # the schedule covers the run
    (["--routers", "ec1,ec2", "--capacity-factor", "2"], "--routers"),   # one model, two names
    (["--routers", "ec2@c1", "--capacity-factor", "2"], "--routers"),    # c given twice
    (["--routers", "dense@c1"], "--routers"),                            # dense has no c
    (["--routers", "ec2@c0"], "--routers"),
    (["--decoder-router", "token"], "--decoder-router"),                 # a t5 option
])
def test_bad_flags_name_the_flag(flags, named, capsys):
    """Bad flags exit with a message that names the flag."""
    with pytest.raises(SystemExit):
        tt.main(flags + ["--out", "/tmp/unused"])
    assert named in capsys.readouterr().err


def test_bad_out_dir_is_a_clear_error(tmp_path, capsys):
    """--out naming an existing file, or a place that cannot be written, names --out."""
    f = tmp_path / "a_file"
    f.write_text("x")
    for out in (str(f), str(f / "below_a_file")):
        with pytest.raises(SystemExit):
            tt.main(["--dry-run", "--out", out])
        assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("content,why", [(b"", "empty"), (b"caf\xe9 " * 1000, "not UTF-8"),
                                         (b"short text", "bytes; need at least")])
def test_bad_data_file(tmp_path, capsys, content, why):
    """An empty, non-UTF-8 or too-short --data file gives a clear error naming --data."""
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(SystemExit):
        tt.main(["--data", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "--data" in err and why in err


def test_learning_rate_schedule():
    """Linear warmup, constant until --decay-start, inverse-sqrt decay, linear cooldown to ~0."""
    cfg = tiny_cfg(lr=1.0, warmup=10, decay_start=40, cooldown=20, steps=100)
    lr = [tt.lr_at(s, cfg) for s in range(100)]
    assert lr[4] == pytest.approx(0.5) and lr[9] == lr[20] == lr[39] == 1.0
    assert lr[59] == pytest.approx((40 / 60) ** 0.5)                        # before the cooldown
    assert lr[89] == pytest.approx((40 / 90) ** 0.5 * 11 / 20)               # inside it
    assert lr[99] == pytest.approx((40 / 100) ** 0.5 / 20) and lr[99] < 0.04
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))                     # never rises again


# ----------------------------------------------------------------------------- inference
def _trained_ec_model(cfg, router="ec2", steps=3):
    """A tiny model whose expert-choice thresholds have seen a few training forwards."""
    torch.manual_seed(0)
    model = tt.build_model(cfg, router)
    tt.init_weights(model, 0)
    V = tt.vocab_size(cfg)
    for s in range(steps):
        model(torch.randint(2, V, (4, cfg.chunk_bytes), generator=torch.Generator().manual_seed(s)))
    return model.eval(), V


def test_lm_threshold_inference_is_causal_and_batch_independent():
    """lm, EC with threshold routing: a sequence's logits alone equal its logits in the batch,
    and at batch size 1 changing tokens after t leaves the logits at <= t unchanged, even with
    --decoder-group batch (whose group routing leaks the future)."""
    for group in ("position", "batch"):
        cfg = tiny_cfg(chunk_bytes=12, decoder_group=group)
        model, V = _trained_ec_model(cfg)
        for m in expert_choice_layers(model):
            m.eval_routing = "threshold"
        ids = torch.randint(2, V, (4, 12), generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            together = model(ids)[0]
            alone = torch.cat([model(ids[i:i + 1])[0] for i in range(4)])
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
        _perturbation_test(model, _lm_forward(model, ids[:1], V), 12, V)


def test_evaluate_restores_training_state():
    """evaluate(..., "threshold") leaves every layer's eval_routing as it was and the model in
    train mode, and moves no threshold."""
    cfg = tiny_cfg(chunk_bytes=12)
    model, V = _trained_ec_model(cfg)
    model.train()
    before = [m.threshold.clone() for m in expert_choice_layers(model)]
    routing = [m.eval_routing for m in expert_choice_layers(model)]
    ids = torch.randint(2, V, (4, 12))
    evaluate(model, [(ids, ids)], torch.device("cpu"), "threshold")
    assert model.training and [m.eval_routing for m in expert_choice_layers(model)] == routing
    assert all(torch.equal(b, m.threshold) for b, m in zip(before, expert_choice_layers(model)))


@pytest.mark.parametrize("arch", ["lm", "t5"])
def test_sample_at_batch_size_one(tmp_path, arch, capsys):
    """python -m lab.sample RUN_DIR: seeded samples at batch size 1 for every router of a finished
    run (expert choice with threshold routing), deterministic, stored in results.json and shown in
    results.md; a directory without results.json, or with a saved model cut short, is a clear
    error naming it."""
    tt.main(["--dry-run", "--arch", arch, "--routers", "ec2,top2,dense", "--seeds", "0",
             "--out", str(tmp_path)])
    first = sample.main([str(tmp_path)])
    again = sample.main([str(tmp_path)])
    assert first == again and set(first["by_router"]) == {"ec2", "top2", "dense"}
    assert first["by_router"]["ec2"]["routing"] == "threshold"
    assert first["command"] == f"python -m lab.sample {tmp_path}"
    assert all(len(t) > 0 for x in first["by_router"].values() for t in x["texts"])
    md = (tmp_path / "results.md").read_text()
    assert "## Samples at batch size 1" in md
    assert md.count("| ec2 | threshold |") >= 1 + sample.PROMPTS
    assert json.loads((tmp_path / "results.json").read_text())["samples"] == first
    capsys.readouterr()
    with pytest.raises(SystemExit):
        sample.main([str(tmp_path / "nowhere")])
    assert "nowhere" in capsys.readouterr().err
    saved = tt.model_path(tmp_path, "top2", 0)
    saved.write_bytes(saved.read_bytes()[:1000])
    with pytest.raises(SystemExit):
        sample.main([str(tmp_path)])
    assert str(saved) in capsys.readouterr().err


def test_detokenize_escapes_control_bytes():
    """Samples print on one line: newline and control bytes escaped, sentinels and EOS named."""
    ids = [tt.BYTE0 + b for b in b"a\nb\x0c"] + [tt.SENTINEL0 + 1, tt.EOS]
    assert sample.detokenize(ids) == "a\\nb\\x0c<X1><eos>"


def test_group_size_larger_than_the_batch_routes_the_batch_as_one_group():
    """--group-size g with a batch of B <= g sequences (batch size 1 at inference) routes the batch
    as one position group: the same output as --group-size 0 (it crashed in to_subgroups)."""
    cfg = tiny_cfg(group_size=2)
    model = tt.build_model(cfg, "ec2")
    tt.init_weights(model, 0)
    plain = tt.build_model(tiny_cfg(group_size=0), "ec2")
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, tt.vocab_size(cfg), (1, 16))
    torch.testing.assert_close(model(ids)[0], plain(ids)[0], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Fixes of issue 16: each with the property it restores.


def test_relative_bias_index_is_built_once_per_shape(monkeypatch):
    """RelativeBias builds its bucket index (and causal mask) once per (Tq, Tk, device), on that
    device, and reuses it: the same bias as a fresh build, no CPU->device copy per forward."""
    calls = []
    build = tiny_model.relative_bucket
    monkeypatch.setattr(tiny_model, "relative_bucket",
                        lambda *a, **k: calls.append(a) or build(*a, **k))
    for bidirectional in (False, True):
        bias = tiny_model.RelativeBias(2, bidirectional)
        torch.nn.init.normal_(bias.table)
        first = bias(7, 7)
        assert len(calls) == 1 and torch.equal(bias(7, 7), first) and len(calls) == 1
        bias(5, 9)
        assert len(calls) == 2 and set(bias.cache) == {(7, 7, bias.table.device),
                                                       (5, 9, bias.table.device)}
        fresh = tiny_model.RelativeBias(2, bidirectional)
        fresh.load_state_dict(bias.state_dict())          # the cache is not in the state dict
        assert torch.equal(fresh(7, 7), first) and len(calls) == 3
        future = torch.ones(7, 7, dtype=torch.bool).triu(1)
        assert (first[0, 0][future] == -1e9).all() != bidirectional   # causal mask iff decoder
        calls.clear()


def test_loss_fn_reuses_the_moe_layer_list(monkeypatch):
    """The MoE layers are found once, when the model is built: loss_fn walks no modules."""
    cfg = tiny_cfg(chunk_bytes=12)
    model = tt.build_model(cfg, "top2")
    tt.init_weights(model, 0)
    names = [n for n, _ in model.moe_layers()]
    assert names == ["dec1"] and model.moe_layers() is model.moe_layers()

    def walked(*a, **k):
        raise AssertionError("loss_fn walked the module tree")
    monkeypatch.setattr(model, "named_modules", walked)
    monkeypatch.setattr(model, "modules", walked)
    ids = torch.randint(2, tt.vocab_size(cfg), (4, 12))
    ce, loss, outs = tt.loss_fn(model, (ids, ids), cfg)
    expected = ce + cfg.z_loss_weight * outs[0].z_loss + cfg.aux_loss_weight * outs[0].aux_loss
    assert torch.equal(loss, expected)                     # token choice: aux loss included


@pytest.mark.parametrize("argv,schedule", [
    ([], (600, 50, 300, 150)),                  # the default: today's schedule, bitwise
    (["--steps", "60"], (60, 5, 30, 15)),       # a short run keeps the shape
    (["--steps", "60", "--warmup", "2"], (60, 2, 30, 15)),
    (["--arch", "t5"], (320, 30, 0, 0)),        # the T5 preset's own fractions
    (["--arch", "t5", "--steps", "64"], (64, 6, 0, 0)),
    (["--quick"], (150, 12, 75, 38)),
])
def test_schedule_scales_with_steps(argv, schedule):
    """--warmup, --decay-start and --cooldown not given are fractions of --steps: --steps 60 no
    longer trains at ~1/8 of the peak rate inside a 150-step cooldown."""
    cfg, _ = tt.parse_config(argv + ["--device", "cpu"])
    assert (cfg.steps, cfg.warmup, cfg.decay_start, cfg.cooldown) == schedule
    lr = [tt.lr_at(s, cfg) for s in range(cfg.steps)]
    assert max(lr) == pytest.approx(cfg.lr) and lr[-1] <= lr[0] + cfg.lr
    assert np.mean(lr) > 0.4 * cfg.lr       # the fixed 50/300/150 gave --steps 60 a mean of 0.08


def test_quick_mode_is_one_seed_into_its_own_directory(tmp_path, monkeypatch, capsys, text_file):
    """--quick: one seed of top2, ec2 and dense, 150 steps, into runs/quick (never the default
    run's runs/tiny), and its output says what one short run can and cannot show."""
    cfg, _ = tt.parse_config(["--quick", "--device", "cpu"])
    assert (cfg.seeds, cfg.routers, cfg.steps) == ("0", "top2,ec2,dense", 150)
    assert cfg.out == "runs/quick"
    monkeypatch.chdir(tmp_path)
    res = tt.main(["--quick"] + TINY + ["--data", text_file, "--steps", "4", "--eval-every", "2"])
    assert (tmp_path / "runs" / "quick" / "results.json").exists()
    assert not (tmp_path / "runs" / "tiny").exists() and res["seeds"] == [0]
    out = " ".join(capsys.readouterr().out.split())
    assert "cannot show whether one router is better" in out
    assert "python train_tiny.py (3 seeds" in out
    assert "[0.00, inf]" not in out and "nan" not in out.lower().replace("nans", "")


def test_diverged_run_writes_strict_json(tmp_path, monkeypatch):
    """A run whose loss became NaN or infinite (here: lr 1e30) writes strict JSON: null, never
    NaN or Infinity, in its run file and in results.json (what a strict parser accepts)."""
    report = {}
    monkeypatch.setattr(tt.compare, "analyse", lambda res: report.setdefault("res", res) and {})
    monkeypatch.setattr(tt.compare, "markdown", lambda res: "")
    monkeypatch.setattr(tt.compare, "plot", lambda path, res: None)
    monkeypatch.setattr(tt.compare, "console_summary", lambda res: "")
    tt.main(["--dry-run", "--routers", "dense", "--seeds", "0", "--lr", "1e30", "--steps", "3",
             "--out", str(tmp_path)])

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    for path in [tmp_path / "results.json", *(tmp_path / "runs").glob("*.json")]:
        data = json.loads(path.read_text(), parse_constant=refuse)
        run = data["runs"][0] if "runs" in data else data
        assert None in run["val_loss"], path                 # it did diverge
    assert not any(isinstance(x, float) and not math.isfinite(x)
                   for x in report["res"]["runs"][0]["val_loss"])   # compare gets strict data too


def test_eta_counts_only_steps_trained_in_this_process(monkeypatch, capsys):
    """A run resumed at step 80 of 100 has 20 steps to train: the ETA is elapsed time per step
    trained HERE times the steps left, not as if the 80 restored steps had run."""
    now = [1000.0]
    monkeypatch.setattr("lab.runner.time.time", lambda: now[0])
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    show = Progress(["a", "b"], {"a": 20, "b": 100}, 100)     # a: resumed at 80; b: fresh
    now[0] += 10.0
    show(dict(job="a", step=90, info=""))                      # 10 steps here in 10 s
    assert show.eta(10.0) == pytest.approx(10.0 / 10 * (120 - 10))
    assert "ETA 1:50" in capsys.readouterr().out


@pytest.fixture(scope="module")
def stopped(uninterrupted, tmp_path_factory):
    """A run directory stopped at step 4 (checkpoints) with top2's run finished."""
    argv, _ = uninterrupted
    out = tmp_path_factory.mktemp("stopped")
    tt.main(argv + ["--out", str(out), "--routers", "top2"])
    assert tt.main(argv + ["--out", str(out), "--stop-after", "3", "--resume"]) is None
    return argv, out


@pytest.mark.parametrize("damage,what", [
    ("ckpt", "unreadable checkpoint"), ("ckpt_keys", "missing ['config']"),
    ("run", "unreadable run file"), ("run_keys", "missing ['config']")])
def test_resume_with_a_damaged_file_names_it(stopped, tmp_path, capsys, damage, what):
    """--resume with a checkpoint or a run file cut short (a full disk, a copy interrupted) or of
    another layout stops with an error naming the file, not a torch zip error, JSONDecodeError
    or KeyError: 'config'."""
    argv, src = stopped
    out = tmp_path / "out"
    import shutil
    shutil.copytree(src, out)
    path = out / ("ckpt/ec2_s0.pt" if damage.startswith("ckpt") else "runs/top2_s0.json")
    if damage == "ckpt":
        path.write_bytes(path.read_bytes()[:2000])
    elif damage == "ckpt_keys":
        state = torch.load(path, weights_only=True)
        del state["config"]
        torch.save(state, path)
    elif damage == "run":
        path.write_text(path.read_text()[:100])
    else:
        path.write_text(json.dumps({"router": "top2"}))
    with pytest.raises(SystemExit):
        tt.main(argv + ["--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert "--resume" in err and str(path) in err and what in err


def test_capacity_factor_flag(text_file, tmp_path, capsys):
    """--capacity-factor c overrides every MoE router's table value (recorded in the run config
    and in each run's effective capacity_factor); a resume with another c is refused."""
    cfg = tiny_cfg(capacity_factor=1.5)
    for router in ("ec2", "top2", "ec1", "cap2"):
        (_, layer), = tt.build_model(cfg, router).moe_layers()
        assert layer.capacity_factor == 1.5, router
    (_, layer), = tt.build_model(tiny_cfg(), "ec1").moe_layers()
    assert layer.capacity_factor == 1.0                       # the table's
    argv = TINY + ["--data", text_file, "--routers", "ec2,dense", "--seeds", "0", "--steps", "4",
                   "--eval-every", "2", "--out", str(tmp_path)]
    assert tt.main(argv + ["--capacity-factor", "1.5", "--stop-after", "1"]) is None
    res = tt.main(argv + ["--capacity-factor", "1.5", "--resume"])
    # the run is named by its label: the c is in the name wherever it is not the router's own
    assert res["routers"] == ["ec2@c1.5", "dense"]
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {"ec2@c1.5_s0.json", "dense_s0.json"}
    assert "ec2@c1.5 s0] step" in capsys.readouterr().out          # the progress lines
    runs = {r["router"]: r for r in res["runs"]}
    assert runs["ec2@c1.5"]["config"]["capacity_factor"] == 1.5
    assert runs["ec2@c1.5"]["capacity_factor"] == 1.5 and runs["dense"]["capacity_factor"] is None
    # "ec2@c1.5" is itself a router name: the same model, bitwise the same losses
    named = tt.main(TINY + ["--data", text_file, "--routers", "ec2@c1.5", "--seeds", "0",
                            "--steps", "4", "--eval-every", "2", "--out", str(tmp_path / "named")])
    assert _curves(named)[("ec2@c1.5", 0)] == _curves(res)[("ec2@c1.5", 0)]
    with pytest.raises(SystemExit):
        tt.main(argv + ["--resume"])
    assert "capacity_factor" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Issue 24: one resolver for router names, labels that carry c, a code hash from the imports.


def test_resolve_names_and_labels():
    """resolve(): a label names the c when it is not the table's ("ec2@c1"), which is itself a
    valid name; "_aa" is the null control of the same base; bad names and a c given twice are
    ValueErrors naming the problem."""
    r = resolve("ec2")
    assert (r.label, r.base, r.layer, r.capacity_factor, r.token_choice, r.null_control) == \
        ("ec2", "ec2", ecmoe.MoE, 2.0, False, False)
    assert resolve("ec2", 1).label == resolve("ec2@c1").label == resolve("ec2@c1.0").label == "ec2@c1"
    assert resolve("ec2@c1").capacity_factor == resolve("ec2@c1", 1.0).capacity_factor == 1.0
    assert resolve("ec2", 2).label == resolve("ec2@c2").label == "ec2"      # the table's own c
    assert resolve("ec1", 2).label == "ec1@c2" and resolve("top2", 1.5).label == "top2@c1.5"
    aa = resolve("top2_aa@c1")
    assert (aa.label, aa.base, aa.capacity_factor, aa.null_control, aa.token_choice) == \
        ("top2_aa@c1", "top2", 1.0, True, True)
    dense = resolve("dense", 1.5)
    assert (dense.label, dense.layer, dense.capacity_factor) == ("dense", None, None)
    for name, c, match in [("top3", None, "unknown router"), ("dense@c1", None, "no capacity"),
                           ("ec2@c0", None, "finite number > 0"), ("ec2@cx", None, "> 0"),
                           ("ec2@cinf", None, "> 0"), ("ec2@c1", 2.0, "states c = 1"),
                           ("ec2", 0.0, "capacity_factor"), ("ec2", math.nan, "capacity_factor")]:
        with pytest.raises(ValueError, match=match):
            resolve(name, c)
    # the shorthands other files import answer from resolve
    assert routers.base_router("top2_aa@c1") == "top2" and routers.capacity_factor("ec2@c1") == 1.0
    assert routers.make_layer("ec2@c1", 8, 16, 4).capacity_factor == 1.0


def test_parse_routers_refuses_one_model_under_two_names():
    """--routers ec1,ec2 --capacity-factor 2 would train expert choice at c = 2 twice, as "ec1@c2"
    and "ec2": refused, as is a label given twice; distinct models (the A/A control included) pass."""
    assert parse_routers("ec1,ec2") == ["ec1", "ec2"]
    assert parse_routers("ec2,top2,top2_aa,dense", 1) == ["ec2@c1", "top2@c1", "top2_aa@c1", "dense"]
    assert parse_routers("cap2,cap3,top2,top2_dropless", 2) == ["cap2", "cap3", "top2", "top2_dropless"]
    for text, c in [("ec1,ec2", 2.0), ("ec1,ec2", 1.0), ("et1@c2,et2", None), ("ec1@c1.5,ec2", 1.5)]:
        with pytest.raises(ValueError, match="would train the same model"):
            parse_routers(text, c)
    with pytest.raises(ValueError, match="given more than once"):
        parse_routers("ec2@c2,ec2")


def test_cli_refuses_one_model_under_two_names(capsys):
    """The trainer says why it refuses --routers ec1,ec2 --capacity-factor 2."""
    with pytest.raises(SystemExit):
        tt.main(["--routers", "ec1,ec2", "--capacity-factor", "2", "--out", "/tmp/unused"])
    err = capsys.readouterr().err
    assert "--routers" in err and "ec1@c2 and ec2 would train the same model" in err


@pytest.mark.parametrize("router", ["top1", "top2", "top2_lossfree", "ec2", "et2", "cap2"])
def test_token_choice_has_one_answer(router):
    """"Is this token choice?" is answered once (moe.routers.token_choice): the name's Resolved,
    the layer the trainer builds and the balance loss the trainer adds all agree."""
    cfg = tiny_cfg(chunk_bytes=12, aux_loss_weight=1.0)
    model = tt.build_model(cfg, router)
    tt.init_weights(model, 0)
    (_, moe), = model.moe_layers()
    answer = resolve(router).token_choice
    assert answer == isinstance(moe, TokenChoiceMoE) == routers.is_token_choice(router)
    assert answer == (router in ("top1", "top2", "top2_lossfree"))
    ids = torch.randint(2, tt.vocab_size(cfg), (4, 12))
    ce, loss, outs = tt.loss_fn(model, (ids, ids), cfg)
    with_aux = ce + cfg.z_loss_weight * outs[0].z_loss + cfg.aux_loss_weight * outs[0].aux_loss
    assert torch.equal(loss, with_aux if answer else ce + cfg.z_loss_weight * outs[0].z_loss)


def test_decoder_router_token_says_what_it_trains(tmp_path, capsys):
    """--decoder-router token (t5): the console and results.json say what each router's decoder
    MoE layers became (top-2 at the router's c), and that is what the model holds."""
    res = tt.main(["--dry-run", "--arch", "t5", "--decoder-router", "token", "--routers",
                   "ec2,ec1,top1,dense", "--seeds", "0", "--out", str(tmp_path)])
    expect = {"ec2": "top2", "ec1": "top2@c1", "top1": "top1", "dense": "dense"}
    assert res["decoder_routers"] == expect
    out = capsys.readouterr().out
    assert "the t5 decoder's MoE layers are ec2 -> top2, ec1 -> top2@c1, top1 -> top1, " \
        "dense -> dense" in out
    assert json.loads((tmp_path / "results.json").read_text())["decoder_routers"] == expect
    cfg = tiny_cfg(arch="t5", decoder_router="token")
    for run, dec in expect.items():
        want = resolve(dec)
        layers = dict(tt.build_model(cfg, run).moe_layers())
        for name, layer in layers.items():
            if name.startswith("dec"):
                assert type(layer) is want.layer and layer.capacity_factor == want.capacity_factor
                assert layer.top_k == want.options["top_k"]


ROOT = Path(tt.__file__).parent
HASH = "import train_tiny; print(train_tiny.code_sha256())"


def test_code_hash_covers_the_import_closure():
    """The hashed files are exactly the project files `import train_tiny` loads (moe/grouped.py,
    which the old hand-kept list missed, among them), found from the imports."""
    files = tt.code_files()
    listed = ("import os, sys, train_tiny; root = os.path.dirname(os.path.abspath("
              "train_tiny.__file__)); print('\\n'.join(sorted(os.path.relpath(m.__file__, root) "
              "for m in list(sys.modules.values()) if getattr(m, '__file__', None) and "
              "os.path.abspath(m.__file__).startswith(root + os.sep) and "
              "os.path.isfile(m.__file__) and '.venv' not in m.__file__)))")
    done = subprocess.run([sys.executable, "-B", "-c", listed], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert files == done.stdout.split() and "moe/grouped.py" in files


def test_code_hash_changes_with_a_file_the_old_list_missed(tmp_path):
    """Copied alone, the closure gives the same hash (it is complete); a change to moe/grouped.py
    (ET's experts run there; the old list left it out) changes it."""
    for rel in tt.code_files():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)

    def sha():
        done = subprocess.run([sys.executable, "-B", "-c", HASH], cwd=tmp_path, timeout=300,
                              capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(tmp_path)})
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()
    before = sha()
    assert before == tt.code_sha256()
    with open(tmp_path / "moe" / "grouped.py", "a") as f:
        f.write("\n# a change\n")
    assert sha() != before


# ----------------------------------------------------------------------------------------------
# Issue 23: the scale ladder, and the GPU preset as its rung 512.


def test_ladder_rung_64_is_the_default_config():
    """rung(64) is the default config's widths and lr, so the committed d=64 runs are that rung;
    the rungs scale widths only, lr as 3e-3 * sqrt(64 / d) to two digits."""
    default = tt.Config()
    assert tt.rung(64) == dict(d_model=default.d_model, d_ff=default.d_ff,
                               n_heads=default.n_heads, lr=default.lr)
    for d, lr in tt.LADDER_LR.items():
        assert lr == pytest.approx(3e-3 * math.sqrt(64 / d), rel=0.02)
        assert tt.rung(d)["d_ff"] == 2 * d and d % tt.rung(d)["n_heads"] == 0
    assert set(parse_routers(tt.LADDER_ROUTERS)) >= {"top1", "ec1", "top2", "ec2", "et2", "dense",
                                                     "top2_aa"}


def test_gpu_preset_is_ladder_rung_512(capsys):
    """--preset gpu (asked for on a CPU-only machine: parse_config only, nothing trains) is rung
    512 with the ladder's routers and top2_dropless; the tokens are the default config's; --help
    lists it."""
    cfg, _ = tt.parse_config(["--preset", "gpu", "--device", "cpu"])
    default = tt.Config()
    assert (cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.lr) == (512, 1024, 8, 1.05e-3)
    assert cfg.routers == tt.LADDER_ROUTERS + ",top2_dropless" and cfg.workers == 1
    assert (cfg.steps, cfg.batch_size, cfg.chunk_bytes, cfg.experts, cfg.dec_layers) == (
        default.steps, default.batch_size, default.chunk_bytes, default.experts, default.dec_layers)
    with pytest.raises(SystemExit):
        tt.main(["--help"])
    assert "gpu: d_model=512" in " ".join(capsys.readouterr().out.split())
