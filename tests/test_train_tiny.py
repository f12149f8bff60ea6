"""Properties of train_tiny.py: the pretraining comparison runs end to end, is causal, resumes to
the same result, is deterministic, and rejects bad input with a message naming the flag."""
import dataclasses
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_tiny as tt

# A tiny config (seconds per run) given as flags, so the tests exercise the real parser.
TINY = ["--d-model", "32", "--d-ff", "32", "--n-heads", "2", "--enc-layers", "2",
        "--dec-layers", "2", "--experts", "4", "--batch-size", "4", "--chunk-bytes", "48",
        "--val-batches", "1", "--warmup", "2", "--workers", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors on a shared machine: one thread avoids OpenMP oversubscription stalls."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A real UTF-8 text file (Python source) for --data: faster than loading the stdlib."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(inspect.getsource(tt) * 2, encoding="utf-8")
    return str(path)


def tiny_cfg(**kw):
    return dataclasses.replace(tt.Config(), **{**tt.DRY_RUN, "device": "cpu", **kw})


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
    cfg = tiny_cfg(chunk_bytes=40)  # 40 * 0.15 = 6 noise bytes in round(6 / 3) = 2 spans
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


def test_batches_depend_only_on_seed_and_step(text_file):
    """Training batches are a pure function of (seed, step): paired across routers, resumable."""
    cfg = tiny_cfg(data=text_file)
    corpus = tt.load_corpus(cfg)
    a, b = tt.train_batch(corpus, 3, 7, cfg), tt.train_batch(corpus, 3, 7, cfg)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], tt.train_batch(corpus, 3, 8, cfg)[0])


def test_routers_share_initial_non_moe_weights():
    """Within a seed every router starts from the same shared (non-MoE) weights."""
    models = {r: tt.TinyT5(tiny_cfg(), r) for r in ("top2", "ec2", "dense")}
    for m in models.values():
        tt.init_weights(m, seed=5)
    ref = dict(models["top2"].named_parameters())
    for r in ("ec2", "dense"):
        for name, p in models[r].named_parameters():
            if ".ffn." not in name or name.split(".")[1] in ("0", "2"):  # even layers: gated FFN
                assert torch.equal(p, ref[name]), (r, name)


CAUSAL = [("ec2", "same"), ("cap2", "same"), ("ec1", "same"), ("top2", "same"), ("top1", "same"),
          ("ec2", "token")]


@pytest.mark.parametrize("router,decoder_router", CAUSAL)
def test_decoder_is_causal(router, decoder_router):
    """Perturbing decoder inputs after position t leaves the logits at positions <= t unchanged
    (decoder MoE layers route in group='position'), on the whole model."""
    torch.manual_seed(0)
    cfg = tiny_cfg(decoder_router=decoder_router)
    model = tt.TinyT5(cfg, router)
    tt.init_weights(model, 0)
    B, S, T, V = 4, 20, 12, tt.vocab_size(cfg)
    enc = torch.randint(0, V, (B, S))
    dec = torch.randint(0, V, (B, T))
    with torch.no_grad():
        base, _ = model(enc, dec)
        for t in (0, 5, T - 2):
            dec2 = dec.clone()
            dec2[:, t + 1:] = torch.randint(0, V, (B, T - t - 1))
            out, _ = model(enc, dec2)
            assert torch.allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0), t
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])  # the perturbation bites


def test_decoder_sequence_groups_leak_for_expert_choice():
    """Negative control: EC routing each decoder sequence as one group sees the future."""
    torch.manual_seed(0)
    cfg = tiny_cfg(decoder_group="sequence")
    model = tt.TinyT5(cfg, "ec2")
    tt.init_weights(model, 0)
    V = tt.vocab_size(cfg)
    enc, dec = torch.randint(0, V, (4, 20)), torch.randint(0, V, (4, 12))
    with torch.no_grad():
        base, _ = model(enc, dec)
        dec2 = dec.clone()
        dec2[:, 4:] = torch.randint(0, V, (4, 8))
        out, _ = model(enc, dec2)
    assert not torch.allclose(out[:, :4], base[:, :4], atol=1e-6, rtol=0)


def test_dry_run_end_to_end(tmp_path, capsys):
    """`--dry-run` trains every router for two steps on the stdlib and writes all result files."""
    res = tt.main(["--dry-run", "--out", str(tmp_path)])
    assert {"results.json", "results.md", "val_loss.png"} <= {p.name for p in tmp_path.iterdir()}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["summary"]) == set(tt.ALL_ROUTERS)
    assert len(saved["runs"]) == 2 * len(tt.ALL_ROUTERS) and saved["seeds"] == [0, 1]
    assert saved["corpus"]["total_bytes"] > 1_000_000 and len(saved["corpus"]["sha256"]) == 64
    assert saved["summary"]["ec2"]["vs"] == "top2" and "steps_to_target" in saved["summary"]["ec1"]
    assert saved["summary"]["ec2"]["stats"]["dec1"]["dropped_fraction"] == 0.0
    assert saved["verdict"] and res["wall_time_s"] > 0
    assert "| ec2 |" in (tmp_path / "results.md").read_text()
    assert not list(tmp_path.glob("**/*.tmp")) and not list((tmp_path / "ckpt").glob("*.pt"))


@pytest.fixture(scope="module")
def uninterrupted(text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    argv = TINY + ["--data", text_file, "--routers", "top2,ec2", "--seeds", "0", "--steps", "8",
                   "--eval-every", "2"]
    return argv, tt.main(argv + ["--out", str(out)])


def _curves(res):
    return {(r["router"], r["seed"]): (r["train_loss"], r["val_loss"]) for r in res["runs"]}


def test_same_seed_same_loss_curve(uninterrupted, tmp_path):
    """Running the same config and seed again gives bitwise the same training and val losses."""
    argv, first = uninterrupted
    again = tt.main(argv + ["--out", str(tmp_path)])
    assert _curves(again) == _curves(first)


def test_resume_equals_uninterrupted(uninterrupted, tmp_path):
    """A run stopped at step 4 and continued with --resume ends bitwise equal to an
    uninterrupted one (model, optimiser, step and log restored from a weights_only checkpoint)."""
    argv, first = uninterrupted
    assert tt.main(argv + ["--out", str(tmp_path), "--stop-after", "3"]) is None
    ckpt = torch.load(tmp_path / "ckpt" / "ec2_s0.pt", weights_only=True)
    assert ckpt["step"] == 4 and len(ckpt["log"]["train_loss"]) == 4
    resumed = tt.main(argv + ["--out", str(tmp_path), "--resume"])
    assert _curves(resumed) == _curves(first)
    # resuming a finished run reuses its saved result
    assert _curves(tt.main(argv + ["--out", str(tmp_path), "--resume"])) == _curves(first)


def test_worker_processes_match_in_process(uninterrupted, tmp_path):
    """The worker pool (spawned processes, one thread each) gives the in-process losses."""
    argv, first = uninterrupted
    pooled = tt.main(argv + ["--out", str(tmp_path), "--workers", "2"])
    assert _curves(pooled) == _curves(first)


@pytest.mark.parametrize("flags,named", [
    (["--routers", "top1,top3"], "--routers"),
    (["--steps", "0"], "--steps"),
    (["--seeds", "0,x"], "--seeds"),
    (["--experts", "1"], "--experts"),
    (["--decoder-router", "bogus"], "--decoder-router"),
    (["--data", "/nonexistent/corpus.txt"], "--data"),
])
def test_bad_flags_name_the_flag(flags, named, capsys):
    """Bad flags exit with a message that names the flag."""
    with pytest.raises(SystemExit):
        tt.main(flags + ["--out", "/tmp/unused"])
    assert named in capsys.readouterr().err


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
