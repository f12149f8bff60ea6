"""ecmoe: a fast PyTorch Mixture-of-Experts layer with Expert Choice routing.

Zhou et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS 2022 (arXiv:2202.09368).
Every function here mirrors the NumPy reference `reference_numpy.py` (same name, same
semantics; README "Decisions where the paper is silent") but accepts leading group dimensions, runs on any device, and is
differentiable where it makes sense. `MoE` is the layer built from them.

Equations (paper Sec. 3.2), per routing group of n tokens:
    S = Softmax(X W_g)                      router probabilities, softmax over experts   [n, e]
    k = n c / e                   (Eq. 1)   bucket size; here ceil, clipped to [1, n]
    G, I = TopK(S^T, k)           (Eq. 2)   each expert keeps its k best tokens          [e, k]
    X_in = P X,  P = OneHot(I)    (Eq. 3)   dispatch (done here as a gather, no one-hot)  [e, k, d]
    X_e[i] = GeLU(X_in[i] W1[i]) W2[i]      expert FFN, tanh-GELU, no biases             [e, k, d]
    X_out[l] = sum_ij P[i,j,l] G[i,j] X_e[i,j]   (Eq. 4)  combine (scatter-add)          [n, d]
Capped EC (Sec. 3.3): max <S^T, A> + lambda H(A) s.t. rows of A sum to k, columns <= b,
0 <= A <= 1, solved by KL Dykstra in log space, then rounded by a greedy b-matching.

Shape legend:
    B batch, T sequence length, d model width (d_model), f expert hidden width (d_ff),
    e experts, n tokens in a routing group, k expert capacity (slots per expert),
    c capacity factor, b max experts per token, "..." leading group dimensions.

Token order inside a group (MoE.group): "batch" = all B*T tokens, position-major (t*B + b);
"sequence" = each row (B groups of T); "position" = tokens sharing a position (T groups of B).
Tiny groups: k = expert_capacity(n, e, c) is never below 1, so a group of ONE token (group
"position" at batch size 1, i.e. decoding) has k = 1 and every expert takes that token.
"""
import math
import numbers
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ROUTERS = ("expert_choice", "capped_expert_choice", "top1", "top2", "top2_dropless", "top2_gshard")
# token-choice routers -> experts each token picks (top_k)
TOKEN_CHOICE_TOP_K = {"top1": 1, "top2": 2, "top2_dropless": 2, "top2_gshard": 2}
GROUPS = ("batch", "sequence", "position")
# capped LP solver defaults, the same as reference_numpy's (a test keeps them in sync)
DEFAULT_ENTROPY_WEIGHT = 1e-2  # lambda; the paper's 1e-3 does not converge in 100 sweeps
DEFAULT_MAX_ITER = 1000  # Dykstra sweeps at most
DEFAULT_TOL = 1e-5  # stop when constraints hold and A and the corrections stop moving
# the solver tests its stopping rule after every 10th sweep only: one host sync per 10 sweeps
# on a GPU; the reference uses the same period, so both run exactly the same sweeps
CONVERGENCE_CHECK_EVERY = 10


# ----------------------------------------------------------------------------- validation
def _check_tensor(value, name, min_dim, floating=True, check_values=True):
    """Type, dtype and shape checks (free); with check_values also finiteness (a host sync on GPU)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {value.dtype}")
    if value.dim() < min_dim or 0 in value.shape:
        raise ValueError(f"{name} must be a non-empty tensor with at least {min_dim} dims; "
                         f"got shape {tuple(value.shape)}")
    if check_values and floating and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite (no NaN or inf)")


def _check_probs(probs, name="probs"):
    _check_tensor(probs, name, 2)
    if bool((probs < 0).any()) or bool((probs > 1).any()):
        raise ValueError(f"{name} must lie in [0, 1]")


def _check_int(value, name, low, high):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]; got {value!r}")


def _router_dtype(dtype):
    """Router math runs in float32, or float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- router
def router_logits(x, w_router, validate=True):
    """Router logits x @ w_router in float32 (float64 for float64 inputs), autocast off.

    x [..., n, d], w_router [d, e] -> logits [..., n, e]."""
    if validate:
        _check_tensor(x, "x", 2)
        _check_tensor(w_router, "w_router", 2)
        if w_router.dim() != 2 or w_router.shape[0] != x.shape[-1]:
            raise ValueError(f"w_router must have shape [d={x.shape[-1]}, e]; got {tuple(w_router.shape)}")
    dtype = _router_dtype(x.dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return x.to(dtype) @ w_router.to(dtype)


def router_probs(x, w_router, validate=True):
    """S = Softmax(X W_g) over the experts axis. x [..., n, d], w_router [d, e] -> probs [..., n, e]."""
    logits = router_logits(x, w_router, validate)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return torch.softmax(logits, dim=-1)  # softmax is max-subtracted internally


def expert_capacity(n_tokens, n_experts, capacity_factor):
    """(Eq. 1) k = ceil(n c / e), clipped to [1, n]. Total slots e*k >= n*c.

    Rounding n*c/e to 9 decimals first keeps e.g. 0.1*30 = 3.0000000000000004 at 3."""
    _check_int(n_tokens, "n_tokens", 1, math.inf)
    _check_int(n_experts, "n_experts", 1, math.inf)
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, numbers.Real) \
            or not math.isfinite(capacity_factor) \
            or capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be a finite number > 0; got {capacity_factor!r}")
    k = math.ceil(round(n_tokens * capacity_factor / n_experts, 9))
    return int(min(max(k, 1), n_tokens))


# ----------------------------------------------------------------------------- routers
def expert_choice(probs, k, validate=True):
    """(Eq. 2) G, I = TopK(S^T, k): each expert takes its k highest-probability tokens.

    probs [..., n, e] -> gates [..., e, k] (raw probs, differentiable), token_index [..., e, k].
    Slot order: descending probability, ties -> lower token index (stable sort)."""
    if validate:
        _check_probs(probs)
        _check_int(k, "k", 1, probs.shape[-2])
    S_T = probs.transpose(-1, -2)  # [..., e, n]
    # (Eq. 2) the same as torch.sort(S_T, descending=True, stable=True).indices[..., :k], but a
    # full sort of n scores per expert costs ~10x more than topk at n = 8192, so: find each
    # expert's k-th best score, take every token above it plus the lowest-index tokens tied
    # with it, then stable-sort just those k.
    scores = S_T.detach()
    kth_best = torch.topk(scores, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # [..., e, 1]
    above, tied = scores > kth_best, scores == kth_best  # [..., e, n]
    room = k - above.sum(-1, keepdim=True)  # how many tied tokens still fit
    chosen = above | (tied & (tied.cumsum(-1) <= room))  # exactly k per expert
    # the chosen tokens in ascending token order, with static shapes (no nonzero(): no host
    # sync): chosen token j goes to slot (number of chosen tokens before j), the others to a
    # spare slot k that is cut off. Costs ~2 ms more than nonzero() at n=8192, e=32, k=512 on CPU.
    slot = torch.where(chosen, chosen.to(torch.int32).cumsum(-1, dtype=torch.int32) - 1, k).long()
    token = torch.arange(scores.shape[-1], device=scores.device).expand_as(slot)
    token_index = torch.zeros(*slot.shape[:-1], k + 1, dtype=torch.long, device=scores.device)
    token_index = token_index.scatter_(-1, slot, token)[..., :k]  # [..., e, k] ascending token order
    order = torch.sort(torch.gather(scores, -1, token_index), dim=-1, descending=True, stable=True).indices
    token_index = torch.gather(token_index, -1, order)  # [..., e, k] best first, ties lower index
    gates = torch.gather(S_T, -1, token_index)  # [..., e, k]
    return gates, token_index


def threshold_choice(probs, threshold, validate=True):
    """Expert choice at inference: token t goes to expert i iff probs[t, i] >= threshold[i].

    probs [..., n, e], threshold [e] -> gates [..., e, s] (raw probs), token_index [..., e, s]
    (-1 = empty slot), s = the largest number of tokens any expert takes in any group (>= 1).
    A rule per token: a token's experts never depend on the other tokens, so it is causal and
    the same at every batch size (batch size 1 included). MoE(eval_routing="threshold") uses it
    with thresholds learned in training (see MoE). s is data-dependent: one host sync.
    Slot order as expert_choice: decreasing probability, ties lower token index."""
    if validate:
        _check_probs(probs)
        _check_tensor(threshold, "threshold", 1)
        if threshold.shape != probs.shape[-1:]:
            raise ValueError(f"threshold must have shape [e={probs.shape[-1]}]; got {tuple(threshold.shape)}")
    S_T = probs.transpose(-1, -2)  # [..., e, n]
    chosen = S_T.detach() >= threshold.to(S_T.dtype).unsqueeze(-1)  # [..., e, n] the per-token rule
    s = max(int(chosen.sum(-1).max()), 1)  # the one sync: slots for the busiest expert
    # chosen tokens first, by decreasing probability (stable: ties -> lower token index)
    key = torch.where(chosen, S_T.detach(), torch.full_like(S_T.detach(), -1.0))
    token_index = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :s]
    filled = torch.gather(chosen, -1, token_index)  # [..., e, s]
    gates = torch.gather(S_T, -1, token_index) * filled
    return gates, torch.where(filled, token_index, -1)


def token_choice(probs, top_k, capacity, second_uniform=None, second_threshold=0.2, validate=True):
    """Token choice (Switch top-1 / GShard top-2) with first-come-first-served capacity.

    probs [..., n, e] -> gates, token_index [..., e, capacity]; empty slots: index -1, gate 0.
    Claims: all 1st choices in token order, then all 2nd choices, ...; a claim on a full
    expert is dropped. Gates: raw prob for top_k == 1, else the top_k probs renormalised.
    capacity = n is dropless top-2 (nothing can be dropped).
    second_uniform [..., n] in [0, 1) (top_k == 2 only): GShard's random second expert; token t
    claims its second expert only if u[t] < g2[t] / second_threshold (g2 renormalised), and a
    skipped second choice claims no capacity. None keeps every second choice."""
    if validate:
        _check_probs(probs)
        _check_int(top_k, "top_k", 1, probs.shape[-1])
        _check_int(capacity, "capacity", 1, math.inf)
    if validate or second_uniform is not None:
        _check_second_choice(second_uniform, second_threshold, top_k, probs, check_values=validate)
    *lead, n, e = probs.shape
    probs = probs.reshape(-1, n, e)  # [G, n, e]
    G = probs.shape[0]
    choice_expert = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[..., :top_k]
    choice_prob = torch.gather(probs, -1, choice_expert)  # [G, n, top_k]
    if top_k > 1:  # renormalise before any drop
        total = choice_prob.sum(-1, keepdim=True)
        choice_prob = choice_prob / torch.where(total > 0, total, torch.ones_like(total))
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


def _check_second_threshold(second_threshold):
    if isinstance(second_threshold, bool) or not isinstance(second_threshold, numbers.Real) \
            or not math.isfinite(second_threshold) or second_threshold <= 0:
        raise ValueError(f"second_threshold must be a finite number > 0; got {second_threshold!r}")


def _check_second_choice(second_uniform, second_threshold, top_k, probs, check_values=True):
    _check_second_threshold(second_threshold)
    if second_uniform is None:
        return
    if top_k != 2:
        raise ValueError(f"second_uniform needs top_k=2 (GShard's random second expert); got top_k={top_k}")
    if not isinstance(second_uniform, torch.Tensor) or not second_uniform.is_floating_point() \
            or second_uniform.shape != probs.shape[:-1]:
        raise ValueError(f"second_uniform must be a floating-point tensor of shape [..., n] = "
                         f"{tuple(probs.shape[:-1])}; got "
                         f"{tuple(second_uniform.shape) if isinstance(second_uniform, torch.Tensor) else type(second_uniform).__name__}")
    if check_values and not bool(((second_uniform >= 0) & (second_uniform < 1)).all()):
        raise ValueError("second_uniform must lie in [0, 1) (uniform draws)")


def _check_eval_routing(eval_routing, router):
    if eval_routing not in ("group", "threshold"):
        raise ValueError(f"eval_routing must be 'group' or 'threshold'; got {eval_routing!r}")
    if eval_routing == "threshold" and router != "expert_choice":
        why = ("its tokens come from an LP over the whole group, which no per-expert cutoff "
               "reproduces" if router == "capped_expert_choice" else
               "token choice already routes each token on its own")
        raise ValueError(f"eval_routing='threshold' needs router='expert_choice'; got "
                         f"router={router!r} ({why})")


class CappedLPSolution(NamedTuple):
    assignment: torch.Tensor  # A [..., e, n]
    n_iter: torch.Tensor  # [...] sweeps each group ran
    # residual histories run to the slowest group's sweep count; a group that stopped early
    # repeats its last (frozen) values after its own n_iter
    row_residual: torch.Tensor  # [..., sweeps] max_i |sum_j A[i,j] - k|
    col_residual: torch.Tensor  # [..., sweeps] max_j max(sum_i A[i,j] - b, 0)
    entry_residual: torch.Tensor  # [..., sweeps] max_ij max(A[i,j] - 1, 0)


def _check_cap(probs, k, b):
    _check_probs(probs)
    n, e = probs.shape[-2:]
    _check_int(k, "k", 1, n)
    _check_int(b, "max_experts_per_token", 1, math.inf)
    _check_feasible(n, e, k, b)


def _check_solver_settings(entropy_weight, max_iter, tol):
    if isinstance(entropy_weight, bool) or not isinstance(entropy_weight, numbers.Real) \
            or not math.isfinite(entropy_weight) or entropy_weight <= 0:
        raise ValueError(f"entropy_weight must be a finite number > 0; got {entropy_weight!r}")
    _check_int(max_iter, "max_iter", 1, math.inf)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0; got {tol!r}")


def _check_feasible(n, e, k, b):
    if b * n < k * e:
        raise ValueError(f"max_experts_per_token={b} is infeasible: the {e} experts need k*e = {k * e} "
                         f"slots but n*b = {n * b}; need max_experts_per_token >= {math.ceil(k * e / n)}")


def solve_capped_lp(probs, k, max_experts_per_token, entropy_weight=DEFAULT_ENTROPY_WEIGHT,
                    max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL, validate=True):
    """EC-CAP LP (Sec. 3.3) by KL (Bregman) Dykstra in log space, batched over groups.

    max <S^T, A> + lambda H(A)  s.t. rows of A sum to k (R), columns <= b (C), 0 <= A <= 1 (B):
    the KL projection of K = exp(S^T / lambda) onto R n C n B. Sweep order C, B, R with one
    correction per inequality set (the affine set R needs none), exactly as the reference.
    probs [..., n, e] -> CappedLPSolution (A [..., e, n], residual histories [..., sweeps]).
    Stopping rule (the reference's): after every CONVERGENCE_CHECK_EVERY-th sweep, a group
    stops once its residuals and the largest change over that sweep of A and of both Dykstra
    corrections are <= tol (A alone can stand still while the corrections move, far from the
    optimum); n_iter = the sweeps it ran (a multiple of the period, or max_iter). Its values
    then stay frozen, so every group runs exactly the sweeps it would run alone (and
    one group's convergence never depends on another group: causality for group="position").
    Routing only: not differentiable. Float64 for float64 probs, else float32."""
    b = max_experts_per_token
    if validate:
        _check_cap(probs, k, b)
        _check_solver_settings(entropy_weight, max_iter, tol)
    *lead, n, e = probs.shape
    log_k, log_b = math.log(k), math.log(b)
    with torch.no_grad(), torch.autocast(device_type=probs.device.type, enabled=False):
        S_T = probs.detach().to(_router_dtype(probs.dtype)).reshape(-1, n, e).transpose(1, 2)
        log_A = S_T / entropy_weight  # log K [G, e, n]
        G = log_A.shape[0]
        A = None
        corr_col, corr_box = torch.zeros_like(log_A), torch.zeros_like(log_A)
        active = torch.ones(G, 1, 1, dtype=torch.bool, device=probs.device)
        n_iter = torch.zeros(G, dtype=torch.long, device=probs.device)
        history = []
        for sweep in range(1, max_iter + 1):
            corr_col_before, corr_box_before = corr_col, corr_box
            # C: scale each token's column by min(1, b / colsum)
            y = log_A + corr_col
            new_log_A = y - (torch.logsumexp(y, dim=1, keepdim=True) - log_b).clamp(min=0)
            new_corr_col = y - new_log_A
            # B: entries min(A, 1)
            y = new_log_A + corr_box
            new_log_A = y.clamp(max=0)
            new_corr_box = y - new_log_A
            # R: scale each expert's row to sum k
            new_log_A = new_log_A - (torch.logsumexp(new_log_A, dim=2, keepdim=True) - log_k)
            # converged groups keep their values
            log_A = torch.where(active, new_log_A, log_A)
            corr_col = torch.where(active, new_corr_col, corr_col)
            corr_box = torch.where(active, new_corr_box, corr_box)
            A_before, A = A, log_A.exp()
            residual = torch.stack([
                (A.sum(2) - k).abs().amax(1),
                (A.sum(1) - b).clamp(min=0).amax(1),
                (A - 1).clamp(min=0).flatten(1).amax(1)], dim=1)  # [G, 3]
            history.append(residual)
            n_iter += active.view(G).long()
            if sweep % CONVERGENCE_CHECK_EVERY == 0:  # the same sweeps as the reference
                # feasible is not enough, nor is a still A: the corrections must be still too
                change = torch.stack([
                    (A - A_before).abs().flatten(1).amax(1),
                    (corr_col - corr_col_before).abs().flatten(1).amax(1),
                    (corr_box - corr_box_before).abs().flatten(1).amax(1)], dim=1)  # [G, 3]
                done = torch.cat([residual, change], dim=1).amax(1) <= tol  # [G]
                active = active & ~done.view(G, 1, 1)
                if not bool(active.any()):  # the one host sync, every CONVERGENCE_CHECK_EVERY sweeps
                    break
        residuals = torch.stack(history, dim=-1).reshape(*lead, 3, len(history))  # [..., 3, sweeps]
        return CappedLPSolution(A.reshape(*lead, e, n), n_iter.reshape(lead),
                                residuals[..., 0, :], residuals[..., 1, :], residuals[..., 2, :])


def _greedy_b_matching(A, S_T, k, b):
    """Greedy b-matching on pairs ordered by (A desc, prob desc, expert asc, token asc),
    computed as expert-proposing deferred acceptance: same result, vectorised over groups,
    looping over proposal rounds only. A, S_T [G, e, n] -> held [G, e, n] bool, rank [G, e, n]."""
    G, e, n = A.shape
    # global order of the e*n pairs; flat index i*n + j already orders (expert, token) ties
    order = torch.sort(S_T.reshape(G, e * n), dim=1, descending=True, stable=True).indices
    A_sorted = torch.gather(A.reshape(G, e * n), 1, order)
    order = torch.gather(order, 1, torch.sort(A_sorted, dim=1, descending=True, stable=True).indices)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(e * n, device=A.device).expand(G, -1))
    rank = rank.reshape(G, e, n)  # 0 = best pair
    unranked = e * n  # larger than every rank
    preference = rank.argsort(dim=2)  # [G, e, n] each expert's tokens, best first
    list_position = torch.arange(n, device=A.device)
    held = torch.zeros(G, e, n, dtype=torch.bool, device=A.device)
    n_proposed = torch.zeros(G, e, 1, dtype=torch.long, device=A.device)
    while True:
        need = torch.minimum(k - held.sum(2, keepdim=True), n - n_proposed)  # [G, e, 1]
        if not bool((need > 0).any()):
            break
        # each expert proposes to the next `need` tokens on its list
        window = (list_position >= n_proposed) & (list_position < n_proposed + need)  # [G, e, n]
        proposal = torch.zeros_like(held).scatter_(2, preference, window)
        n_proposed = n_proposed + need
        # each token keeps its best b offers (by rank) and rejects the rest
        offer_rank = torch.where(held | proposal, rank, unranked)
        bth_best = offer_rank.sort(dim=1).values[:, min(b, e) - 1:min(b, e), :]  # [G, 1, n]
        held = (held | proposal) & (offer_rank <= bth_best)
    return held, rank


def capped_expert_choice(probs, k, max_experts_per_token, entropy_weight=DEFAULT_ENTROPY_WEIGHT,
                         max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL, validate=True):
    """EC-CAP: expert choice where no token gets more than b = max_experts_per_token experts.

    probs [..., n, e] -> gates [..., e, k] (raw probs), token_index [..., e, k] (-1 = empty).
    Solves the LP (solve_capped_lp), then rounds it greedily: pairs in order of decreasing A
    (ties: higher prob, lower expert, lower token) are accepted while the expert holds < k
    and the token < b. Slot order = acceptance order. ValueError if b*n < k*e (infeasible).
    The cap holds exactly; k is an upper bound: at c = b greedy rounding can leave a few
    slots empty (-1) although a full assignment exists (see the reference's docstring)."""
    b = max_experts_per_token
    *lead, n, e = probs.shape
    if validate:
        _check_cap(probs, k, b)
        _check_solver_settings(entropy_weight, max_iter, tol)
    else:  # the layer skips validation, but tiny groups can still make the cap infeasible
        _check_feasible(n, e, k, b)
    A = solve_capped_lp(probs, k, b, entropy_weight, max_iter, tol, validate=False).assignment
    S_T = probs.transpose(-1, -2)  # [..., e, n]
    held, rank = _greedy_b_matching(A.detach().reshape(-1, e, n), S_T.detach().reshape(-1, e, n), k, b)
    slot_rank, slot_token = torch.where(held, rank, e * n).sort(dim=2)  # held tokens first, in rank order
    filled = slot_rank[..., :k] < e * n  # [G, e, k]
    token_index = torch.where(filled, slot_token[..., :k], -1).reshape(*lead, e, k)
    gates = torch.gather(S_T, -1, token_index.clamp(min=0)) * filled.reshape(*lead, e, k)
    return gates, token_index


# ----------------------------------------------------------------------------- experts
def moe_ffn(x, gates, token_index, w_in, w_out, validate=True):
    """(Eq. 3-4) Dispatch tokens to experts, run the expert FFNs, combine with gates.

    x [..., n, d], gates/token_index [..., e, s], w_in [e, d, f], w_out [e, f, d] -> y [..., n, d].
    y[t] = sum over slots (i, j) with token_index[i, j] == t of
           gates[i, j] * GeLU_tanh(x[t] @ w_in[i]) @ w_out[i].   Slots with index -1 add nothing."""
    if validate:
        _check_tensor(x, "x", 2)
        _check_tensor(gates, "gates", 2)
        _check_tensor(token_index, "token_index", 2, floating=False)
        _check_tensor(w_in, "w_in", 3)
        _check_tensor(w_out, "w_out", 3)
        if token_index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token_index must be int32 or int64; got {token_index.dtype}")
        if gates.shape != token_index.shape or gates.shape[:-2] != x.shape[:-2]:
            raise ValueError(f"gates and token_index must both have shape [..., e, s] with the "
                             f"leading dims of x {tuple(x.shape[:-2])}; got {tuple(gates.shape)} "
                             f"and {tuple(token_index.shape)}")
        e, d, f = w_in.shape if w_in.dim() == 3 else (None, None, None)
        if d != x.shape[-1] or e != gates.shape[-2] or w_out.shape != (e, f, d):
            raise ValueError(f"w_in must be [e={gates.shape[-2]}, d={x.shape[-1]}, f] and w_out "
                             f"[e, f, d]; got {tuple(w_in.shape)} and {tuple(w_out.shape)}")
        if bool((token_index < -1).any()) or bool((token_index >= x.shape[-2]).any()):
            raise ValueError(f"token_index must lie in [-1, {x.shape[-2]}) (-1 = empty slot)")
    X_in, flat_index, gate_per_slot = dispatch(x, gates, token_index)  # [e, G*s, d]
    X_e = expert_ffn(X_in, w_in, w_out)  # [e, G*s, d]
    return combine(x, X_e, flat_index, gate_per_slot)  # [..., n, d]


def dispatch(x, gates, token_index):
    """(Eq. 3) X_in = P X as a gather, all groups' slots of one expert side by side.

    x [..., n, d], gates/token_index [..., e, s] -> X_in [e, G*s, d], flat_index [e, G*s]
    (row of x.reshape(-1, d) each slot reads), gate_per_slot [e, G*s, 1] (0 for empty slots);
    G = number of groups (the product of the leading dims). The pieces of moe_ffn:
    dispatch -> expert_ffn -> combine, split so the expert-parallel path can exchange X_in."""
    *lead, n, d = x.shape
    e, s = gates.shape[-2:]
    x_flat = x.reshape(-1, d)  # [G*n, d]
    G = x_flat.shape[0] // n
    # empty slots (-1) read token 0 of their group and get gate 0, so they add exactly 0
    filled = token_index >= 0
    gates = torch.where(filled, gates, torch.zeros((), dtype=gates.dtype, device=gates.device))
    group_offset = torch.arange(G, device=x.device).view(1, G, 1) * n
    flat_index = (token_index.clamp(min=0).reshape(G, e, s).transpose(0, 1) + group_offset).reshape(e, G * s)
    # (Eq. 3) X_in = P X as a gather: [e, G*s, d]; all groups' slots of one expert side by side
    X_in = torch.index_select(x_flat, 0, flat_index.reshape(-1)).view(e, G * s, d)
    gate_per_slot = gates.reshape(G, e, s).transpose(0, 1).reshape(e, G * s, 1).to(x.dtype)
    return X_in, flat_index, gate_per_slot


def expert_ffn(X_in, w_in, w_out):
    """X_e[i] = GeLU_tanh(X_in[i] W1[i]) W2[i]: every expert's FFN as two batched matmuls.

    X_in [e, m, d], w_in [e, d, f], w_out [e, f, d] -> X_e [e, m, d] (autocast dtype if on)."""
    return torch.bmm(F.gelu(torch.bmm(X_in, w_in), approximate="tanh"), w_out)


def combine(x, X_e, flat_index, gate_per_slot):
    """(Eq. 4) X_out[l] = sum_ij P[i,j,l] G[i,j] X_e[i,j], as a scatter-add in x's dtype.

    x [..., n, d] (shape and dtype only), X_e [e, G*s, d], flat_index [e, G*s],
    gate_per_slot [e, G*s, 1] (from dispatch) -> y [..., n, d]."""
    *lead, n, d = x.shape
    e, m = flat_index.shape
    weighted = X_e.to(x.dtype) * gate_per_slot  # [e, G*s, d]
    # index_add_ with duplicate indices (a token picked by several experts) uses atomicAdd on
    # CUDA, so the summation order, and the last bits of y, can vary between runs; the same
    # holds for the gradient of x (index_select's backward is an index_add_). CPU is
    # deterministic. For bitwise-reproducible GPU runs call torch.use_deterministic_algorithms(True):
    # PyTorch then switches index_add_ to a deterministic kernel. GPU tests use tolerances.
    y = torch.zeros_like(x.reshape(-1, d)).index_add_(0, flat_index.reshape(-1), weighted.reshape(e * m, d))
    return y.view(*lead, n, d)


# ----------------------------------------------------------------------------- losses
def load_balancing_loss(probs, validate=True):
    """Switch balance loss e * sum_i f_i P_i per group. probs [..., n, e] -> [...].

    f_i: fraction of tokens whose first choice (argmax, ties lower index) is i; P_i: mean
    prob of expert i. Equals 1.0 when balanced. Differentiable through P_i."""
    if validate:
        _check_probs(probs)
    e = probs.shape[-1]
    f = F.one_hot(probs.argmax(-1), e).to(probs.dtype).mean(-2)  # [..., e]
    P = probs.mean(-2)  # [..., e]
    return e * (f * P).sum(-1)


def router_z_loss(logits, validate=True):
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. logits [..., n, e] -> [...]."""
    if validate:
        _check_tensor(logits, "logits", 2)
    return (torch.logsumexp(logits, dim=-1) ** 2).mean(-1)


# ----------------------------------------------------------------------------- layer
class RoutingStats(NamedTuple):
    experts_per_token: torch.Tensor  # [5] fraction of tokens with 0, 1, 2, 3-4, >4 experts (Fig. 3)
    unrouted_fraction: torch.Tensor  # tokens that no expert processed
    dropped_fraction: torch.Tensor  # token choice: assignments dropped by capacity (EC: 0)
    load_max_over_mean: torch.Tensor  # max over experts of demand / mean demand (EC: 1)
    overflow_fraction: torch.Tensor  # token choice: experts whose demand exceeds capacity (EC: 0)
    expert_load: torch.Tensor  # [e] tokens each expert processed / tokens per group (EC: k / n)


class MoEOutput(NamedTuple):
    y: torch.Tensor  # [B, T, d]
    aux_loss: torch.Tensor  # Switch balance loss, unweighted (0 for EC routers)
    z_loss: torch.Tensor  # router z-loss, unweighted
    stats: RoutingStats


class MoE(nn.Module):
    """Mixture-of-Experts FFN layer with expert-choice (or token-choice) routing.

    Arguments:
    - d_model: model width d (input and output size).
    - d_ff: hidden width f of each expert (a tanh-GELU FFN without biases).
    - n_experts: number of experts e.
    - router: "expert_choice" (paper Sec. 3.2), "capped_expert_choice" (EC-CAP, Sec. 3.3),
      "top1" (Switch), "top2" (GShard's gates renormalised, every second choice claims a slot),
      "top2_dropless" (top-2 with no capacity limit: nothing is ever dropped, as OLMoE, Mixtral
      and MegaBlocks train) or "top2_gshard" (GShard / Mesh-TensorFlow's default: the second
      expert is used only with probability min(1, g2 / second_threshold), see below).
    - capacity_factor: c; every group of n tokens gets k = expert_capacity(n, e, c) slots per
      expert (ceil(n c / e) clipped to [1, n]); token choice uses the same k as its capacity.
      "top2_dropless" ignores it (accepted, so one config serves every router): its slots per
      expert are the largest demand of any expert in the batch.
    - group: which tokens compete in one routing group: "batch" (all B*T, position-major
      order t*B + b), "sequence" (each row), "position" (tokens sharing a position; causal).
      A group of 1 token (group "position", batch size 1) gets k = 1: every expert takes it.
    - max_experts_per_token: b, the cap for "capped_expert_choice" (needs c <= b).
    - entropy_weight, max_iter, tol: the capped LP solver's lambda, iteration limit, tolerance.
    - check_inputs: value checks on x and the router probabilities (x finite, probs not NaN).
      They need the values on the host, i.e. a host-device sync per forward on a GPU, so by
      default (None) they run only when x is on the CPU and the forward is not being compiled
      by torch.compile; True runs them everywhere (also on CUDA: a sync per forward; under
      torch.compile a graph break), False never. Shape and dtype checks always run (free).
    - second_threshold: "top2_gshard" only (default 0.2, Mesh-TF's moe_second_threshold_train):
      token t dispatches to its second expert only if u[t] < g2[t] / second_threshold, with
      u[t] ~ U[0, 1) drawn by torch.rand from torch's GLOBAL generator on x's device, one draw
      per token per forward, always in float32 (so float32 and float64 layers make the same
      decisions from one seed). Reproduce or pin a run with torch.manual_seed (or
      torch.random.fork_rng around the call); no other router consumes random numbers.
    - expert_parallel_group: a torch.distributed process group of W processes (W must divide
      n_experts), or None (default: every expert in this process, the plain layer). Rank r then
      holds experts [r e/W, (r+1) e/W) only: w_in [e/W, d, f], w_out [e/W, f, d] (the slice of
      the full init drawn from the same seed); w_router stays whole and replicated. Each rank
      routes its own tokens in its own groups, exactly as without the group; two all-to-alls
      carry the expert slots to their experts and back (moe_ffn_expert_parallel). Every rank
      of the group must call forward (and backward) together, with the same x shape.
    - eval_routing: "group" (default) routes in eval mode exactly as in training. "threshold"
      ("expert_choice" only) routes in eval mode token by token: token t goes to expert i iff
      its probability S[t, i] >= threshold[i] (threshold_choice), so the output is causal and
      the same at every batch size, batch size 1 (sampling) included. Expert loads then vary
      around k (stats.expert_load, overflow_fraction). Capped expert choice is refused: its
      tokens come from an LP over the whole group, which no per-expert cutoff reproduces; token
      choice is refused: it already decides per token (and drops nothing at batch size 1).
    - threshold_decay: the thresholds' EMA decay (default 0.99, i.e. ~100 training steps).
    Buffers ("expert_choice" only, saved in state_dict): threshold [e], an EMA over training
    forwards of the score of each expert's k-th best token (the mean over the forward's groups,
    i.e. the per-group cutoff of Eq. 2: an estimate of the (1 - k/n) quantile of the expert's
    scores for the training group size n), and threshold_updates, the forwards it has seen (the
    first one sets the EMA). They move only in training mode, never in eval mode; the EMA lags
    the router by ~1 / (1 - threshold_decay) steps.
    Parameters: w_router [d, e] (std 0.02), w_in [e, d, f] (std 1/sqrt(d)),
    w_out [e, f, d] (std 1/sqrt(f)); the layouts match reference_numpy, so weights copy over.

    Sync-free forward: with check_inputs None or False, a CUDA forward for "expert_choice",
    "top1", "top2" and "top2_gshard" never waits for the device (static shapes throughout,
    routing stats stay tensors), and torch.compile(fullgraph=True) traces it without a graph
    break. Exceptions: "top2_dropless" (its slot count is the largest demand: one sync) and
    "capped_expert_choice" (the solver's early stop, one sync every CONVERGENCE_CHECK_EVERY
    sweeps, and the greedy rounding's proposal rounds).
    """

    def __init__(self, d_model, d_ff, n_experts, router="expert_choice", capacity_factor=2.0,
                 group="batch", max_experts_per_token=2, entropy_weight=DEFAULT_ENTROPY_WEIGHT,
                 max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL, second_threshold=0.2, check_inputs=None,
                 eval_routing="group", threshold_decay=0.99, expert_parallel_group=None):
        super().__init__()
        _check_int(d_model, "d_model", 1, math.inf)
        _check_int(d_ff, "d_ff", 1, math.inf)
        _check_int(n_experts, "n_experts", 1, math.inf)
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}; got {router!r}")
        if group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}; got {group!r}")
        expert_capacity(1, n_experts, capacity_factor)  # validates capacity_factor
        _check_int(max_experts_per_token, "max_experts_per_token", 1, math.inf)
        if TOKEN_CHOICE_TOP_K.get(router, 1) > n_experts:
            raise ValueError(f"n_experts must be >= 2 for router={router!r}; got {n_experts}")
        _check_second_threshold(second_threshold)
        if check_inputs not in (None, True, False):
            raise ValueError(f"check_inputs must be None (auto: on CPU), True or False; got {check_inputs!r}")
        _check_solver_settings(entropy_weight, max_iter, tol)
        _check_eval_routing(eval_routing, router)
        if isinstance(threshold_decay, bool) or not isinstance(threshold_decay, numbers.Real) \
                or not 0 <= threshold_decay < 1:
            raise ValueError(f"threshold_decay must be a number in [0, 1); got {threshold_decay!r}")
        if router == "capped_expert_choice" and capacity_factor > max_experts_per_token:
            raise ValueError(f"capacity_factor must be <= max_experts_per_token={max_experts_per_token} "
                             f"for capped_expert_choice (else infeasible); got {capacity_factor}")
        self.d_model, self.d_ff, self.n_experts = d_model, d_ff, n_experts
        self.router, self.capacity_factor, self.group = router, capacity_factor, group
        self.max_experts_per_token = max_experts_per_token
        self.entropy_weight, self.max_iter, self.tol = entropy_weight, max_iter, tol
        self.second_threshold, self.check_inputs = second_threshold, check_inputs
        self.eval_routing, self.threshold_decay = eval_routing, threshold_decay
        self.w_router = nn.Parameter(torch.randn(d_model, n_experts) * 0.02)
        self.w_in = nn.Parameter(torch.randn(n_experts, d_model, d_ff) / math.sqrt(d_model))
        self.w_out = nn.Parameter(torch.randn(n_experts, d_ff, d_model) / math.sqrt(d_ff))
        # expert parallelism (section "Expert parallelism" below): None = all experts here
        self.expert_parallel_group, self.expert_parallel_rank, self.expert_parallel_size = None, 0, 1
        if expert_parallel_group is not None:  # keep only this rank's slice of the experts
            _shard_layer(self, expert_parallel_group)
        if router == "expert_choice":  # inference thresholds (see eval_routing)
            self.register_buffer("threshold", torch.zeros(n_experts))
            self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def extra_repr(self):
        """What print(moe) shows after the class name: sizes, router and its settings."""
        parts = [f"d_model={self.d_model}", f"d_ff={self.d_ff}", f"n_experts={self.n_experts}",
                 f"router={self.router!r}",
                 "capacity_factor=ignored (dropless)" if self.router == "top2_dropless"
                 else f"capacity_factor={self.capacity_factor}", f"group={self.group!r}"]
        if self.router == "capped_expert_choice":
            parts += [f"max_experts_per_token={self.max_experts_per_token}",
                      f"entropy_weight={self.entropy_weight}", f"max_iter={self.max_iter}", f"tol={self.tol}"]
        if self.router == "top2_gshard":
            parts.append(f"second_threshold={self.second_threshold}")
        if self.check_inputs is not None:
            parts.append(f"check_inputs={self.check_inputs}")
        if self.expert_parallel_group is not None:
            parts.append(f"expert_parallel=rank {self.expert_parallel_rank} of {self.expert_parallel_size}")
        if self.eval_routing != "group":
            parts.append(f"eval_routing={self.eval_routing!r}")
        return ", ".join(parts)

    def group_tokens(self, x):
        """x [B, T, d] -> [groups, n, d] in the documented token order."""
        B, T, d = x.shape
        if self.group == "batch":
            return x.transpose(0, 1).reshape(1, T * B, d)  # [1, T*B, d], token t*B + b
        if self.group == "sequence":
            return x  # [B, T, d]
        return x.transpose(0, 1)  # [T, B, d]

    def ungroup_tokens(self, y, B, T):
        """Inverse of group_tokens: [groups, n, d] -> [B, T, d]."""
        if self.group == "batch":
            return y.view(T, B, -1).transpose(0, 1)  # [B, T, d]
        if self.group == "sequence":
            return y
        return y.transpose(0, 1)  # [B, T, d]

    def route(self, probs, second_uniform=None):
        """probs [groups, n, e] -> gates, token_index [groups, e, k] with this layer's router.

        second_uniform [groups, n]: "top2_gshard"'s draws (None: drawn here with torch.rand)."""
        n, e = probs.shape[-2:]
        k = expert_capacity(n, e, self.capacity_factor)
        if self.router == "expert_choice":
            return expert_choice(probs, k, validate=False)
        if self.router == "capped_expert_choice":
            b = self.max_experts_per_token
            if b * n < k * e:  # name the routing group and what would fix it
                c_max = (b * n // e) * e / n  # largest c with ceil(n*c/e)*e <= n*b (0: none)
                raise ValueError(
                    f"capped_expert_choice is infeasible in routing groups of n={n} tokens "
                    f"(group={self.group!r}): k = ceil(n*c/e) = {k} slots for each of the {e} "
                    f"experts need k*e = {k * e} > n*b = {n * b}. Use a larger routing group "
                    f"(group='batch' or more sequences per batch), max_experts_per_token >= "
                    f"{math.ceil(k * e / n)}" + (f", or capacity_factor <= {c_max:g}" if c_max
                                                  else ""))
            return capped_expert_choice(probs, k, b, self.entropy_weight,
                                        self.max_iter, self.tol, validate=False)
        if self.router == "top2_dropless":
            # Slots per expert = the largest demand of any expert, so nothing is dropped. This
            # is a data-dependent shape, i.e. ONE host-device sync per forward: the deliberate
            # exception to sync-free routing. The static alternative, capacity = n, runs every
            # expert FFN over n slots (e/2 times the real work): at n=2048, e=16, d=256, f=1024
            # on CPU routing + experts took ~0.6 s that way against ~0.1-0.2 s with the largest
            # demand (322 slots), so we pay the sync.
            choice = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[..., :2]
            demand = F.one_hot(choice, e).sum((-3, -2))  # [groups, e] claims on each expert
            capacity = max(int(demand.max()), 1)
            return token_choice(probs, 2, capacity, validate=False)
        if self.router == "top2_gshard":
            if second_uniform is None:
                second_uniform = torch.rand(probs.shape[:-1], device=probs.device)
            return token_choice(probs, 2, k, second_uniform, self.second_threshold, validate=False)
        return token_choice(probs, TOKEN_CHOICE_TOP_K[self.router], k, validate=False)

    @torch.no_grad()
    def update_threshold(self, gates):
        """EMA of each expert's k-th best score: gates [groups, e, k] of expert_choice (slots
        best first, so gates[..., -1] is the k-th best), averaged over the groups. Sync-free."""
        kth_best = gates.detach()[..., -1].mean(0).to(self.threshold.dtype)  # [e]
        if self.expert_parallel_group is not None:  # the mean over every rank's groups, so the
            # thresholds stay the same on every rank (one all-reduce of e values, no host sync)
            dist.all_reduce(kth_best, group=self.expert_parallel_group)
            kth_best /= self.expert_parallel_size
        ema = self.threshold_decay * self.threshold + (1 - self.threshold_decay) * kth_best
        self.threshold.copy_(torch.where(self.threshold_updates == 0, kth_best, ema))
        self.threshold_updates.add_(1)

    def value_checks_on(self, x):
        """Whether this forward checks values (see check_inputs): auto = CPU and not compiling."""
        if self.check_inputs is not None:
            return self.check_inputs
        return x.device.type == "cpu" and not torch.compiler.is_compiling()

    def forward(self, x):
        """x [B, T, d] -> MoEOutput(y [B, T, d], aux_loss, z_loss, stats).

        Axes: B batch, T positions, d model width, n tokens per group, e experts, k slots."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a 3-D tensor [B, T, d_model]; got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dim d_model={self.d_model}; got {x.shape[-1]}")
        check_values = self.value_checks_on(x)
        _check_tensor(x, "x", 3, check_values=check_values)  # floating, non-empty (, finite)
        _check_eval_routing(self.eval_routing, self.router)  # the attribute may have been set
        by_threshold = not self.training and self.eval_routing == "threshold"
        if by_threshold and check_values and int(self.threshold_updates) == 0:
            raise ValueError("eval_routing='threshold' needs thresholds learned in training; this "
                             "layer has never run a training-mode forward (threshold_updates == 0)")
        B, T, d = x.shape
        x_groups = self.group_tokens(x)  # [groups, n, d]
        logits = router_logits(x_groups, self.w_router, validate=False)  # [groups, n, e], fp32
        with torch.autocast(device_type=x.device.type, enabled=False):
            # S = Softmax(X W_g), float32 even under autocast
            probs = torch.softmax(logits, dim=-1)
            if check_values and bool(torch.isnan(probs).any()):
                raise ValueError("router probabilities are NaN (check w_router for NaN/inf)")
            # top2_gshard: one U[0, 1) draw per token from torch's global generator
            second_uniform = None
            if self.router == "top2_gshard":
                second_uniform = torch.rand(probs.shape[:-1], device=probs.device)
            if by_threshold:  # inference: a per-token rule, [groups, e, s] with s varying
                gates, token_index = threshold_choice(probs, self.threshold, validate=False)
            else:
                # (Eq. 1-2) k = expert_capacity(n, e, c); G, I = TopK(S^T, k) (or capped / token choice)
                gates, token_index = self.route(probs, second_uniform)  # [groups, e, k]
                if self.training and self.router == "expert_choice":
                    self.update_threshold(gates)
        # (Eq. 3-4) gather, expert FFNs, gate-weighted scatter-add; one path for every router
        if self.expert_parallel_group is None:
            y = moe_ffn(x_groups, gates, token_index, self.w_in, self.w_out, validate=False)
        else:  # this rank holds experts [r*e/W, (r+1)*e/W): see "Expert parallelism" below
            y = moe_ffn_expert_parallel(x_groups, gates, token_index, self.w_in, self.w_out,
                                        self.expert_parallel_group,
                                        pad_slots=self.router == "top2_dropless" or by_threshold,
                                        check_shapes=check_values)
        if self.router in TOKEN_CHOICE_TOP_K:
            aux_loss = load_balancing_loss(probs, validate=False).mean()
        else:
            aux_loss = probs.new_zeros(())
        z_loss = router_z_loss(logits, validate=False).mean()
        stats = self.routing_stats(probs.detach(), token_index, second_uniform, by_threshold)
        return MoEOutput(self.ungroup_tokens(y, B, T), aux_loss, z_loss, stats)

    @torch.no_grad()
    def routing_stats(self, probs, token_index, second_uniform=None, by_threshold=False):
        """RoutingStats from probs [groups, n, e] and token_index [groups, e, k] (all tensors, no sync).

        by_threshold (threshold routing): load = max over experts of tokens taken / mean tokens
        taken; overflow = experts taking more than the training bucket k = expert_capacity(n, e, c).

        Token choice: demand = claims made on each expert (for "top2_gshard" the second choices
        its random policy skipped, given second_uniform [groups, n], are not claims); dropped =
        claims made but not accepted, as a fraction of claims made."""
        G, n, e = probs.shape
        k = token_index.shape[-1]
        filled = token_index >= 0  # [G, e, k]
        flat = token_index.clamp(min=0) + torch.arange(G, device=probs.device).view(G, 1, 1) * n
        # experts per token [G*n]: a scatter-add of the filled slots (static shape, no sync)
        per_token = torch.zeros(G * n, dtype=torch.long, device=probs.device).scatter_add_(
            0, flat.reshape(-1), filled.reshape(-1).long())
        bins = torch.stack([per_token == 0, per_token == 1, per_token == 2,
                            (per_token >= 3) & (per_token <= 4), per_token > 4]).float().mean(1)
        zero, one = probs.new_zeros(()).float(), probs.new_ones(()).float()
        taken = filled.sum(-1).float()  # [G, e] tokens each expert processed
        expert_load = taken.mean(0) / n  # [e]
        if by_threshold:
            load = (taken.amax(1) / taken.mean(1).clamp(min=1e-9)).mean()
            overflow = (taken > expert_capacity(n, e, self.capacity_factor)).float().mean()
            return RoutingStats(bins, bins[0], zero, load, overflow, expert_load)
        if self.router not in TOKEN_CHOICE_TOP_K:
            return RoutingStats(bins, bins[0], zero, one, zero, expert_load)
        top_k = TOKEN_CHOICE_TOP_K[self.router]
        choice = torch.sort(probs, dim=-1, descending=True, stable=True).indices[..., :top_k]
        claims = F.one_hot(choice, e)  # [G, n, top_k, e]
        if second_uniform is not None:  # as in token_choice: renormalised g2 against the draw
            choice_prob = torch.gather(probs, -1, choice)
            total = choice_prob.sum(-1, keepdim=True)
            choice_prob = choice_prob / torch.where(total > 0, total, torch.ones_like(total))
            made = torch.stack([torch.ones_like(second_uniform, dtype=torch.bool),
                                second_uniform < choice_prob[..., 1] / self.second_threshold], dim=-1)
            claims = claims * made.unsqueeze(-1)
        demand = claims.sum((1, 2)).float()  # [G, e] claims made on each expert
        dropped = 1 - filled.sum().float() / demand.sum()
        load = (demand.amax(1) / demand.mean(1)).mean()  # averaged over groups
        overflow = (demand > k).float().mean()
        return RoutingStats(bins, bins[0], dropped, load, overflow, expert_load)


# ----------------------------------------------------------------------------- expert parallelism
# Experts sharded over W processes (the paper's setting: experts spread over many devices).
# Extra axis letters: W processes in the group, r this process's rank, E = e/W experts per rank,
# m = G*s slots per expert on one rank (G routing groups of this rank, s slots each).
#
#   rank r, own tokens x [G, n, d]             route locally (same groups as one process)
#   dispatch -> X_in [e, m, d]                 rows = experts, i.e. grouped by destination rank:
#            = [W, E, m, d]                    block q holds the slots of rank q's experts
#   all_to_all ->     [W, E, m, d]             block q now holds source rank q's slots
#   -> [E, W*m, d] -> expert_ffn -> [E, W*m, d]    one batched matmul over this rank's experts
#   -> [W, E, m, d] -> all_to_all -> [e, m, d] each source gets its slots back, in its order
#   combine -> y [G, n, d]                     gate-weighted scatter-add, as moe_ffn
#
# Expert choice needs no count exchange and no padding: every expert takes exactly k slots per
# group, so every block has the same, known shape and the all-to-all has equal splits. Token
# choice with a capacity ("top1", "top2", "top2_gshard") has static slots too (empty ones carry
# gate 0). "top2_dropless" sizes its slots by the largest demand, which differs between ranks:
# the ranks agree on the largest with one all-reduce (MAX) per forward and pad with empty slots.
# Volume: each all-to-all sends e*m*d elements per rank, (W-1)/W of them to other ranks; e*m =
# G*e*s = n_rank*c slots for EC (all tokens of the rank times c), whatever e and k are apart.

def expert_slice(n_experts, rank, world_size):
    """The experts rank `rank` of `world_size` holds: slice(rank*e/W, (rank+1)*e/W)."""
    _check_int(world_size, "world_size", 1, math.inf)
    _check_int(rank, "rank", 0, world_size - 1)
    if n_experts % world_size:
        raise ValueError(f"the expert-parallel world size {world_size} must divide "
                         f"n_experts={n_experts}")
    per_rank = n_experts // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0; its gradient is the same exchange in reverse."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)  # block q of x -> rank q; block q of out <- rank q
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # out[q] came from rank q's x[r], so grad x[q] is rank q's grad_out[r]: the same exchange
        return _AllToAll.apply(grad_out, ctx.group), None


def all_to_all(x, group):
    """Differentiable equal-split all-to-all: x [W, ...] -> [W, ...]; block q goes to rank q,
    block q of the result came from rank q. Every rank of the group must call it together."""
    W = dist.get_world_size(group)
    if x.shape[0] != W:
        raise ValueError(f"all_to_all: x must have leading dim W={W}; got {tuple(x.shape)}")
    return _AllToAll.apply(x, group)


def _agree_on_slots(G, s, group, pad_slots, device):
    """One all-reduce (MAX) of (G, -G, s, -s) over the group -> the largest s; ValueError (on
    every rank alike) unless all ranks have the same G and, without pad_slots, the same s."""
    t = torch.tensor([G, -G, s, -s], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    G_max, G_min, s_max, s_min = t[0].item(), -t[1].item(), t[2].item(), -t[3].item()  # host sync
    if G_max != G_min or (not pad_slots and s_max != s_min):
        raise ValueError(
            f"expert parallelism needs the same routing shape on every rank: groups G in "
            f"[{G_min}, {G_max}] and slots per expert s in [{s_min}, {s_max}] across ranks "
            f"(give every rank an x of the same shape [B, T, d])")
    return s_max


def moe_ffn_expert_parallel(x, gates, token_index, w_in, w_out, group, pad_slots=False,
                            check_shapes=False):
    """moe_ffn with the experts sharded over the W processes of `group` (see the diagram above).

    x [..., n, d] this rank's tokens, gates/token_index [..., e, s] its routing (all e experts),
    w_in [e/W, d, f], w_out [e/W, f, d] this rank's experts -> y [..., n, d], equal to
    moe_ffn(x, gates, token_index, full w_in, full w_out). Differentiable: the gradients of x
    and gates are this rank's; those of w_in/w_out sum the contributions of every rank's tokens.
    pad_slots: ranks may have different s (top2_dropless): agree on the largest by one all-reduce
    and pad with empty slots. check_shapes: the same all-reduce, to raise a clear ValueError
    when the ranks' routing shapes differ (otherwise the exchange fails or hangs)."""
    W = dist.get_world_size(group)
    E = w_in.shape[0]  # experts on this rank, e / W
    *lead, n, d = x.shape
    e, s = gates.shape[-2:]
    if E * W != e or w_out.shape[0] != E:
        raise ValueError(f"w_in and w_out must hold e/W = {e}/{W} experts; got "
                         f"{tuple(w_in.shape)} and {tuple(w_out.shape)}")
    G = math.prod(lead)
    if pad_slots or check_shapes:
        s_max = _agree_on_slots(G, s, group, pad_slots, x.device)
        if s_max > s:  # empty slots: token -1, gate 0 (they add nothing)
            gates = F.pad(gates, (0, s_max - s))
            token_index = F.pad(token_index, (0, s_max - s), value=-1)
            s = s_max
    m = G * s  # slots per expert on this rank
    X_in, flat_index, gate_per_slot = dispatch(x, gates, token_index)  # [e, m, d]
    # rows r*E .. (r+1)*E-1 are rank r's experts: X_in is already grouped by destination
    X_recv = all_to_all(X_in.view(W, E, m, d), group)  # [W, E, m, d], block q from rank q
    X_local = X_recv.transpose(0, 1).reshape(E, W * m, d)  # this rank's experts, every source
    X_e = expert_ffn(X_local, w_in, w_out)  # [E, W*m, d]: one batched matmul
    X_back = X_e.view(E, W, m, d).transpose(0, 1)  # [W, E, m, d], block q back to rank q
    X_e = all_to_all(X_back, group).view(e, m, d)  # this rank's slots of all e experts
    return combine(x, X_e, flat_index, gate_per_slot)  # (Eq. 4) [..., n, d]


def _shard_layer(layer, group):
    """Keep only this rank's experts of `layer` (a MoE holding all of them) and remember group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("expert_parallel_group needs torch.distributed to be initialised "
                         "(torch.distributed.init_process_group) first")
    if layer.expert_parallel_group is not None:
        raise ValueError("this MoE layer is already sharded over an expert_parallel_group")
    W, r = dist.get_world_size(group), dist.get_rank(group)
    if r < 0:
        raise ValueError("expert_parallel_group: this process is not a member of the group")
    if layer.n_experts % W:
        raise ValueError(f"expert_parallel_group has {W} processes, which must divide "
                         f"n_experts={layer.n_experts}")
    part = expert_slice(layer.n_experts, r, W)
    with torch.no_grad():
        layer.w_in = nn.Parameter(layer.w_in[part].clone())  # [e/W, d, f]
        layer.w_out = nn.Parameter(layer.w_out[part].clone())  # [e/W, f, d]
    layer.expert_parallel_group, layer.expert_parallel_rank, layer.expert_parallel_size = group, r, W


def shard_experts(module, group):
    """Shard every MoE layer in `module` (or `module` itself) over `group`, in place -> module.

    Each MoE keeps its experts [r e/W, (r+1) e/W); build the optimizer afterwards. To start
    from a full checkpoint: load it into the unsharded model, then shard."""
    layers = [m for m in module.modules() if isinstance(m, MoE)]
    for layer in layers:
        _shard_layer(layer, group)
    return module


def full_state_dict(module):
    """module.state_dict() with the experts of every sharded MoE gathered to their full shapes
    ([e, d, f], [e, f, d]), i.e. the state dict of the unsharded model. A collective
    (all_gather): every rank of each group must call it; every rank gets the full dict."""
    state = module.state_dict()
    for name, layer in module.named_modules():
        if isinstance(layer, MoE) and layer.expert_parallel_group is not None:
            for p in ("w_in", "w_out"):
                key = f"{name}.{p}" if name else p
                parts = [torch.empty_like(state[key]) for _ in range(layer.expert_parallel_size)]
                dist.all_gather(parts, state[key].contiguous(), group=layer.expert_parallel_group)
                state[key] = torch.cat(parts)
    return state


def load_full_state_dict(module, state):
    """Load the state dict of the unsharded model (e.g. full_state_dict's) into `module`, whose
    MoE layers may be sharded: each takes its own slice of the experts. No communication."""
    state = dict(state)
    for name, layer in module.named_modules():
        if isinstance(layer, MoE) and layer.expert_parallel_group is not None:
            part = expert_slice(layer.n_experts, layer.expert_parallel_rank, layer.expert_parallel_size)
            for p in ("w_in", "w_out"):
                key = f"{name}.{p}" if name else p
                state[key] = state[key][part]
    return module.load_state_dict(state)
