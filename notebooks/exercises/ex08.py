"""Checks for the exercises of notebook 08 (expert choice in a GPT of your own).

- check_moe_block: a pre-norm block whose MLP is an ecmoe.MoE. Checked on the layer itself: causal
  in training (outputs before position t do not move when later tokens change), the same at batch
  size 1 as in a batch once trained (eval), and the residual kept (zeroed experts: the identity).
- check_generate: greedy generation one sequence at a time. Checked against greedy decoding of a
  tiny trained model in eval mode: the same bytes, every forward routed by the learned thresholds,
  and the thresholds untouched (a training-mode forward moves them).
- check_expert_flops: the expert FLOPs a routing needs (filled slots) and what ecmoe.MoE's batched
  matmul executes (every slot in training; packed by expert when routed by the thresholds); the
  executed count is measured with torch's FlopCounterMode.
"""
import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import ecmoe
from exercises import attempt, check, right, wrong

D_BLOCK, E_BLOCK = 16, 4  # the block the check builds: MoEBlock(d_model=16, n_experts=4)


def moe_layers(module):
    """The ecmoe.MoE layers inside a module (the check's way to find the student's layer)."""
    return [m for m in module.modules() if isinstance(m, ecmoe.MoE)]


def _quiet(fn, *args):
    """fn(*args) with the layer's warnings silenced (the checks name the mistake themselves)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args)


# ----------------------------------------------------------------------------- exercise 1: the block
def _block_forward(block, x):
    """The block's output (x, z_loss) with the contract checked; a str saying what is wrong instead."""
    try:
        got = _quiet(block, x)
    except TypeError as err:
        if "MoEOutput" in str(err) or "tuple" in str(err):
            return (f"the forward raised TypeError ({err}). ecmoe.MoE returns MoEOutput(y, aux_loss, "
                    f"z_loss, stats): add out.y to the residual, and return out.z_loss beside it.")
        raise
    if isinstance(got, ecmoe.MoEOutput):
        return "forward returned the MoEOutput itself; return the pair (x + out.y, out.z_loss)."
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return f"forward must return the pair (x, z_loss), yours returned {type(got).__name__}."
    y, z = got
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return (f"the block's output must be a tensor of the input's shape {tuple(x.shape)}, yours is "
                f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}.")
    if not isinstance(z, torch.Tensor) or z.dim() != 0:
        return "the second output must be the layer's z_loss, a scalar tensor (out.z_loss)."
    return y, z


@check
def check_moe_block(Block):
    """Block(d_model, n_experts) -> a module; forward(x [B, T, d]) -> (x + MoE(LN(x)).y, z_loss)."""
    torch.manual_seed(8)
    block = attempt(Block, D_BLOCK, E_BLOCK)
    if not isinstance(block, nn.Module):
        return wrong(f"MoEBlock({D_BLOCK}, {E_BLOCK}) must build an nn.Module, yours gave {type(block).__name__}.")
    layers = moe_layers(block)
    if len(layers) != 1:
        return wrong(f"the block must hold exactly one ecmoe.MoE (in place of the MLP), yours holds {len(layers)}.")
    with torch.no_grad():
        layers[0].w_router.normal_(0, 1.0)  # a decisive router, as after training
    B, T, t = 8, 12, 6
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D_BLOCK, generator=g)
    later = x.clone()
    later[:, t:] = torch.randn(B, T - t, D_BLOCK, generator=g)  # only positions >= t change

    block.train()
    out = _block_forward(block, x)
    if isinstance(out, str):
        return wrong(out)
    with torch.no_grad():  # 1. causal in training
        a, b = _block_forward(copy.deepcopy(block), x)[0], _block_forward(copy.deepcopy(block), later)[0]
    if not torch.allclose(a[:, :t], b[:, :t], atol=1e-6):
        return wrong(f"in training, outputs at positions < {t} changed when only positions >= {t} did: your "
                     f"routing groups hold several positions of a sequence (group={layers[0].group!r}), so a "
                     f"token's experts depend on later tokens and the decoder learns to read the future. "
                     f"Keep group='position' (the default).")
    with torch.no_grad():  # 2. the residual: with every expert's output zeroed the block is the identity
        zeroed = copy.deepcopy(block)
        moe_layers(zeroed)[0].w_out.zero_()
        y0 = _block_forward(zeroed, x)[0]
    if not torch.allclose(y0, x, atol=1e-6):
        return wrong("with every expert's output zeroed your block does not return its input: keep the "
                     "pre-norm residual, x + out.y with out = moe(ln(x)), and nothing after it.")
    with torch.no_grad():  # 3. trained, then eval: batch size 1 as in a batch
        for _ in range(5):
            _block_forward(block, torch.randn(B, T, D_BLOCK, generator=g))  # the thresholds learn
        block.eval()
        together = _block_forward(block, x)[0]
        alone = torch.cat([_block_forward(block, x[i:i + 1])[0] for i in range(B)])
    if not torch.allclose(together, alone, atol=1e-5):
        how = (f"eval_routing={layers[0].eval_routing!r} routes eval like training, in groups of one token at "
               f"batch size 1, so every expert takes it (k clips up to 1)" if layers[0].eval_routing == "group"
               else "its routing in eval depends on the other sequences of the batch")
        return wrong(f"trained and in eval, row 0 alone differs from row 0 in a batch of {B} (max difference "
                     f"{(together - alone).abs().max():.3g}): {how}. Leave eval_routing at its default "
                     f"'auto' (the learned thresholds once trained).")
    return right(f"your block is causal in training, keeps the residual, and gives the same output at batch "
                 f"size 1 as in a batch of {B} once trained: {layers[0]}.")


# ----------------------------------------------------------------------------- exercise 2: generation
class TinyLM(nn.Module):
    """The check's model, with the notebook GPT's interface: forward(idx [B, t], targets=None) ->
    (logits [B, t, V], loss, z_loss), context length cfg.block_size. One MoE layer, V = 12 tokens."""

    class Cfg:
        block_size = 8

    def __init__(self, V=12, d=16, e=4):
        super().__init__()
        self.cfg = self.Cfg()
        self.tok, self.pos = nn.Embedding(V, d), nn.Embedding(self.cfg.block_size, d)
        self.moe, self.head = ecmoe.MoE(d, 32, e), nn.Linear(d, V)

    def forward(self, idx, targets=None):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        out = self.moe(x)
        logits = self.head(x + 4 * out.y)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss, out.z_loss


def trained_tiny_lm():
    """A TinyLM whose MoE has run training-mode forwards (its thresholds are learned), left in training
    mode, as a model is at the end of a training loop."""
    torch.manual_seed(0)
    model = TinyLM()
    with torch.no_grad():
        model.moe.w_router.normal_(0, 2.0)  # a decisive router
        for _ in range(5):
            model(torch.randint(12, (16, 8)))
    return model.train()


@torch.no_grad()
def greedy(model, idx, n_new):
    """The reference: greedy decoding in eval mode, the context cropped to the last block_size tokens."""
    model.eval()
    for _ in range(n_new):
        logits, _, _ = model(idx[:, -model.cfg.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@check
def check_generate(fn):
    """fn(model, idx [1, t], n_new) -> idx [1, t + n_new]: greedy, batch size 1, routed as deployed."""
    prompt, n_new = torch.tensor([[3, 1, 4]]), 9  # 12 tokens in all: more than block_size = 8
    want = greedy(trained_tiny_lm(), prompt, n_new)
    model = trained_tiny_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    routed = []  # (training mode?, routed by threshold?) of every forward of the MoE layer
    model.moe.register_forward_hook(lambda m, args, out: routed.append((m.training, m.routes_by_threshold())))
    try:
        got = _quiet(attempt, fn, model, prompt.clone(), n_new)
    except IndexError as err:
        return wrong(f"your loop raised IndexError ({err}) once the sequence grew past block_size = "
                     f"{model.cfg.block_size}: feed the model only the last block_size tokens, "
                     f"idx[:, -model.cfg.block_size:].")
    if any(trained for trained, _ in routed):
        moved = int(model.moe.threshold_updates) - int(before["moe.threshold_updates"])
        return wrong(f"your loop ran the model in TRAINING mode: at batch size 1 each position group holds one "
                     f"token, k = ceil(1·c/e) clips up to 1, so every expert took every token, and the "
                     f"thresholds moved ({moved} training forwards). Call model.eval() before generating.")
    if not all(by_threshold for _, by_threshold in routed):
        return wrong(f"your loop routed by groups in eval (eval_routing={model.moe.eval_routing!r}): at batch "
                     f"size 1 every expert takes the one token of its group, e = {model.moe.n_experts} experts "
                     f"per token instead of about c = {model.moe.capacity_factor:g}. Leave eval_routing at "
                     f"'auto' (thresholds once trained).")
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        return wrong(f"generation must not change the model, yours changed {changed}.")
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return wrong(f"return the whole sequence, prompt and new tokens, as a tensor [1, {want.shape[1]}]; yours "
                     f"is {tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}.")
    if not torch.equal(got, want):
        j = int((got[0] != want[0]).nonzero()[0])
        hint = ("you changed the prompt" if j < prompt.shape[1] else
                "feed the whole context (its last block_size tokens) at each step, not just the newest "
                "token (this model has no cache), and take the argmax of the LAST position's logits")
        return wrong(f"your sequence differs from greedy decoding at position {j} ({got[0].tolist()} vs "
                     f"{want[0].tolist()}): {hint}.")
    return right(f"greedy decoding in eval mode: {n_new} new tokens, every forward routed by the learned "
                 f"thresholds, the model unchanged.")


# ----------------------------------------------------------------------------- exercise 3: FLOPs
def flops_cases():
    """(label, token_index [G, e, s], d, f, executed FLOPs measured, filled slots) from real layers."""
    torch.manual_seed(3)
    d, f, e = 16, 24, 4
    layer = ecmoe.MoE(d, f, e)
    with torch.no_grad():
        layer.w_router.normal_(0, 1.5)
        layer(torch.randn(8, 6, d))  # a training forward: the thresholds learn
    cases = []
    for label, mode, x in [("expert choice in training, batch 8 (every slot filled)", "train", torch.randn(8, 6, d)),
                           ("threshold routing, batch 8 (loads vary)", "eval", torch.randn(8, 6, d)),
                           ("threshold routing at batch size 1 (one token a group)", "eval", torch.randn(1, 6, d)),
                           ("threshold routing, one new token at batch size 1", "eval", torch.randn(1, 1, d))]:
        layer.train(mode == "train")
        with torch.no_grad():
            x_groups = layer.group_tokens(x)  # [G, n, d]
            r = layer.route(ecmoe.router_probs(x_groups, layer.w_router))  # token_index [G, e, s]
            with FlopCounterMode(display=False) as counter:
                layer.experts(x_groups, r.gates, r.token_index)  # ecmoe's dispatch, bmm, combine
        cases.append((label, r.token_index.clone(), d, f, counter.get_total_flops(), int((r.token_index >= 0).sum())))
    return cases


@check
def check_expert_flops(fn):
    """fn(token_index [G, e, s], d_model, d_ff) -> (needed, executed) expert FLOPs of one forward."""
    cases = flops_cases()
    for label, token_index, d, f, executed, filled in cases:
        G, e, s = token_index.shape
        got = attempt(fn, token_index.clone(), d, f)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return wrong(f"return the pair (needed, executed), yours is {got!r}.")
        needed_got, executed_got = (float(v) for v in got)
        needed, per_slot = 4 * d * f * filled, 4 * d * f
        where = f"on {label} (G={G}, e={e}, s={s}, {filled} filled slots, d={d}, f={f})"
        for name, value, truth in [("needed", needed_got, needed), ("executed", executed_got, executed)]:
            if value == truth:
                continue
            if value * 2 == truth:
                return wrong(f"{where}: your {name} is half the count. A multiply-add is 2 FLOPs, and each "
                             f"slot runs two matmuls, X W1 [d -> f] then W2 [f -> d]: 2·d·f + 2·f·d = "
                             f"4·d·f = {per_slot} FLOPs per slot.")
            if name == "needed" and value == per_slot * G * e * s != truth:
                return wrong(f"{where}: your needed FLOPs count all G·e·s = {G * e * s} slots, but "
                             f"{G * e * s - filled} are empty (-1): a token that clears no threshold costs "
                             f"nothing where only filled slots are multiplied.")
            if name == "executed" and value == per_slot * G * e * s:
                return wrong(f"{where}: your executed FLOPs run every expert on all G·s = {G * s} of its slots, "
                             f"as in training. Routed by the thresholds ecmoe.MoE packs first (pack_slots): "
                             f"only the experts with a filled slot, each with as many slots as the busiest.")
            if name == "executed" and value == needed:
                return wrong(f"{where}: your executed FLOPs count only the filled slots, but the batched "
                             f"matmul gives every expert it runs as many slots as the busiest one fills; "
                             f"the others get empty slots (gate 0) that are multiplied all the same.")
            return wrong(f"{where}: {name} should be {truth:,} FLOPs, yours {value:,.0f}.")
    return right(f"needed and executed FLOPs match on {len(cases)} routings. In training every slot is filled "
                 f"(needed = executed); routed by the thresholds ecmoe.MoE runs only the experts that took a "
                 f"token, padded to the busiest: for one new token, exactly what it needs.")
