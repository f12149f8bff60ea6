"""Grouped expert matmuls for variable loads: the filled slots sorted by expert, no padding.

ecmoe.moe_ffn gives every expert the same s slots. With expert choice every slot is filled, but
where loads vary (dropless top-k, threshold routing) s is the busiest expert's load and the other
experts compute on empty slots. Here the filled slots are gathered as rows sorted by expert and
each FFN layer is ONE matmul over ragged groups with offsets (MegaBlocks, Gale et al. 2022;
ScatterMoE, Tan et al. 2024; PAPER.md Sec. 7):
    X_in[r] = x[token(r)]                          rows sorted by expert               [m, d]
    offs[i] = sum_{j <= i} count[j]                where expert i's rows end (device)  [e]
    X_e[r] = GeLU_tanh(X_in[r] W1[i(r)]) W2[i(r)]  torch._grouped_mm(X, W, offs=offs)  [m, d]
    X_out[l] = sum_{r: token(r) = l} gate(r) X_e[r]          (Eq. 4 over rows)        [n, d]
torch._grouped_mm (a private op of recent torch; 2.13 here) takes float32/bfloat16 rows whose
strides are 16-byte multiples (d and f multiples of 4 in float32, of 8 in bfloat16). It runs forward
and backward on CPU (a loop over the groups inside torch); on CUDA its fused kernel needs bfloat16
and SM90+, elsewhere torch copies offs to the host (a sync) and loops. Where torch cannot take it
(float64, odd widths, older torch) `grouped_expert_ffn` loops over the experts itself, reading the
group sizes on the host: one sync.

Host syncs: a layout with a data-dependent number of rows m (threshold routing) counts it, one
sync; dropless top-k (plain or loss-free) has exactly m = G*n*k rows, known in advance, so its
layout is built with static shapes and, on the _grouped_mm path, the whole layer runs without a
host sync.

Shape legend: as ecmoe (G groups, n tokens a group, e experts, s slots, d, f), plus m rows (filled
slots) and k = top_k.
"""
import torch
import torch.nn.functional as F

from ecmoe import MoE, Routing, autocast_on, expert_capacity, load_balancing_loss
from moe.token_choice import LossFreeMoE, TokenChoiceMoE, top_choices


# ----------------------------------------------------------------------------- the experts on rows
def grouped_mm_supported(X, w):
    """Whether torch._grouped_mm takes rows X [m, d] times w [e, d, f] on this build and device:
    float32 or bfloat16, CPU or CUDA, contiguous, every row stride a multiple of 16 bytes."""
    return (hasattr(torch, "_grouped_mm") and X.device.type in ("cpu", "cuda")
            and X.dtype in (torch.float32, torch.bfloat16) and w.dtype == X.dtype
            and X.is_contiguous() and w.is_contiguous()
            and all(size * X.element_size() % 16 == 0 for size in w.shape[1:]))


def grouped_expert_ffn(X, counts, w_in, w_out):
    """X_e[r] = GeLU_tanh(X[r] W1[i]) W2[i] for rows X [m, d] sorted by expert, counts [e] rows of each
    expert -> X_e [m, d]. torch._grouped_mm where supported (no host sync); else a loop over the
    experts (one host sync: the split sizes)."""
    if hasattr(torch, "_grouped_mm") and autocast_on(X.device.type):  # not on autocast's list: cast as bmm is
        dtype = torch.get_autocast_dtype(X.device.type)
        X, w_in, w_out = X.to(dtype), w_in.to(dtype), w_out.to(dtype)
    if grouped_mm_supported(X, w_in) and grouped_mm_supported(X, w_out):
        offs = counts.cumsum(0).to(torch.int32)  # [e] end row of each expert, on the device
        H = F.gelu(torch._grouped_mm(X, w_in, offs=offs), approximate="tanh")  # [m, f]
        return torch._grouped_mm(H, w_out, offs=offs)  # [m, d]
    parts = X.split(counts.tolist())  # e blocks [count_i, d] (the sync)
    return torch.cat([F.gelu(part @ w1, approximate="tanh") @ w2
                      for part, w1, w2 in zip(parts, w_in.unbind(0), w_out.unbind(0))])  # [m, d]


def combine_rows(x, X_e, token, gate):
    """(Eq. 4) X_out[l] = sum over rows r of token l of gate[r] X_e[r], a scatter-add in x's dtype.
    x [..., n, d] (shape and dtype only), X_e [m, d], token [m] (row of x.reshape(-1, d)), gate [m]."""
    weighted = X_e.to(x.dtype) * gate.to(x.dtype).unsqueeze(-1)  # [m, d]
    y = torch.zeros_like(x.reshape(-1, x.shape[-1])).index_add_(0, token, weighted)  # [G*n, d]
    return y.view(x.shape)


# ----------------------------------------------------------------------------- from slots
def grouped_moe_ffn(x, gates, token_index, w_in, w_out, rows=None):
    """(Eq. 3-4) ecmoe.moe_ffn without padding: only the filled slots, sorted by expert.

    x [..., n, d], gates/token_index [..., e, s] (-1 = empty slot), w_in [e, d, f], w_out [e, f, d]
    -> y [..., n, d]. rows: the number of filled slots if known in advance (dropless top-k:
    G*n*k), then no host sync; None counts them (torch.nonzero: one host sync)."""
    n, d = x.shape[-2:]
    e, s = gates.shape[-2:]
    index = token_index.reshape(-1, e, s).transpose(0, 1).reshape(e, -1)  # [e, G*s] expert-major
    Gs = index.shape[1]
    filled = index.reshape(-1) >= 0  # [e*G*s]
    if rows is None:
        slot = filled.nonzero().squeeze(1)  # [m] filled slots, sorted by expert (the sync)
    else:
        slot = torch.nonzero_static(filled, size=rows).squeeze(1)  # [m = rows], static shape
    group = slot % Gs // s  # [m] routing group of each row
    token = index.reshape(-1).index_select(0, slot) + group * n  # [m] row of x.reshape(-1, d)
    gate = gates.reshape(-1, e, s).transpose(0, 1).reshape(-1).index_select(0, slot)  # [m]
    counts = filled.view(e, Gs).sum(1)  # [e] rows of each expert
    X_in = x.reshape(-1, d).index_select(0, token)  # [m, d]
    return combine_rows(x, grouped_expert_ffn(X_in, counts, w_in, w_out), token, gate)


class GroupedExperts:
    """Mixin for any MoE layer whose loads vary: experts() runs grouped_moe_ffn on the filled slots
    (one host sync per forward, to count them). Put it first: class L(GroupedExperts, MoE)."""

    def experts(self, x_groups, gates, token_index):
        """(Eq. 3-4) x_groups [G, n, d], gates/token_index [G, e, s] -> y [G, n, d]."""
        return grouped_moe_ffn(x_groups, gates, token_index, self.w_in, self.w_out)


class GroupedMoE(GroupedExperts, MoE):
    """ecmoe.MoE with grouped experts: for threshold routing in eval, whose loads vary."""


# ----------------------------------------------------------------------------- dropless top-k
def dropless_top_k_ffn(x_groups, probs, top_k, w_in, w_out):
    """Dropless top-k straight from each token's choices: G*n*top_k rows sorted by expert, offsets
    from a per-group bincount on the device; no padded tensor, and no host sync on the
    _grouped_mm path. x_groups [G, n, d], probs [G, n, e] -> y [G, n, d], demand [G, e] (float)."""
    G, n, d = x_groups.shape
    choice_expert, choice_gate = top_choices(probs, top_k)  # [G, n, k]
    expert = choice_expert.reshape(-1)  # [G*n*k], choice j of token t of group g at (g*n + t)*k + j
    order = torch.sort(expert, stable=True).indices  # [G*n*k] by expert, then group and token
    token = order // top_k  # [G*n*k] row of x_groups.reshape(-1, d)
    gate = choice_gate.reshape(-1).index_select(0, order)  # [G*n*k]
    demand = torch.zeros_like(probs[:, 0], dtype=torch.long).scatter_add_(
        1, choice_expert.reshape(G, -1), torch.ones_like(choice_expert.reshape(G, -1)))  # [G, e]
    X_in = x_groups.reshape(-1, d).index_select(0, token)  # [G*n*k, d]
    X_e = grouped_expert_ffn(X_in, demand.sum(0), w_in, w_out)  # [G*n*k, d]
    return combine_rows(x_groups, X_e, token, gate), demand.float()


def chosen_slots(probs, choice_expert, choice_gate):
    """Dropless top-k laid out one slot per (expert, token): slot t of expert i holds token t iff
    t chose i. probs [G, n, e] (shape only), choice_expert/choice_gate [G, n, k] (top_choices) ->
    gates [G, e, n], token_index [G, e, n] (-1 where not chosen), demand [G, e] (float). Static
    shapes: no host sync, and exactly G*n*k filled slots."""
    n = probs.shape[1]
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, choice_expert, True)  # [G, n, e]
    gates = torch.zeros_like(probs).scatter(-1, choice_expert, choice_gate).transpose(1, 2)  # [G, e, n]
    token = torch.arange(n, device=probs.device).view(1, 1, n)
    token_index = torch.where(chosen.transpose(1, 2), token, -1)  # [G, e, n]
    return gates, token_index, chosen.sum(1).float()


class GroupedTopK:
    """Mixin for dropless top-k layers laid out by chosen_slots: experts() computes exactly the
    G*n*top_k filled slots, a count known in advance (no host sync on the _grouped_mm path).
    Put it first: class L(GroupedTopK, TokenChoiceMoE)."""

    def experts(self, x_groups, gates, token_index):
        """(Eq. 3-4) on the G*n*top_k filled slots: x_groups [G, n, d], gates/token_index [G, e, n]."""
        G, n, d = x_groups.shape
        return grouped_moe_ffn(x_groups, gates, token_index, self.w_in, self.w_out, rows=G * n * self.top_k)


class GroupedDroplessMoE(GroupedTopK, TokenChoiceMoE):
    """TokenChoiceMoE(top_k, dropless=True) with grouped expert matmuls: the same routing, the same
    y, but the experts compute exactly G*n*top_k rows (no padding to the busiest expert) and, on
    the _grouped_mm path, with no host sync (the padded layer syncs once to size its slots).

    The Routing keeps one slot per expert per token ([G, e, n] indices, filled where the token
    chose the expert): static shapes, and the statistics of ecmoe.MoE work unchanged. Arguments
    as TokenChoiceMoE (no random_second: its row count would depend on the draws). Not tested under
    expert parallelism: moe/parallel.py would exchange all n slots of every expert, e/top_k times
    the rows routed (the padded layer sends the busiest expert's load).
    """

    def __init__(self, d_model, d_ff, n_experts, top_k=2, capacity_factor=2.0, group="position",
                 check_inputs=None):
        super().__init__(d_model, d_ff, n_experts, top_k, capacity_factor, dropless=True,
                         group=group, check_inputs=check_inputs)

    def route(self, probs):
        """probs [G, n, e] -> Routing: slot t of expert i holds token t iff i is among t's top_k
        (gates renormalised as TokenChoiceMoE's); demand [G, e]; the balance loss."""
        gates, token_index, demand = chosen_slots(probs, *top_choices(probs, self.top_k))
        return Routing(gates, token_index, demand, load_balancing_loss(probs, validate=False).mean(),
                       expert_capacity(*probs.shape[-2:], self.capacity_factor))


class GroupedLossFreeMoE(GroupedTopK, LossFreeMoE):
    """LossFreeMoE with grouped expert matmuls: the same choices (top_k of probs + expert_bias),
    gates, loads, bias updates and y, laid out by chosen_slots as GroupedDroplessMoE, so the
    experts compute exactly G*n*top_k rows with no host sync. Arguments and buffers as
    LossFreeMoE (update_bias once per optimizer step); not tested under expert parallelism (see
    GroupedDroplessMoE).
    """

    def route(self, probs):
        """probs [G, n, e] -> Routing: top_k of probs + expert_bias per token, dropless, one slot
        per (expert, token); aux_loss 0. Training forwards add to expert_load."""
        gates, token_index, demand = chosen_slots(probs, *top_choices(probs, self.top_k, self.expert_bias))
        if self.training:  # load_i for update_bias: summed over this step's training forwards
            self.expert_load += demand.sum(0).long()
        return Routing(gates, token_index, demand, probs.new_zeros(()),
                       expert_capacity(*probs.shape[-2:], self.capacity_factor))
