"""Validation of a train_tiny model (lab/model.py): its loss on fixed batches, routed as in
training or with expert choice's learned thresholds, and at batch size 1, the way it would be
used at inference.

    evaluate(model, batches, device)          -> [loss of each batch]
    with routed_as(model, "group"): ...       eval mode, expert-choice layers routed as asked
    inference_eval(model, batches, device)    -> dict: losses at batch size 1, threshold loads
    stat_vector(RoutingStats), stats_dict     routing statistics as 9 numbers, and named
"""
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from lab.distributed import World
from moe.threshold import ExpertThresholdMoE

SEED = 10_000   # torch seed while evaluating: top2_gshard's random draws are the same every time


def expert_choice_layers(model):
    """The model's expert-choice MoE layers: the ones that route by group in training and can
    switch to learned thresholds at inference (eval_routing). Expert Threshold layers (et1, et2)
    are not among them: they route by threshold in training too, so their deployed routing IS
    their training routing, and evaluate() and inference_eval() treat them as token choice:
    group_1 is their loss at batch size 1 and the train/inference gap is ~0 by construction."""
    return [m for _, m in model.moe_layers()
            if m.threshold is not None and not isinstance(m, ExpertThresholdMoE)]


@contextmanager
def routed_as(model, routing):
    """model.eval() with its expert-choice layers routing as `routing` ("group": as in training,
    "threshold": by the learned thresholds); each layer's own eval_routing (the default "auto",
    say) and train mode come back afterwards. Every evaluation of a trained model goes through
    here, so a layer's default never decides how a committed number was measured."""
    before = {m: m.eval_routing for m in expert_choice_layers(model)}
    for m in before:
        m.eval_routing = routing
    model.eval()
    try:
        yield model
    finally:
        for m, previous in before.items():
            m.eval_routing = previous
        model.train()


@torch.no_grad()
def evaluate(model, batches, device, routing="group", stats=None, world=World()):
    """Cross-entropy of each fixed validation batch -> list of floats (one sync per batch).

    Validation uses the SAME batch size as training: routing groups are positions across the
    batch, so the group size sets the bucket size k = ceil(n*c/e); another batch size would
    evaluate a differently-routed model. top2_gshard's random second expert draws from a fixed
    seed (SEED) here, so every validation of every run sees the same draws; the caller's random
    state is left as it was. routing: "group" (as in training) or "threshold" (expert-choice
    layers route token by token with their learned thresholds; other layers as in training).
    stats: a list that gets one [MoE layer] list of RoutingStats per batch. Under torchrun each
    rank holds its rows of every batch and gets the whole batch's losses (routed_as restores
    each layer's own eval_routing afterwards)."""
    with routed_as(model, routing), \
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(SEED)
        losses = []
        for *inputs, tgt in batches:
            logits, outs = model(*[t.to(device) for t in inputs])
            losses.append(F.cross_entropy(logits.flatten(0, 1).float(),
                                          tgt.to(device).flatten()).item())
            if stats is not None:
                stats.append([o.stats for o in outs])
    return world.average(losses)


def inference_eval(model, batches, device, world=World()):
    """Validation loss the way the model would be used at inference: the sequences of `batches`
    one at a time. -> dict: group_1 (every router routes as in training, in groups of one
    sequence: for expert choice every expert then takes every token, k clips to 1; for token
    choice and expert threshold routing that IS the deployed routing), and for
    expert choice threshold_1 (threshold routing at batch size 1; the same at the training batch
    size is equal up to float error, the rule is per token) with the loads threshold routing
    gives each MoE layer: expert_load (fraction of tokens each expert takes) and experts_per_token
    (bins 0, 1, 2, 3-4, >4). Under torchrun the loads are rank 0's. group_1 measures the
    degenerate buckets on purpose, so the layers' warning about them is silenced here."""
    rows = [[t[i:i + 1] for t in batch] for batch in batches for i in range(len(batch[0]))]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "expert choice in routing groups of", UserWarning)
            out = dict(group_1=float(np.mean(evaluate(model, rows, device, world=world))))
    except ValueError as e:      # capped EC: infeasible in a group of one token
        return dict(group_1=None, error=str(e))
    if expert_choice_layers(model):
        stats = []
        losses = evaluate(model, rows, device, "threshold", stats, world)
        out["threshold_1"] = float(np.mean(losses))
        out["threshold_loads"] = {
            n: dict(expert_load=torch.stack([s[i].expert_load for s in stats]).mean(0).tolist(),
                    experts_per_token=torch.stack([s[i].experts_per_token for s in stats])
                    .mean(0).tolist())
            for i, (n, m) in enumerate(model.moe_layers()) if m.threshold is not None}
    return out


STAT_KEYS = ("unrouted_fraction", "dropped_fraction", "load_max_over_mean", "overflow_fraction")


def stat_vector(stats):
    """RoutingStats -> [9] float64 tensor on the stats' device (no sync): experts/token bins
    0, 1, 2, 3-4, >4, then the four scalars."""
    bins = stats.experts_per_token.to(torch.float64).reshape(5)
    return torch.cat([bins, torch.stack([getattr(stats, k).to(torch.float64) for k in STAT_KEYS])])


def stats_dict(vec):
    v = [float(x) for x in vec]
    return dict(experts_per_token=v[:5], **dict(zip(STAT_KEYS, v[5:])))
