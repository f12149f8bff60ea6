"""Token-choice routing, the baselines of the paper: each TOKEN picks its top-k experts.

Switch top-1 (Fedus et al. 2021) and GShard top-2 (Lepikhin et al. 2020), with
first-come-first-served capacity: all first choices claim a slot in token order, then all
second choices; a claim on a full expert is dropped (the token then gets one expert fewer).
`TokenChoiceMoE` is `ecmoe.MoE` with `route` overridden; everything else (dispatch, experts,
combine, z-loss, statistics) is the expert-choice layer's. Same as reference_numpy.token_choice.
`LossFreeMoE` is dropless top-k balanced without a loss (Wang et al. 2024, arXiv:2408.15664, as
DeepSeek-V3): a per-expert bias on the choice, moved after each optimizer step; the same as
reference_numpy.lossfree_choice / lossfree_bias_update.
"""
import math

import torch
import torch.nn.functional as F

from ecmoe import (MoE, Routing, check_int, check_number, check_probs, check_tensor, expert_capacity,
                   load_balancing_loss)


def token_choice(probs, top_k, capacity, second_uniform=None, second_threshold=0.2, bias=None,
                 validate=True):
    """Token choice (Switch top-1 / GShard top-2) with first-come-first-served capacity.

    probs [..., n, e] -> gates, token_index [..., e, capacity]; empty slots: index -1, gate 0.
    Claims: all 1st choices in token order, then all 2nd choices, ...; a claim on a full
    expert is dropped. Gates: raw prob for top_k == 1, else the top_k probs renormalised.
    capacity = n is dropless (nothing can be dropped).
    second_uniform [..., n] in [0, 1) (top_k == 2 only): GShard's random second expert; token t
    claims its second expert only if u[t] < g2[t] / second_threshold (g2 renormalised), and a
    skipped second choice claims no capacity. None keeps every second choice.
    bias [e] (loss-free balancing, LossFreeMoE): the experts are chosen on probs + bias, the
    gates still come from probs. None: chosen on probs."""
    if validate:
        check_probs(probs)
        check_int(top_k, "top_k", 1, probs.shape[-1])
        check_int(capacity, "capacity", 1)
        check_second_choice(second_uniform, second_threshold, top_k, probs)
        if bias is not None:
            check_tensor(bias, "bias", 1)
            if bias.shape != probs.shape[-1:]:
                raise ValueError(f"bias must have shape [e={probs.shape[-1]}]; got {tuple(bias.shape)}")
    *lead, n, e = probs.shape
    probs = probs.reshape(-1, n, e)  # [G, n, e]
    G = probs.shape[0]
    choice_expert, choice_prob = top_choices(probs, top_k, bias)  # [G, n, top_k]
    # claims in priority order: rank r major, token t minor -> [G, top_k*n]
    claim_expert = choice_expert.transpose(1, 2).reshape(G, top_k * n)
    claim_gate = choice_prob.transpose(1, 2).reshape(G, top_k * n)
    claim_token = torch.arange(n, device=probs.device).repeat(top_k).expand(G, -1)
    # position of each claim in its expert's queue (earlier claims on the same expert)
    one_hot = F.one_hot(claim_expert, e)  # [G, top_k*n, e], O(n e) not O(n e k)
    if second_uniform is None:
        position = (one_hot.cumsum(1) * one_hot).sum(-1) - 1  # [G, top_k*n]
        accepted = position < capacity
    else:  # GShard: the second expert only with probability min(1, g2 / threshold)
        keep_second = second_uniform.reshape(G, n) < choice_prob[..., 1].detach() / second_threshold
        claim_made = torch.cat([torch.ones_like(keep_second), keep_second], dim=1)  # [G, 2n]
        one_hot = one_hot * claim_made.unsqueeze(-1)  # skipped claims take no place in a queue
        position = (one_hot.cumsum(1) * one_hot).sum(-1) - 1  # -1 for skipped claims
        accepted = claim_made & (position < capacity)
    # accepted claims go to slot expert*capacity + position; dropped ones to a spare slot
    slot = torch.where(accepted, claim_expert * capacity + position, e * capacity)
    gates = probs.new_zeros(G, e * capacity + 1).scatter(1, slot, claim_gate)
    token_index = torch.full((G, e * capacity + 1), -1, dtype=torch.long, device=probs.device)
    token_index = token_index.scatter(1, slot, claim_token)
    gates = gates[:, :-1].reshape(*lead, e, capacity)  # drop the spare slot
    token_index = token_index[:, :-1].reshape(*lead, e, capacity)
    return gates, token_index


def top_choices(probs, top_k, bias=None):
    """Each token's top_k experts (ties to the lower index) and their gates: the raw probability
    for top_k = 1, else renormalised to sum 1 (before any drop). probs [G, n, e] -> [G, n, top_k] x2.
    bias [e] or None: choose on probs + bias (loss-free balancing); the gates stay the probs'."""
    scores = probs.detach() if bias is None else probs.detach() + bias.to(probs.dtype)  # s_i (+ b_i)
    choice_expert = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :top_k]
    choice_prob = torch.gather(probs, -1, choice_expert)  # [G, n, top_k]
    if top_k > 1:
        total = choice_prob.sum(-1, keepdim=True)
        choice_prob = choice_prob / torch.where(total > 0, total, torch.ones_like(total))
    return choice_expert, choice_prob


def check_second_choice(second_uniform, second_threshold, top_k, probs):
    """ValueError naming the argument unless GShard's random-second-expert inputs are valid."""
    check_number(second_threshold, "second_threshold", 0)
    if second_uniform is None:
        return
    if top_k != 2:
        raise ValueError(f"second_uniform needs top_k=2 (GShard's random second expert); got top_k={top_k}")
    if not isinstance(second_uniform, torch.Tensor) or not second_uniform.is_floating_point() \
            or second_uniform.shape != probs.shape[:-1]:
        got = tuple(second_uniform.shape) if isinstance(second_uniform, torch.Tensor) else type(second_uniform).__name__
        raise ValueError(f"second_uniform must be a floating-point tensor of shape [..., n] = "
                         f"{tuple(probs.shape[:-1])}; got {got}")
    if not bool(((second_uniform >= 0) & (second_uniform < 1)).all()):
        raise ValueError("second_uniform must lie in [0, 1) (uniform draws)")


class TokenChoiceMoE(MoE):
    """ecmoe.MoE with token-choice routing (Switch top-1, GShard top-2) and a balance loss.

    - top_k: experts each token picks (1: Switch, 2: GShard).
    - capacity_factor: c; each expert takes at most k = expert_capacity(n, e, c) claims per group.
    - dropless: no capacity limit; an expert's slots are the largest demand of any expert in the
      batch (as OLMoE, Mixtral and MegaBlocks train). That shape depends on the data: one host
      sync per forward. capacity_factor then only sets the bucket the statistics compare with.
    - random_second (top_k = 2): GShard / Mesh-TensorFlow's default; token t uses its second
      expert only if u[t] < g2[t] / second_threshold, u[t] ~ U[0, 1) drawn by torch.rand from
      torch's GLOBAL generator (one float32 draw per token per forward; pin it with
      torch.manual_seed). No other router draws random numbers.
    - group, check_inputs: as ecmoe.MoE. Token choice decides per token, so it has no thresholds
      and no eval_routing: a token's experts never depend on the other tokens (but a full
      expert drops late claims, so capacity makes a token depend on the tokens before it).
    aux_loss is the Switch balance loss e * sum_i f_i P_i, unweighted (weight it in the loss).
    """

    def __init__(self, d_model, d_ff, n_experts, top_k=2, capacity_factor=2.0, dropless=False,
                 random_second=False, second_threshold=0.2, group="position", check_inputs=None):
        super().__init__(d_model, d_ff, n_experts, capacity_factor, group, "group", check_inputs=check_inputs)
        check_int(top_k, "top_k", 1, n_experts)
        check_number(second_threshold, "second_threshold", 0)
        if random_second and top_k != 2:
            raise ValueError(f"random_second needs top_k=2 (GShard's random second expert); got top_k={top_k}")
        self.top_k, self.dropless = top_k, dropless
        self.random_second, self.second_threshold = random_second, second_threshold
        self.threshold = self.threshold_updates = None  # no thresholds: not in the state_dict

    def extra_repr(self):
        extra = ", dropless" if self.dropless else ""
        extra += f", random_second (threshold {self.second_threshold})" if self.random_second else ""
        return super().extra_repr() + f", top_k={self.top_k}" + extra

    def route(self, probs):
        """probs [G, n, e] -> Routing: token choice with capacity, the claims made on each
        expert as demand, and the balance loss."""
        n, e = probs.shape[-2:]
        capacity = k = expert_capacity(n, e, self.capacity_factor)
        choice_expert, choice_prob = top_choices(probs, self.top_k)  # [G, n, top_k]
        claims = F.one_hot(choice_expert, e)  # [G, n, top_k, e]
        second_uniform = None
        if self.random_second:  # one U[0, 1) draw per token from torch's global generator
            second_uniform = torch.rand(probs.shape[:-1], device=probs.device)
            made = torch.stack([torch.ones_like(second_uniform, dtype=torch.bool),
                                second_uniform < choice_prob[..., 1].detach() / self.second_threshold], dim=-1)
            claims = claims * made.unsqueeze(-1)  # a skipped second choice is no claim
        demand = claims.sum((1, 2)).float()  # [G, e] claims made on each expert
        if self.dropless:  # room for the busiest expert: nothing is dropped (one host sync)
            capacity = max(int(demand.max()), 1)
        gates, token_index = token_choice(probs, self.top_k, capacity, second_uniform,
                                          self.second_threshold, validate=False)
        return Routing(gates, token_index, demand, load_balancing_loss(probs, validate=False).mean(), k)


class LossFreeMoE(TokenChoiceMoE):
    """Dropless top-k with auxiliary-loss-free balancing (arXiv:2408.15664; DeepSeek-V3).

    Each token takes the top_k experts of S + b (b = expert_bias [e]); its gates are its raw S of
    those experts, renormalised (as top2); nothing is dropped; no balance loss (aux_loss = 0).
    update_bias(), called once after every optimizer step, moves b towards balance:
        b_i <- b_i + u * sign(mean load - load_i),  the update mean-centred (as torchtitan),
    with load_i = the tokens routed to expert i by the training forwards since the last update.
    - top_k: experts per token (2 in the router table).
    - bias_rate: u (1e-3, the paper's); 0 freezes b.
    - capacity_factor: c, only the bucket the statistics compare with (dropless).
    - group, check_inputs: as ecmoe.MoE.
    Buffers: expert_bias [e] float32 (b: saved with the model; a buffer, so the optimizer never
    sees it) and expert_load [e] int64 (the loads counted since the last update).
    Safe under gradient accumulation: every micro-batch's forward adds its loads and the trainer
    updates once per optimizer step, so a step of M micro-batches moves b exactly as one forward
    over the whole batch would (b is fixed within a step and routing is per token). Safe under
    activation recomputation: a recomputed forward counts its tokens again, but doubling every
    load doubles mean load - load_i, whose sign, and so the mean-centred update, is unchanged.
    Why a subclass and not an option of TokenChoiceMoE: the bias, its counter and update_bias
    belong to this router alone; the other token-choice layers keep their state_dicts, and the
    trainer finds the layers to update by their class.
    """

    def __init__(self, d_model, d_ff, n_experts, top_k=2, capacity_factor=2.0, bias_rate=1e-3,
                 group="position", check_inputs=None):
        super().__init__(d_model, d_ff, n_experts, top_k, capacity_factor, dropless=True,
                         group=group, check_inputs=check_inputs)
        check_number(bias_rate, "bias_rate", 0, low_open=False)
        self.bias_rate = bias_rate
        self.register_buffer("expert_bias", torch.zeros(n_experts))  # b [e]
        self.register_buffer("expert_load", torch.zeros(n_experts, dtype=torch.long))  # [e]

    def extra_repr(self):
        return super().extra_repr() + f", loss-free bias_rate={self.bias_rate}"

    def _apply(self, fn, *args, **kwargs):
        """Keep b float32 under model.half() / .to(bfloat16), as ecmoe.MoE keeps its thresholds:
        steps of u = 1e-3 would round away on a bf16 bias of 0.5 (spacing 2^-8)."""
        before = self.expert_bias
        super()._apply(fn, *args, **kwargs)
        if self.expert_bias.dtype not in (torch.float32, torch.float64):
            self.expert_bias = before.to(device=self.expert_bias.device, dtype=torch.float32)
        return self

    def route(self, probs):
        """probs [G, n, e] -> Routing: top_k of probs + expert_bias per token, dropless, the
        tokens each expert got as demand, aux_loss 0. Training forwards add to expert_load."""
        n, e = probs.shape[-2:]
        # top_k on s_i + b_i (the gates stay s_i, renormalised over the chosen)
        choice_expert, _ = top_choices(probs, self.top_k, self.expert_bias)  # [G, n, top_k]
        demand = F.one_hot(choice_expert, e).sum((1, 2)).float()  # [G, e] tokens per expert
        if self.training:  # load_i for update_bias: summed over this step's training forwards
            self.expert_load += demand.sum(0).long()
        capacity = max(int(demand.max()), 1)  # dropless: room for the busiest expert (host sync)
        gates, token_index = token_choice(probs, self.top_k, capacity, bias=self.expert_bias,
                                          validate=False)
        return Routing(gates, token_index, demand, probs.new_zeros(()),
                       expert_capacity(n, e, self.capacity_factor))

    @torch.no_grad()
    def update_bias(self):
        """Once per optimizer step: b_i += u * sign(mean load - load_i), minus the mean of that
        update (b keeps its mean); then the loads restart from 0. Expert parallelism: the loads
        are averaged over the processes first, so every process keeps the same b."""
        load = self.mean_over_groups(self.expert_load[None].to(self.expert_bias.dtype))  # [e]
        delta = self.bias_rate * torch.sign(load.mean() - load)  # underloaded experts up
        self.expert_bias += delta - delta.mean()  # mean-centred (torchtitan)
        self.expert_load.zero_()
