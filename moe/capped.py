"""EC-CAP (paper Sec. 3.3): expert choice where no token gets more than b experts.

    maximise <S^T, A> + lambda H(A)  s.t. rows of A sum to k, columns <= b, 0 <= A <= 1
solved by KL (Bregman) Dykstra in log space, batched over routing groups, then rounded by a
greedy b-matching so the cap holds exactly. `CappedMoE` is `ecmoe.MoE` with `route` overridden.
Same as reference_numpy's EC-CAP section (tests prove it); docs/decisions.md says why lambda,
the sweep count, the stopping rule and the rounding are what they are.
"""
import math
from typing import NamedTuple

import torch

from ecmoe import MoE, Routing, check_int, check_number, check_probs, expert_capacity

# solver defaults, the same as reference_numpy's (a test keeps them in sync)
DEFAULT_ENTROPY_WEIGHT = 1e-2  # lambda; the paper's 1e-3 does not converge in 100 sweeps
DEFAULT_MAX_ITER = 1000  # Dykstra sweeps at most
DEFAULT_TOL = 1e-5  # stop when constraints hold and A and the corrections stop moving
# the solver tests its stopping rule after every 10th sweep only: one host sync per 10 sweeps
# on a GPU; the reference uses the same period, so both run exactly the same sweeps
CONVERGENCE_CHECK_EVERY = 10


class CappedLPSolution(NamedTuple):
    assignment: torch.Tensor  # A [..., e, n]
    n_iter: torch.Tensor  # [...] sweeps each group ran
    # residual histories run to the slowest group's sweep count; a group that stopped early
    # repeats its last (frozen) values after its own n_iter
    row_residual: torch.Tensor  # [..., sweeps] max_i |sum_j A[i,j] - k|
    col_residual: torch.Tensor  # [..., sweeps] max_j max(sum_i A[i,j] - b, 0)
    entry_residual: torch.Tensor  # [..., sweeps] max_ij max(A[i,j] - 1, 0)


def _check_cap(probs, k, b):
    check_probs(probs)
    n, e = probs.shape[-2:]
    check_int(k, "k", 1, n)
    check_int(b, "max_experts_per_token", 1)
    _check_feasible(n, e, k, b)


def _check_solver_settings(entropy_weight, max_iter, tol):
    check_number(entropy_weight, "entropy_weight", 0)
    check_int(max_iter, "max_iter", 1)
    check_number(tol, "tol", 0, low_open=False)


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
        S_T = probs.detach().to(torch.float64 if probs.dtype == torch.float64 else torch.float32).reshape(-1, n, e).transpose(1, 2)
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


class CappedMoE(MoE):
    """ecmoe.MoE whose experts choose under a cap: no token gets more than
    max_experts_per_token = b experts (EC-CAP2: b = 2, EC-CAP3: b = 3). Needs c <= b.

    entropy_weight, max_iter, tol: the LP solver's lambda, sweep limit and tolerance. Other
    arguments as ecmoe.MoE. No thresholds: the tokens come from an LP over the whole group,
    which no per-expert cutoff reproduces, so there is no eval_routing="threshold".
    Each forward syncs with the host (the solver's stopping test, the rounding's rounds)."""

    def __init__(self, d_model, d_ff, n_experts, capacity_factor=2.0, max_experts_per_token=2,
                 group="position", entropy_weight=DEFAULT_ENTROPY_WEIGHT, max_iter=DEFAULT_MAX_ITER,
                 tol=DEFAULT_TOL, check_inputs=None):
        super().__init__(d_model, d_ff, n_experts, capacity_factor, group, "group", check_inputs=check_inputs)
        check_int(max_experts_per_token, "max_experts_per_token", 1)
        _check_solver_settings(entropy_weight, max_iter, tol)
        if capacity_factor > max_experts_per_token:
            raise ValueError(f"capacity_factor must be <= max_experts_per_token={max_experts_per_token} "
                             f"(else infeasible); got {capacity_factor}")
        self.max_experts_per_token = max_experts_per_token
        self.entropy_weight, self.max_iter, self.tol = entropy_weight, max_iter, tol
        self.threshold = self.threshold_updates = None  # no thresholds: not in the state_dict

    def extra_repr(self):
        return (super().extra_repr() + f", max_experts_per_token={self.max_experts_per_token}, entropy_weight={self.entropy_weight}, "
                f"max_iter={self.max_iter}, tol={self.tol}")

    def route(self, probs):
        """probs [G, n, e] -> Routing of capped_expert_choice; ValueError naming the routing group
        and the fixes when the cap is infeasible for it."""
        n, e = probs.shape[-2:]
        k = expert_capacity(n, e, self.capacity_factor)
        b = self.max_experts_per_token
        if b * n < k * e:
            c_max = (b * n // e) * e / n  # largest c with ceil(n*c/e)*e <= n*b (0: none)
            raise ValueError(
                f"capped expert choice is infeasible in routing groups of n={n} tokens "
                f"(group={self.group!r}): k = ceil(n*c/e) = {k} slots for each of the {e} "
                f"experts need k*e = {k * e} > n*b = {n * b}. Use a larger routing group "
                f"(group='batch' or more sequences per batch), max_experts_per_token >= "
                f"{math.ceil(k * e / n)}" + (f", or capacity_factor <= {c_max:g}" if c_max else ""))
        gates, token_index = capped_expert_choice(probs, k, b, self.entropy_weight, self.max_iter,
                                                  self.tol, validate=False)
        taken = (token_index >= 0).sum(-1).float()  # [G, e] k, or fewer where rounding left slots empty
        return Routing(gates, token_index, taken, probs.new_zeros(()), k)
