"""Properties of train_tiny.py: the pretraining comparison (lm and t5) runs end to end, is causal,
resumes to the same result, is deterministic, and rejects bad input with a message naming the flag."""
import dataclasses
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ecmoe
import train_tiny as tt

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
    return dataclasses.replace(tt.Config(), **{**tt.DRY_RUN, "device": "cpu", **kw})


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
    corpus = tt.load_corpus(cfg)
    a, b = tt.train_batch(corpus, 3, 7, cfg), tt.train_batch(corpus, 3, 7, cfg)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], tt.train_batch(corpus, 3, 8, cfg)[0])


def test_lm_targets_are_the_next_byte(text_file):
    """lm batches: targets are the inputs shifted left by one byte, every position a target."""
    cfg = tiny_cfg(data=text_file)
    ids, tgt = tt.train_batch(tt.load_corpus(cfg), 0, 0, cfg)
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
    assert torch.equal(tt.from_subgroups(tt.to_subgroups(x, 4), 8, 5), x)
    torch.manual_seed(0)
    moe = ecmoe.MoE(16, 8, 4, router="expert_choice", capacity_factor=1.0, group="position")
    with torch.no_grad():
        def y(inp):
            return tt.from_subgroups(moe(tt.to_subgroups(inp, 4)).y, 8, 5)
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
    assert {"results.json", "results.md", "val_loss.png"} <= {p.name for p in tmp_path.iterdir()}
    saved = json.loads((tmp_path / "results.json").read_text())
    a = saved["analysis"]
    assert set(a["routers"]) == set(tt.ALL_ROUTERS) | {"top2_aa"}
    assert len(saved["runs"]) == 2 * (len(tt.ALL_ROUTERS) + 1) and saved["seeds"] == [0, 1]
    assert saved["corpus"]["total_bytes"] > 1_000_000 and len(saved["corpus"]["sha256"]) == 64
    assert a["positive"]["baseline"] == "dense" and "top2_aa" in a["null"]
    assert {"ec2 vs top2", "ec1 vs top1", "ec2 vs top2_dropless", "ec2 vs top2_gshard"} <= set(a["pairs"])
    layer = "dec1"
    assert a["routers"]["ec2"]["stats"][layer]["dropped_fraction"] == 0.0
    assert a["routers"]["top2_dropless"]["stats"][layer]["dropped_fraction"] == 0.0
    assert a["verdict"] == ["Dry run (a few steps of a tiny model): the numbers test the plumbing, "
                            "no verdict."] and res["wall_time_s"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "| ec2 |" in md and "NOT reproduced" not in md and "null control" in md
    assert not list(tmp_path.glob("**/*.tmp")) and not list((tmp_path / "ckpt").glob("*.pt"))
    assert (os.stat(tmp_path / "results.json").st_mode & 0o777) != 0o600   # not mkstemp's mode
    # inference at batch size 1: every run measured it; threshold routing is batch-independent
    for r in saved["runs"]:
        inf = r["inference"]
        if tt.base_router(r["router"]) in ("ec1", "ec2"):
            assert abs(inf["threshold_B"] - inf["threshold_1"]) < 1e-4
            assert len(r["val_loss_threshold"]) == len(r["val_step"])
            assert len(r["thresholds_over_training"][layer]) == len(r["val_step"])
        elif tt.base_router(r["router"]) in ("cap2", "cap3"):   # a group of 1 token
            assert inf["group_1"] is None and "infeasible" in inf["error"]
        else:
            assert inf["group_1"] > 0
    assert "## Inference at batch size 1" in md and "| ec2 | threshold |" in md
    model, cfg = tt.load_model(tmp_path, "ec2", 1)
    assert cfg.arch == arch and not model.training
    assert all(int(m.threshold_updates) == cfg.steps for m in tt.expert_choice_layers(model))


def test_dry_run_does_not_write_the_default_out_dir(tmp_path, monkeypatch):
    """--dry-run without --out writes runs/dry_run, not runs/tiny (so the README's sequence,
    dry run then the default run then --resume, does not meet stale dry-run files)."""
    monkeypatch.chdir(tmp_path)
    tt.main(["--dry-run", "--routers", "top2", "--seeds", "0"])
    assert (tmp_path / "runs" / "dry_run" / "results.json").exists()
    assert not (tmp_path / "runs" / "tiny").exists()


def test_help_prints_every_flag(capsys):
    """`--help` works (a literal % in a help string once crashed it) and lists every flag."""
    with pytest.raises(SystemExit) as e:
        tt.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all("--" + f.name.replace("_", "-") in text for f in dataclasses.fields(tt.Config))


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
    corpus = tt.load_corpus(cfg)
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
    (["--data", "/nonexistent/corpus.txt"], "--data"),
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
        for m in tt.expert_choice_layers(model):
            m.eval_routing = "threshold"
        ids = torch.randint(2, V, (4, 12), generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            together = model(ids)[0]
            alone = torch.cat([model(ids[i:i + 1])[0] for i in range(4)])
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
        _perturbation_test(model, _lm_forward(model, ids[:1], V), 12, V)


def test_evaluate_restores_training_state():
    """evaluate(..., "threshold") leaves every layer in group routing and the model in train mode,
    and moves no threshold."""
    cfg = tiny_cfg(chunk_bytes=12)
    model, V = _trained_ec_model(cfg)
    model.train()
    before = [m.threshold.clone() for m in tt.expert_choice_layers(model)]
    ids = torch.randint(2, V, (4, 12))
    tt.evaluate(model, [(ids, ids)], torch.device("cpu"), "threshold")
    assert model.training and all(m.eval_routing == "group" for m in tt.expert_choice_layers(model))
    assert all(torch.equal(b, m.threshold) for b, m in zip(before, tt.expert_choice_layers(model)))


@pytest.mark.parametrize("arch", ["lm", "t5"])
def test_sample_at_batch_size_one(tmp_path, arch):
    """--sample RUN_DIR: seeded samples at batch size 1 for every router of a finished run
    (expert choice with threshold routing), deterministic, stored in results.json and shown in
    results.md; a directory without results.json is a clear error."""
    tt.main(["--dry-run", "--arch", arch, "--routers", "ec2,top2,dense", "--seeds", "0",
             "--out", str(tmp_path)])
    first = tt.main(["--sample", str(tmp_path)])
    again = tt.main(["--sample", str(tmp_path)])
    assert first == again and set(first["by_router"]) == {"ec2", "top2", "dense"}
    assert first["by_router"]["ec2"]["routing"] == "threshold"
    assert all(len(t) > 0 for x in first["by_router"].values() for t in x["texts"])
    md = (tmp_path / "results.md").read_text()
    assert "## Samples at batch size 1" in md and md.count("| ec2 | threshold |") >= 1 + tt.SAMPLE_PROMPTS
    assert json.loads((tmp_path / "results.json").read_text())["samples"] == first
    with pytest.raises(SystemExit):
        tt.main(["--sample", str(tmp_path / "nowhere")])


def test_detokenize_escapes_control_bytes():
    """Samples print on one line: newline and control bytes escaped, sentinels and EOS named."""
    ids = [tt.BYTE0 + b for b in b"a\nb\x0c"] + [tt.SENTINEL0 + 1, tt.EOS]
    assert tt.detokenize(ids) == "a\\nb\\x0c<X1><eos>"


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
