"""Expert Threshold routing (ET, arXiv 2603.11535): expert choice's cutoff, learned, then applied
token by token in training and in inference alike.

Each expert i keeps tau_i, an EMA of the score cutoff expert choice would use: its k-th best
score over a large batch, i.e. its (1 - c/e) score quantile. Token t goes to expert i iff
S[t, i] >= tau_i. No token's routing reads another token of its batch, so the layer is causal
in a decoder and the same at every batch size, in training too; an expert's load varies
around k (that is the price: no fixed buckets). `ExpertThresholdMoE` is `ecmoe.MoE` with `route`
overridden; routing is ecmoe.threshold_choice on the softmax scores S (expert choice's router:
only the routing rule differs), the learned statistic is below.
Same as reference_numpy.expert_threshold_cutoff / expert_threshold_update (tests prove it).

Decisions (the paper gives the idea, not these details):
(a) The statistic: each training forward's cutoff is the k_all-th best score of each expert over
    ALL G*n tokens of the forward, k_all = expert_capacity(G*n, e, c); the thresholds are its EMA
    with the layer's threshold_decay (0.99: about the last 100 forwards). Why all tokens, not
    ecmoe.MoE's mean over groups of each group's k-th best: ET has no routing groups, so what it
    estimates is a property of the score distribution, the (1 - c/e) quantile, and the largest
    sample estimates it best. A small group's k-th best is a biased cutoff (position groups of
    4 tokens, e = 16, c = 2: k = ceil(0.5) = 1, the group's maximum, a top-1/4 cutoff where c/e
    asks for the top 1/8), and it would change with --group / --group-size, which do not change
    ET's routing at all. Under expert parallelism each process takes its own tokens' cutoff and the
    EMA takes the processes' mean (mean_over_groups), so every process keeps the same thresholds.
(b) Causality: a training forward routes with the thresholds learned from EARLIER forwards, and
    only then folds its own cutoff into the EMA. So no token's experts depend on another token
    of its own batch: not on later positions of its sequence, not on the other sequences.
(c) The first training forward (no thresholds yet: threshold_updates == 0) routes with its own
    cutoff, i.e. expert choice over the whole forward as one group (plus any tokens tied with
    the cutoff; expert parallelism: over this process's tokens). It is the only forward that is
    not causal; one forward cannot teach the model to exploit it, and the thresholds start where
    they belong instead of at a guess (router scores at init crowd around 1/e, so a fixed 1/e
    sends about half the tokens to every expert, and a constant a little higher almost none).
    An eval forward before any training forward raises ValueError (nothing to route with).
(d) demand = the tokens each expert took (per group), so the routing statistics show the loads
    varying around the bucket k; nothing is dropped, and there is no balance loss (aux_loss 0).
Caveat: activation recomputation (torch.utils.checkpoint) of this layer reruns its forward after
the EMA has moved, so the recompute could route differently; train_tiny.py does not recompute.
"""
import torch

from ecmoe import MoE, Routing, expert_capacity, threshold_choice
from moe.grouped import GroupedExperts


class ExpertThresholdMoE(GroupedExperts, MoE):
    """ecmoe.MoE routed by learned per-expert thresholds in training and inference alike; its
    loads vary, so its experts run on the grouped path (moe/grouped.py: no padding).

    - capacity_factor: c; each expert's threshold tracks its expert_capacity(N, e, c)-th best
      score over the N tokens of a forward, so a token gets c experts on average.
    - group: only how tokens are laid out in slots [G, e, s] (and the per-group statistics):
      routing is per token, so every group is causal here.
    - threshold_decay, check_inputs: as ecmoe.MoE. eval_routing is always "threshold".
    Buffers threshold [e] (float32) and threshold_updates, as ecmoe.MoE: they move only in
    training-mode forwards, after the forward has routed.
    """
    dropless = True  # no capacity: nothing is dropped and loads vary (moe/parallel.py pads on it)

    def __init__(self, d_model, d_ff, n_experts, capacity_factor=2.0, group="position",
                 threshold_decay=0.99, check_inputs=None):
        super().__init__(d_model, d_ff, n_experts, capacity_factor, group, "threshold",
                         threshold_decay, check_inputs)

    def route(self, probs):
        """probs [G, n, e] -> Routing: token t to expert i iff probs[t, i] >= threshold[i], the
        thresholds of earlier forwards; a training forward then learns from its own cutoff."""
        if self.eval_routing != "threshold":  # the attribute may have been set
            raise ValueError("ExpertThresholdMoE routes by threshold in training and eval alike; "
                             f"eval_routing must stay 'threshold', got {self.eval_routing!r}")
        if self.training:
            cutoff = self.forward_cutoff(probs)  # [e] this forward's, read only after routing
            # (c) the first forward has no thresholds yet: it routes with its own cutoff
            threshold = torch.where(self.threshold_updates == 0, cutoff, self.threshold.to(cutoff.dtype))
        elif int(self.threshold_updates) == 0:  # a sync, in eval only
            raise ValueError("ExpertThresholdMoE needs thresholds learned in training; this layer "
                             "has never run a training-mode forward")
        else:
            threshold = self.threshold
        # (b) token t -> expert i iff S[t, i] >= tau_i: no other token of the batch involved
        gates, token_index = threshold_choice(probs, threshold, validate=False)  # [G, e, s]
        if self.training:
            self.update_threshold(cutoff[None])  # only now: this forward routed without its own cutoff
        demand = (token_index >= 0).sum(-1).float()  # (d) [G, e] tokens each expert took
        return Routing(gates, token_index, demand, probs.new_zeros(()),
                       expert_capacity(*probs.shape[-2:], self.capacity_factor))

    @torch.no_grad()
    def forward_cutoff(self, probs):
        """(a) Each expert's k_all-th best score over all G*n tokens of the forward, k_all =
        expert_capacity(G*n, e, c). probs [G, n, e] -> cutoff [e]."""
        S_T = probs.detach().reshape(-1, probs.shape[-1]).T  # [e, G*n]
        k_all = expert_capacity(S_T.shape[1], S_T.shape[0], self.capacity_factor)
        return torch.topk(S_T, k_all, dim=-1, sorted=False).values.amin(-1)  # [e] k_all-th best
