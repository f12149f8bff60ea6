"""Samples at batch size 1 from a finished train_tiny run: how a trained model is used, one
sequence at a time (expert choice routes with its learned thresholds: ecmoe.MoE's default
eval_routing="auto" does that for a trained layer).

    python -m lab.sample runs/tiny            # every router's first seed, added to results.*

Stored as results.json["samples"] and shown in results.md (lab/compare.py's markdown).
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import numpy as np
import torch

import train_tiny as tt
from lab import compare
from lab.corpus import load_corpus
from lab.evaluation import expert_choice_layers
from lab.files import write_json, write_text

PROMPTS, NEW_BYTES = 3, 64
TEMPERATURE = 0.7   # greedy decoding of a tiny model repeats itself ("the the the ...")


def prompts_of(corpus, cfg):
    """PROMPTS deterministic prompts from the held-out text: each starts at a line that opens a
    `def`, spread over the validation text. lm: the first chunk_bytes - 16 bytes; t5: a
    chunk_bytes chunk, span-corrupted (encoder input) -> list of token-id lists."""
    val = corpus["val"].tobytes()
    prompts = []
    for i in range(PROMPTS):
        at = val.find(b"\ndef ", len(val) * i // PROMPTS) + 1
        chunk = np.frombuffer(val[at:at + cfg.chunk_bytes], np.uint8)
        if cfg.arch == "lm":
            prompts.append((chunk[:cfg.chunk_bytes - 16].astype(np.int64) + tt.BYTE0).tolist())
        else:
            rng = np.random.default_rng([tt.VAL_SEED, i])
            prompts.append(tt.span_corrupt(chunk, rng, cfg)[0].tolist())
    return prompts


@torch.no_grad()
def generate(model, cfg, prompt, device, new=NEW_BYTES, temperature=TEMPERATURE, seed=0):
    """Sampling at batch size 1 (no KV cache: each step reruns the prefix), from
    softmax(logits / temperature) with a torch.Generator seeded by `seed` (reproducible);
    temperature 0 = greedy (argmax). lm: continue `prompt` by `new` tokens; t5: decode the
    sentinel fills of the encoder input `prompt` until EOS or `new` tokens. -> the new token ids."""
    gen = torch.Generator().manual_seed(seed)                                 # CPU: any device
    ids = torch.tensor([prompt], device=device)                               # [1, P]
    out = torch.tensor([[tt.PAD]], device=device) if cfg.arch == "t5" else ids  # [1, t]
    for _ in range(new):
        logits = (model(ids, out) if cfg.arch == "t5" else model(out))[0]     # [1, t, V]
        if temperature == 0:
            nxt = logits[:, -1].argmax(-1, keepdim=True)                       # [1, 1]
        else:
            p = torch.softmax(logits[:, -1].float().cpu() / temperature, -1)   # [1, V]
            nxt = torch.multinomial(p, 1, generator=gen).to(device)            # [1, 1]
        out = torch.cat([out, nxt], dim=1)
        if cfg.arch == "t5" and int(nxt) == tt.EOS:
            break
    return out[0, len(prompt) if cfg.arch == "lm" else 1:].tolist()


def detokenize(ids):
    """Token ids -> readable text: bytes as UTF-8 (invalid bytes replaced), t5 sentinels as
    <Xi>, EOS as <eos>, control characters escaped (newline as \\n: one line per sample)."""
    parts, buf = [], bytearray()
    for t in ids:
        if tt.BYTE0 <= t < tt.SENTINEL0:
            buf.append(t - tt.BYTE0)
            continue
        parts.append(buf.decode("utf-8", "replace"))
        buf = bytearray()
        parts.append("<eos>" if t == tt.EOS else "<pad>" if t == tt.PAD else
                     f"<X{t - tt.SENTINEL0}>")
    parts.append(buf.decode("utf-8", "replace"))
    text = "".join(parts)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def sample_run(run_dir, device="cpu"):
    """Samples of every router's first seed at batch size 1 -> the dict stored as
    results.json["samples"] (results.md rewritten to show them)."""
    run_dir = Path(run_dir)
    res = compare.load(run_dir)
    seed, prompts, by_router = res["seeds"][0], None, {}
    for router in res["routers"]:
        model, cfg = tt.load_model(run_dir, router, seed, device)
        ec = expert_choice_layers(model)   # eval_routing "auto": trained, so by threshold
        if prompts is None:             # the same prompts for every router
            prompts = prompts_of(load_corpus(cfg.data, cfg.chunk_bytes), cfg)
        try:
            texts = [detokenize(generate(model, cfg, p, torch.device(device), seed=i))
                     for i, p in enumerate(prompts)]
            routing = "threshold" if ec else "as in training"
        except ValueError as e:                    # capped EC: no group of one token fits
            texts = ["(cannot run at batch size 1: " + str(e).split(":")[0] + ")"] * len(prompts)
            routing = "-"
        by_router[router] = dict(texts=texts, routing=routing)
        print(f"{router}: {texts[0]!r}")
    res["samples"] = dict(
        command=shlex.join(["python", "-m", "lab.sample", str(run_dir)]), seed=seed,
        how=f"sampled at temperature {TEMPERATURE} (prompt i: torch.Generator seed i, the same "
            f"for every router) at batch size 1 from seed {seed}'s final weights, "
            + (f"{NEW_BYTES} new bytes after each prompt" if cfg.arch == "lm" else
               "the decoder fills the sentinels <Xi> of the span-corrupted prompt"),
        prompts=[detokenize(p) for p in prompts], by_router=by_router)
    write_json(run_dir / "results.json", res)
    write_text(run_dir / "results.md", compare.markdown(res))
    print(f"wrote samples into {run_dir / 'results.json'} and {run_dir / 'results.md'}")
    return res["samples"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lab.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="a finished train_tiny --out directory (with results.json "
                   "and models/)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    args = p.parse_args(argv)
    if not (Path(args.run_dir) / "results.json").exists():
        p.error(f"run_dir: {args.run_dir!r} has no results.json (not a finished run)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    try:
        return sample_run(args.run_dir, args.device)
    except ValueError as e:          # a missing or unreadable saved model, named
        p.error(str(e))


if __name__ == "__main__":
    main()
