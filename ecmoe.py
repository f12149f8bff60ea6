"""ecmoe: a Mixture-of-Experts layer with Expert Choice routing, in one file you can copy.

Zhou et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS 2022 (arXiv:2202.09368).
Each EXPERT picks its top-k tokens (not each token its top-k experts): every expert gets a fixed
bucket of k tokens, and a token may get zero, one or several experts. Needs only torch.
reference_numpy.py is the same algorithm in NumPy; moe/ extends MoE through `route` or `experts`.

Equations (paper Sec. 3.2), per routing group of n tokens:
    S = Softmax(X W_g)                      router probabilities, softmax over experts   [n, e]
    k = n c / e                   (Eq. 1)   bucket size; here ceil, clipped to [1, n]
    G, I = TopK(S^T, k)           (Eq. 2)   each expert keeps its k best tokens          [e, k]
    X_in = P X,  P = OneHot(I)    (Eq. 3)   dispatch (a gather here, no one-hot)          [e, k, d]
    X_e[i] = GeLU(X_in[i] W1[i]) W2[i]      expert FFN, tanh-GELU, no biases             [e, k, d]
    X_out[l] = sum_ij P[i,j,l] G[i,j] X_e[i,j]   (Eq. 4)  combine (scatter-add)          [n, d]
Shape legend: B batch, T sequence length, d model width, f expert hidden width, e experts,
n tokens in a routing group, k slots per expert, s slots per expert when they vary, c capacity
factor, G routing groups, "..." leading group dimensions.

Use: `moe = MoE(d, f, e)` in place of a block's MLP, `y = moe(x).y` for x [B, T, d].
- Train in train(): each forward also learns a threshold per expert (an EMA of its k-th best
  score). aux_loss is 0 for expert choice; add 1e-3 * z_loss to the loss if you like.
- Evaluate and generate (batch size 1 too) in eval(): the default eval_routing="auto" sends token
  t to expert i iff S[t, i] >= threshold[i]: causal, and the same at every batch size.
- Save model.state_dict(): the thresholds are buffers in it.
Decisions the paper leaves open (docs/decisions.md): ties go to the lower token index, slots best
first; MoE.group "position" (default: a position across the batch; causal) or "sequence"/"batch"
(the paper's n: they see FUTURE tokens, encoders only); the router runs in float32 even under autocast.
"""
import argparse
import math
import numbers
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

GROUPS = ("position", "sequence", "batch")
EVAL_ROUTINGS = ("auto", "threshold", "group")
# Input guards (check_*) and autocast_on sit at the end of the file: the algorithm comes first.


# ----------------------------------------------------------------------------- router
def router_logits(x, w_router, validate=True):
    """X W_g in float32 (float64 for float64 x), autocast off. x [..., n, d], w_router [d, e] -> [..., n, e]."""
    if validate:
        check_tensor(x, "x", 2)
        check_tensor(w_router, "w_router", 2)
        if w_router.dim() != 2 or w_router.shape[0] != x.shape[-1]:
            raise ValueError(f"w_router must have shape [d={x.shape[-1]}, e]; got {tuple(w_router.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=x.device.type, enabled=False):
        return x.to(dtype) @ w_router.to(dtype)


def router_probs(x, w_router, validate=True):
    """S = Softmax(X W_g), softmax over the experts axis. x [..., n, d] -> probs [..., n, e]."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return torch.softmax(router_logits(x, w_router, validate), dim=-1)


def expert_capacity(n_tokens, n_experts, capacity_factor):
    """(Eq. 1) k = ceil(n c / e), clipped to [1, n]: total slots e*k >= n*c.
    n c / e is rounded to 9 decimals first, so 0.1 * 30 = 3.0000000000000004 stays 3."""
    check_int(n_tokens, "n_tokens", 1)
    check_int(n_experts, "n_experts", 1)
    check_number(capacity_factor, "capacity_factor", 0)
    k = math.ceil(round(n_tokens * capacity_factor / n_experts, 9))
    return int(min(max(k, 1), n_tokens))


# ----------------------------------------------------------------------------- routing
def expert_choice(probs, k, validate=True):
    """(Eq. 2) G, I = TopK(S^T, k): each expert takes its k highest-probability tokens.
    probs [..., n, e] -> gates [..., e, k] (raw probs, differentiable), token_index [..., e, k];
    slots best score first, ties to the lower token index."""
    if validate:
        check_probs(probs)
        check_int(k, "k", 1, probs.shape[-2])
    S_T = probs.transpose(-1, -2)  # [..., e, n]
    # = torch.sort(S_T, descending=True, stable=True).indices[..., :k], ~10x faster at n = 8192: take
    # the tokens above each expert's k-th best score plus the lowest-index ties, then sort only those k.
    scores = S_T.detach()
    kth_best = torch.topk(scores, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # [..., e, 1]
    above, tied = scores > kth_best, scores == kth_best  # [..., e, n]
    room = k - above.sum(-1, keepdim=True)  # how many tied tokens still fit
    chosen = above | (tied & (tied.cumsum(-1) <= room))  # exactly k per expert
    # chosen tokens in ascending token order, static shapes (nonzero() would sync with the host):
    # chosen token j goes to slot (chosen tokens before j); the others to a spare slot k, cut off
    slot = torch.where(chosen, chosen.to(torch.int32).cumsum(-1, dtype=torch.int32) - 1, k).long()
    token = torch.arange(scores.shape[-1], device=scores.device).expand_as(slot)
    token_index = torch.zeros(*slot.shape[:-1], k + 1, dtype=torch.long, device=scores.device)
    token_index = token_index.scatter_(-1, slot, token)[..., :k]  # [..., e, k] ascending tokens
    order = torch.sort(torch.gather(scores, -1, token_index), dim=-1, descending=True, stable=True).indices
    token_index = torch.gather(token_index, -1, order)  # [..., e, k] best first, ties lower index
    gates = torch.gather(S_T, -1, token_index)  # [..., e, k]
    return gates, token_index


def threshold_choice(probs, threshold, validate=True):
    """Token t goes to expert i iff probs[t, i] >= threshold[i]: no other token involved, so causal
    and the same at every batch size. probs [..., n, e], threshold [e] -> gates, token_index [..., e, s]
    (-1: empty slot; slots as expert_choice), s = most tokens any expert takes (>= 1; one host sync)."""
    if validate:
        check_probs(probs)
        check_tensor(threshold, "threshold", 1)
        if threshold.shape != probs.shape[-1:]:
            raise ValueError(f"threshold must have shape [e={probs.shape[-1]}]; got {tuple(threshold.shape)}")
    S_T = probs.transpose(-1, -2)  # [..., e, n]
    chosen = S_T.detach() >= threshold.to(S_T.dtype).unsqueeze(-1)  # [..., e, n]
    s = max(int(chosen.sum(-1).max()), 1)  # the one sync: slots for the busiest expert
    key = torch.where(chosen, S_T.detach(), torch.full_like(S_T.detach(), -1.0))  # chosen first
    token_index = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :s]
    filled = torch.gather(chosen, -1, token_index)  # [..., e, s]
    gates = torch.gather(S_T, -1, token_index) * filled
    return gates, torch.where(filled, token_index, -1)


# ----------------------------------------------------------------------------- experts
def dispatch(x, gates, token_index):
    """(Eq. 3) X_in = P X as a gather, all groups' slots of one expert side by side. x [..., n, d],
    gates/token_index [..., e, s] -> X_in [e, G*s, d], flat_index [e, G*s] (the row of
    x.reshape(-1, d) each slot reads), gate_per_slot [e, G*s, 1] (0 for empty slots)."""
    *lead, n, d = x.shape
    e, s = gates.shape[-2:]
    x_flat = x.reshape(-1, d)  # [G*n, d]
    G = x_flat.shape[0] // n
    # empty slots (-1) read token 0 of their group and get gate 0, so they add exactly 0
    gates = torch.where(token_index >= 0, gates, torch.zeros((), dtype=gates.dtype, device=gates.device))
    group_offset = torch.arange(G, device=x.device).view(1, G, 1) * n
    flat_index = (token_index.clamp(min=0).reshape(G, e, s).transpose(0, 1) + group_offset).reshape(e, G * s)
    X_in = torch.index_select(x_flat, 0, flat_index.reshape(-1)).view(e, G * s, d)  # [e, G*s, d]
    gate_per_slot = gates.reshape(G, e, s).transpose(0, 1).reshape(e, G * s, 1).to(x.dtype)
    return X_in, flat_index, gate_per_slot


def expert_ffn(X_in, w_in, w_out):
    """X_e[i] = GeLU_tanh(X_in[i] W1[i]) W2[i]: every expert at once, two batched matmuls.
    X_in [e, m, d], w_in [e, d, f], w_out [e, f, d] -> X_e [e, m, d]."""
    return torch.bmm(F.gelu(torch.bmm(X_in, w_in), approximate="tanh"), w_out)


def combine(x, X_e, flat_index, gate_per_slot):
    """(Eq. 4) X_out[l] = sum_ij P[i,j,l] G[i,j] X_e[i,j], as a scatter-add in x's dtype.
    x [..., n, d] (shape and dtype only), X_e [e, m, d], flat_index [e, m], gate_per_slot [e, m, 1].
    CUDA's index_add_ sums in no fixed order: torch.use_deterministic_algorithms(True) pins the bits."""
    e, m = flat_index.shape
    weighted = X_e.to(x.dtype) * gate_per_slot  # [e, m, d]
    y = torch.zeros_like(x.reshape(-1, x.shape[-1])).index_add_(0, flat_index.reshape(-1),
                                                                 weighted.reshape(e * m, -1))
    return y.view(x.shape)


def moe_ffn(x, gates, token_index, w_in, w_out, validate=True, pack=False):
    """(Eq. 3-4) Dispatch, expert FFNs, combine. x [..., n, d], gates/token_index [..., e, s],
    w_in [e, d, f], w_out [e, f, d] -> y [..., n, d]; slots with index -1 add nothing.
    pack: compute only where slots are filled (threshold routing: loads vary, most slots are empty)."""
    if validate:
        check_moe_ffn_inputs(x, gates, token_index, w_in, w_out)
    if pack:  # all tokens as one group, only the experts that took any, as many slots as the busiest
        experts, gates, token_index = pack_slots(gates, token_index, x.shape[-2])  # [a], [1, a, m]
        if len(experts) == 0:  # no token cleared any threshold
            return torch.zeros_like(x)
        y = moe_ffn(x.reshape(1, -1, x.shape[-1]), gates, token_index, w_in[experts], w_out[experts], validate=False)
        return y.view(x.shape)
    X_in, flat_index, gate_per_slot = dispatch(x, gates, token_index)  # [e, G*s, d]
    return combine(x, expert_ffn(X_in, w_in, w_out), flat_index, gate_per_slot)


def pack_slots(gates, token_index, n):
    """The filled slots of G groups of n tokens as ONE group of G*n: gates/token_index [..., e, s]
    (-1: empty) -> experts [a] (those with a filled slot), gates/token_index [1, a, m] (token g*n + t,
    each expert's filled slots first, in order; m = the most any expert has). One host sync."""
    e, s = token_index.shape[-2:]
    index = token_index.reshape(-1, e, s)  # [G, e, s]
    offset = torch.arange(index.shape[0], device=index.device).view(-1, 1, 1) * n  # group g's first token
    index = torch.where(index >= 0, index + offset, -1).transpose(0, 1).reshape(e, -1)  # [e, G*s]
    gates = gates.reshape(-1, e, s).transpose(0, 1).reshape(e, -1)  # [e, G*s]
    count = (index >= 0).sum(-1).tolist()  # [e] filled slots of each expert (the sync)
    experts = torch.tensor([i for i, filled in enumerate(count) if filled], dtype=torch.long, device=index.device)
    m = max(count)
    order = torch.sort((index[experts] >= 0).to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, :m]
    return experts, torch.gather(gates[experts], -1, order)[None], torch.gather(index[experts], -1, order)[None]


# ----------------------------------------------------------------------------- router losses
def load_balancing_loss(probs, validate=True):
    """Switch balance loss e * sum_i f_i P_i per group (1.0 when balanced). probs [..., n, e] -> [...].
    f_i: fraction of tokens whose first choice is i; P_i: mean probability of expert i."""
    if validate:
        check_probs(probs)
    e = probs.shape[-1]
    f = F.one_hot(probs.argmax(-1), e).to(probs.dtype).mean(-2)  # [..., e]
    return e * (f * probs.mean(-2)).sum(-1)


def router_z_loss(logits, validate=True):
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. logits [..., n, e] -> [...]."""
    if validate:
        check_tensor(logits, "logits", 2)
    return (torch.logsumexp(logits, dim=-1) ** 2).mean(-1)


# ----------------------------------------------------------------------------- the layer
class Routing(NamedTuple):
    """What MoE.route returns: who meets whom, and what it cost."""
    gates: torch.Tensor  # [G, e, s] gate of each slot (0 for an empty slot)
    token_index: torch.Tensor  # [G, e, s] token of each slot in its group (-1: empty)
    demand: torch.Tensor  # [G, e] tokens that asked for each expert (expert choice: k)
    aux_loss: torch.Tensor  # balance loss, unweighted (expert choice: 0, Sec. 4.1)
    capacity: int  # the bucket k = expert_capacity(n, e, c) of this group size (demand vs k)


class RoutingStats(NamedTuple):
    experts_per_token: torch.Tensor  # [5] fraction of tokens with 0, 1, 2, 3-4, >4 experts (Fig. 3)
    unrouted_fraction: torch.Tensor  # tokens that no expert processed
    dropped_fraction: torch.Tensor  # requests not served (token choice over capacity; EC: 0)
    load_max_over_mean: torch.Tensor  # busiest expert's demand / mean demand (EC: 1)
    overflow_fraction: torch.Tensor  # experts whose demand exceeds the bucket k (EC: 0)
    expert_load: torch.Tensor  # [e] tokens each expert processed / tokens per group


class MoEOutput(NamedTuple):
    y: torch.Tensor  # [B, T, d]
    aux_loss: torch.Tensor  # balance loss, unweighted (0 for expert choice)
    z_loss: torch.Tensor  # router z-loss, unweighted
    stats: RoutingStats


@torch.no_grad()
def routing_stats(token_index, demand, n_tokens, capacity):
    """RoutingStats of one forward, as tensors (no host sync): token_index [G, e, s] (-1: empty),
    demand [G, e] (requests per expert), n_tokens n per group, capacity the bucket k."""
    G, e, s = token_index.shape
    filled = token_index >= 0  # [G, e, s]
    flat = token_index.clamp(min=0) + torch.arange(G, device=filled.device).view(G, 1, 1) * n_tokens
    per_token = torch.zeros(G * n_tokens, dtype=torch.long, device=filled.device).scatter_add_(
        0, flat.reshape(-1), filled.reshape(-1).long())  # experts each token got
    bins = torch.stack([per_token == 0, per_token == 1, per_token == 2,
                        (per_token >= 3) & (per_token <= 4), per_token > 4]).float().mean(1)
    taken = filled.sum(-1).float()  # [G, e] tokens each expert processed
    dropped = torch.where(demand.sum() > 0, 1 - taken.sum() / demand.sum().clamp(min=1), 0.0)
    load = (demand.amax(1) / demand.mean(1).clamp(min=1e-9)).mean()
    overflow = (demand > capacity).float().mean()
    return RoutingStats(bins, bins[0], dropped, load, overflow, taken.mean(0) / n_tokens)


class MoE(nn.Module):
    """Mixture-of-Experts FFN layer with expert-choice routing: y = sum of gated expert outputs.

    - d_model, d_ff, n_experts: model width d, expert hidden width f, number of experts e.
    - capacity_factor: c; a group of n tokens gets k = expert_capacity(n, e, c) slots per expert.
    - group: which tokens compete for the slots: "position" (default, causal), "sequence", "batch".
    - eval_routing, how eval() routes: "auto" (default) by the thresholds once learned or loaded,
      else by group with a warning; "threshold" by them (ValueError if none); "group" as in training.
    - threshold_decay: EMA decay of the thresholds (0.99: about the last 100 training forwards).
    - check_inputs: check values (x finite, probabilities not NaN; a host sync on a GPU). None
      (default): on CPU only; True: always; False: never. Shape checks always run.
    Parameters w_router [d, e] (std 0.02), w_in [e, d, f], w_out [e, f, d], as in reference_numpy.
    Buffers threshold [e] (float32 at any layer dtype) and threshold_updates change in training only.
    Extension points: `route(probs) -> Routing` (other routers, moe/) and
    `experts(x_groups, gates, token_index) -> y` (expert parallelism).
    """

    def __init__(self, d_model, d_ff, n_experts, capacity_factor=2.0, group="position",
                 eval_routing="auto", threshold_decay=0.99, check_inputs=None):
        super().__init__()
        check_int(d_model, "d_model", 1)
        check_int(d_ff, "d_ff", 1)
        check_int(n_experts, "n_experts", 1)
        check_number(capacity_factor, "capacity_factor", 0)
        if group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}; got {group!r}")
        check_eval_routing(eval_routing)
        check_number(threshold_decay, "threshold_decay", 0, 1, low_open=False, high_open=True)
        if check_inputs not in (None, True, False):
            raise ValueError(f"check_inputs must be None (auto: on CPU), True or False; got {check_inputs!r}")
        self.d_model, self.d_ff, self.n_experts = d_model, d_ff, n_experts
        self.capacity_factor, self.group, self.check_inputs = capacity_factor, group, check_inputs
        self.eval_routing, self.threshold_decay = eval_routing, threshold_decay
        self.w_router = nn.Parameter(torch.randn(d_model, n_experts) * 0.02)
        self.w_in = nn.Parameter(torch.randn(n_experts, d_model, d_ff) / math.sqrt(d_model))
        self.w_out = nn.Parameter(torch.randn(n_experts, d_ff, d_model) / math.sqrt(d_ff))
        self.register_buffer("threshold", torch.zeros(n_experts))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def extra_repr(self):
        shown = self.eval_routing != "auto" and self.threshold is not None
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, n_experts={self.n_experts}, "
                f"capacity_factor={self.capacity_factor}, group={self.group!r}"
                + (f", eval_routing={self.eval_routing!r}" if shown else "")
                + ("" if self.check_inputs is None else f", check_inputs={self.check_inputs}"))

    def _apply(self, fn, *args, **kwargs):
        """Keep the thresholds float32 under model.half() / .to(bfloat16): in bf16 the EMA stops moving."""
        before = self.threshold
        super()._apply(fn, *args, **kwargs)
        if before is not None and self.threshold.dtype not in (torch.float32, torch.float64):
            self.threshold = before.to(device=self.threshold.device, dtype=torch.float32)
        return self

    def group_tokens(self, x):
        """x [B, T, d] -> [G, n, d]: "position" [T, B, d], "sequence" [B, T, d], "batch" [1, T*B, d]
        (token t*B + b)."""
        B, T, d = x.shape
        if self.group == "batch":
            return x.transpose(0, 1).reshape(1, T * B, d)
        return x if self.group == "sequence" else x.transpose(0, 1)

    def ungroup_tokens(self, y, B, T):
        """Inverse of group_tokens: [G, n, d] -> [B, T, d]."""
        if self.group == "batch":
            return y.view(T, B, -1).transpose(0, 1)
        return y if self.group == "sequence" else y.transpose(0, 1)

    def route(self, probs):
        """probs [G, n, e] -> Routing. Training: expert choice (Eq. 1-2), and the thresholds learn.
        Eval: threshold_choice if routes_by_threshold(), else expert choice as in training."""
        n, e = probs.shape[-2:]
        k = expert_capacity(n, e, self.capacity_factor)  # (Eq. 1)
        zero = probs.new_zeros(())
        if self.routes_by_threshold():
            gates, token_index = threshold_choice(probs, self.threshold, validate=False)  # [G, e, s]
            return Routing(gates, token_index, (token_index >= 0).sum(-1).float(), zero, k)
        if round(e * k / (n * self.capacity_factor), 9) >= 2:  # k clipped up: a degenerate bucket
            self.warn_once("degenerate", f"expert choice in routing groups of n={n} tokens: k = ceil(n*c/e)"
                           f" = {k} for each of e={e} experts gives e*k/n = {e * k / n:g} experts per "
                           f"token, >= 2x capacity_factor c={self.capacity_factor:g}. Use larger groups "
                           f"(a bigger batch) or, in eval, eval_routing='auto' or 'threshold'.")
        gates, token_index = expert_choice(probs, k, validate=False)  # (Eq. 2) [G, e, k]
        if self.training:
            self.update_threshold(gates.detach()[..., -1])  # each group's k-th best (slots best first)
        return Routing(gates, token_index, torch.full(gates.shape[:-1], float(k), device=probs.device), zero, k)

    def routes_by_threshold(self):
        """Whether this forward routes by the thresholds (eval only, as eval_routing says; a host sync)."""
        check_eval_routing(self.eval_routing)  # the attribute may have been set
        if self.training or self.eval_routing == "group":
            return False
        if int(self.threshold_updates) > 0:
            return True
        if self.eval_routing == "threshold":
            raise ValueError("eval_routing='threshold' needs thresholds learned in training; "
                             "this layer has never run a training-mode forward")
        self.warn_once("untrained", "eval_routing='auto' in an untrained layer: eval() routes by group "
                       "as in training (batch-dependent). Train it or load its trained state_dict "
                       "first (thresholds), or set eval_routing='group' explicitly.")
        return False

    def warn_once(self, key, message):
        """warnings.warn(message) the first time this layer meets `key`."""
        warned = self.__dict__.setdefault("warned", set())
        if key not in warned:
            warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=3)

    @torch.no_grad()
    def update_threshold(self, cutoffs):
        """EMA of each expert's cutoff, cutoffs [G, e] averaged over the groups (each group's k-th
        best score: the expert's (1 - k/n) score quantile); the first sets it. No host sync."""
        cutoff = self.mean_over_groups(cutoffs).to(self.threshold.dtype)  # [e]
        ema = self.threshold_decay * self.threshold + (1 - self.threshold_decay) * cutoff
        self.threshold.copy_(torch.where(self.threshold_updates == 0, cutoff, ema))
        self.threshold_updates.add_(1)

    def mean_over_groups(self, v):
        """v [G, e] -> [e]; expert parallelism also averages over the processes."""
        return v.mean(0)

    def experts(self, x_groups, gates, token_index):
        """(Eq. 3-4) x_groups [G, n, d], gates/token_index [G, e, s] -> y [G, n, d]. Routed by the
        thresholds, only the filled slots compute: about c experts a token at batch size 1, not e."""
        pack = self.threshold is not None and self.routes_by_threshold()
        return moe_ffn(x_groups, gates, token_index, self.w_in, self.w_out, validate=False, pack=pack)

    def checks_values(self, x):
        """Whether this forward reads values to check them (check_inputs; None: CPU, not compiling)."""
        if self.check_inputs is not None:
            return self.check_inputs
        return x.device.type == "cpu" and not torch.compiler.is_compiling()

    def forward(self, x):
        """x [B, T, d] -> MoEOutput(y [B, T, d], aux_loss, z_loss, stats)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be a tensor [B, T, d_model={self.d_model}]; got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        check_values = self.checks_values(x)
        check_tensor(x, "x", 3, check_values=check_values)
        if x.dtype != self.w_in.dtype and not autocast_on(x.device.type):
            raise ValueError(f"x has dtype {x.dtype} but the layer's weights are {self.w_in.dtype}; "
                             f"convert one of them (e.g. layer.to(x.dtype))")
        B, T, d = x.shape
        x_groups = self.group_tokens(x)  # [G, n, d]
        logits = router_logits(x_groups, self.w_router, validate=False)  # [G, n, e], float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            probs = torch.softmax(logits, dim=-1)  # S = Softmax(X W_g)
            if check_values and bool(torch.isnan(probs).any()):
                raise ValueError("router probabilities are NaN (check w_router for NaN/inf)")
            r = self.route(probs)  # (Eq. 1-2) gates, token_index [G, e, s]
        y = self.experts(x_groups, r.gates, r.token_index)  # (Eq. 3-4) [G, n, d]
        stats = routing_stats(r.token_index, r.demand, probs.shape[-2], r.capacity)
        return MoEOutput(self.ungroup_tokens(y, B, T), r.aux_loss, router_z_loss(logits, validate=False).mean(), stats)


# ----------------------------------------------------------------------------- input guards
def check_tensor(value, name, min_dim, floating=True, check_values=True):
    """ValueError naming `name` unless value is a non-empty tensor with >= min_dim dims (and, with
    check_values, finite: that reads the values, i.e. a host sync on a GPU)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {value.dtype}")
    if value.dim() < min_dim or 0 in value.shape:
        raise ValueError(f"{name} must be a non-empty tensor with at least {min_dim} dims; "
                         f"got shape {tuple(value.shape)}")
    if check_values and floating and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite (no NaN or inf)")


def check_probs(probs, name="probs"):
    check_tensor(probs, name, 2)
    if bool((probs < 0).any()) or bool((probs > 1).any()):
        raise ValueError(f"{name} must lie in [0, 1]")


def check_int(value, name, low, high=math.inf):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]; got {value!r}")


def check_number(value, name, low, high=math.inf, low_open=True, high_open=False):
    """ValueError unless value is a real number in the interval (low, high] (ends as given)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open or high == math.inf else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}; got {value!r}")


def check_eval_routing(value):
    if value not in EVAL_ROUTINGS:
        raise ValueError(f"eval_routing must be 'auto', 'threshold' or 'group'; got {value!r}")


def check_moe_ffn_inputs(x, gates, token_index, w_in, w_out):
    """moe_ffn's arguments: shapes that fit together, int token_index in [-1, n), finite floats."""
    check_tensor(x, "x", 2)
    check_tensor(gates, "gates", 2)
    check_tensor(token_index, "token_index", 2, floating=False)
    check_tensor(w_in, "w_in", 3)
    check_tensor(w_out, "w_out", 3)
    if token_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_index must be int32 or int64; got {token_index.dtype}")
    if gates.shape != token_index.shape or gates.shape[:-2] != x.shape[:-2]:
        raise ValueError(f"gates and token_index must both have shape [..., e, s] with the leading dims of x "
                         f"{tuple(x.shape[:-2])}; got {tuple(gates.shape)} and {tuple(token_index.shape)}")
    e, d, f = w_in.shape if w_in.dim() == 3 else (None, None, None)
    if d != x.shape[-1] or e != gates.shape[-2] or w_out.shape != (e, f, d):
        raise ValueError(f"w_in must be [e={gates.shape[-2]}, d={x.shape[-1]}, f] and w_out "
                         f"[e, f, d]; got {tuple(w_in.shape)} and {tuple(w_out.shape)}")
    if bool((token_index < -1).any()) or bool((token_index >= x.shape[-2]).any()):
        raise ValueError(f"token_index must lie in [-1, {x.shape[-2]}) (-1 = empty slot)")


def autocast_on(device_type):
    """Whether autocast is on for this device type (torch >= 2.4 takes the device type)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch 2.3
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


# ----------------------------------------------------------------------------- a demo
def demo(steps=200, seed=0):
    """Train a 2-layer model with one MoE layer to copy a token 3 positions back -> (first loss,
    last loss). Shows the layer working with nothing but this file and torch."""
    torch.manual_seed(seed)
    V, d, B, T = 16, 32, 16, 12
    emb, moe, head = nn.Embedding(V, d), MoE(d, 64, n_experts=4, capacity_factor=2.0), nn.Linear(d, V)
    opt = torch.optim.Adam([*emb.parameters(), *moe.parameters(), *head.parameters()], lr=1e-2)
    losses = []
    for _ in range(steps):
        ids = torch.randint(V, (B, T))
        x = emb(ids) + emb(ids.roll(3, dims=1))  # the answer is in the input: the MoE must map it
        loss = F.cross_entropy(head(x + moe(x).y)[:, 3:].reshape(-1, V), ids[:, :-3].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="ecmoe.py: the expert-choice MoE layer. Import it "
                                "(`from ecmoe import MoE`); run it to train a tiny demo model.")
    p.add_argument("--steps", type=int, default=200, help="demo training steps")
    steps = p.parse_args().steps
    first, last = demo(steps)
    print(f"demo: loss {first:.3f} -> {last:.3f} after {steps} steps (MoE(32, 64, n_experts=4))")
