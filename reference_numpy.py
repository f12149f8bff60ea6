"""Expert Choice routing, the paper in NumPy: a readable reference for one routing group.

Zhou et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS 2022, arXiv:2202.09368.
Sec. 3.2 (expert choice, Eq. 1-4), Sec. 3.3 (the capped variant EC-CAP), and the token-choice
baselines it is compared with: Switch top-1 (Fedus et al. 2021) and GShard top-2 (Lepikhin et
al. 2020), and two routers since: Expert Threshold routing (arXiv 2603.11535) and top-2 with
auxiliary-loss-free balancing (arXiv 2408.15664). `ecmoe.py` (expert choice) and `moe/` (the
others) are the fast PyTorch versions; `tests/` prove they agree.

Every function takes ONE routing group as 2-D arrays and needs only the small helpers at the
top of this file, so it can be copied (EC-CAP: copy its whole section). Arrays may be NumPy or CuPy: the array module is taken from the input, so the same
code checks a GPU run (CuPy is imported only if a CuPy array is passed in).

Shape legend (the paper's symbols):
    n  tokens in the routing group         d  model width
    e  experts                             f  expert hidden width (the paper's d')
    k  bucket size = tokens per expert     c  capacity factor
    b  max experts per token (EC-CAP)      s  slots per expert (k, or capacity for token choice)

Decisions the paper leaves open (also in docs/decisions.md):
    * bucket size k = ceil(n*c/e), clipped to [1, n] (`expert_capacity`);
    * ties are broken towards the lower index everywhere (stable sorts);
    * slot order: expert choice fills slots by decreasing score, token choice in claim order;
    * EC-CAP is solved in log space with entropy weight 1e-2 and up to 1000 sweeps, then rounded
      greedily so the cap holds exactly and each expert takes at most k tokens
      (`capped_expert_choice`; at c = b a few slots can stay empty, see there).
      `python reference_numpy.py` prints the solver's residuals and optimality gap at these
      defaults.
"""
import math
from typing import NamedTuple

import numpy as np


# ----------------------------------------------------------------------------------------------
# Small helpers: array module, input checks, GELU.

def _array_module(*arrays):
    """NumPy, or CuPy if any input is a CuPy array (CuPy is never imported otherwise)."""
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            import cupy
            return cupy
    return np


def _check_matrix(name, a, rows=None, cols=None):
    if getattr(a, "ndim", None) != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {getattr(a, 'shape', None)}")
    for axis, want in ((0, rows), (1, cols)):
        if want is not None and a.shape[axis] != want:
            raise ValueError(f"{name} must have {want} along axis {axis}, got shape {a.shape}")


def _check_finite(name, a, xp):
    if not bool(xp.all(xp.isfinite(a))):
        raise ValueError(f"{name} must be finite (no NaN or inf)")


def _check_probs(probs, xp):
    _check_matrix("probs", probs)
    _check_finite("probs", probs, xp)
    if probs.shape[0] < 1 or probs.shape[1] < 1:
        raise ValueError(f"probs must have at least one token and one expert, got {probs.shape}")
    if bool(xp.any(probs < 0)) or bool(xp.any(probs > 1)):
        raise ValueError("probs must lie in [0, 1] (router probabilities)")


def _check_int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def gelu_tanh(u):
    """GELU, tanh approximation (as in T5/GLaM and torch's gelu(approximate='tanh'))."""
    xp = _array_module(u)
    return 0.5 * u * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u ** 3)))


# ----------------------------------------------------------------------------------------------
# Sec. 3.2: expert choice.

def router_probs(x, w_router):
    """Router scores S = Softmax(X . W_g), softmax over the experts of each token.

    x [n, d], w_router [d, e] -> probs [n, e]
    """
    xp = _array_module(x, w_router)
    _check_matrix("x", x)
    _check_matrix("w_router", w_router, rows=x.shape[1])
    _check_finite("x", x, xp)
    _check_finite("w_router", w_router, xp)
    logits = x @ w_router                                    # [n, e]
    # S = Softmax(X . W_g); subtracting the row max changes nothing but avoids overflow.
    z = xp.exp(logits - logits.max(axis=1, keepdims=True))
    S = z / z.sum(axis=1, keepdims=True)
    return S


def expert_capacity(n_tokens, n_experts, capacity_factor):
    """Bucket size k = n * c / e (Eq. 1), rounded UP, and clipped to [1, n].

    Rounding up keeps the total number of expert slots e*k >= n*c, so a run never gets less
    compute than its capacity factor promises. Clipping makes tiny groups work: k is never 0
    (the paper's formula gives 0 when n*c < e) and never more than the n tokens there are.
    How it maps to the peers:
      * flaxformer: round(c*n/e) with a minimum of 4 -> same k whenever n*c/e is an integer >= 4;
      * praxis: floor(n/e)*c -> same k whenever e divides n (and c is an integer).
    The same function sizes token-choice buffers: c counts slots per token in total, so top-2
    with c=2 has exactly the slots of EC-CF2 (DeepSpeed's ceil(cf*top_k*n/e) with cf = c/top_k).
    """
    _check_int("n_tokens", n_tokens, 1, math.inf)
    _check_int("n_experts", n_experts, 1, math.inf)
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float, np.floating, np.integer)) \
            or not math.isfinite(capacity_factor) or capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor!r}")
    # Eq. 1: k = n * c / e. round(., 9) first so 0.1*30 = 3.0000000000000004 does not round up.
    k = math.ceil(round(n_tokens * capacity_factor / n_experts, 9))
    return int(min(max(k, 1), n_tokens))


def expert_choice(probs, k):
    """Each expert takes its k highest-scoring tokens: G, I = TopK(S^T, k) (Eq. 2).

    probs [n, e], k in [1, n] -> gates G [e, k], token_index I [e, k] (int64)
    Slots are in order of decreasing score; equal scores go to the lower token index first.
    Gates are the raw router probabilities (no renormalisation).
    """
    xp = _array_module(probs)
    _check_probs(probs, xp)
    n, e = probs.shape
    _check_int("k", k, 1, n)
    S_T = probs.T                                            # [e, n]: one row per expert
    # Eq. 2: G, I = TopK(S^T, k). A stable sort of -S^T puts ties in token order.
    I = xp.argsort(-S_T, axis=1, kind="stable")[:, :k]       # [e, k]
    G = xp.take_along_axis(S_T, I, axis=1)                   # [e, k]
    return G, I.astype(xp.int64)


def threshold_choice(probs, threshold):
    """Expert choice at inference: a token goes to expert i iff S[t, i] >= threshold[i].

    probs [n, e], threshold [e] -> gates [e, s], token_index [e, s] (int64, -1 = empty slot),
    s = the largest number of tokens any expert takes (at least 1).
    A rule per token, so a token's experts do not depend on the other tokens in the group:
    causal, and the same at every batch size. threshold[i] estimates the score expert i's k-th
    best token needs in training (ecmoe.MoE keeps it as an EMA of that score); how many tokens
    an expert takes now varies. Slot order as expert_choice: decreasing score, ties lower index.
    """
    xp = _array_module(probs, threshold)
    _check_probs(probs, xp)
    n, e = probs.shape
    if getattr(threshold, "shape", None) != (e,):
        raise ValueError(f"threshold must have shape [e={e}], got {getattr(threshold, 'shape', None)}")
    _check_finite("threshold", threshold, xp)
    S_T = probs.T                                            # [e, n]
    chosen = S_T >= threshold[:, None]                       # [e, n] the rule, token by token
    s = max(int(chosen.sum(axis=1).max()), 1)
    I = xp.argsort(xp.where(chosen, -S_T, 2.0), axis=1, kind="stable")[:, :s]   # chosen first
    filled = xp.take_along_axis(chosen, I, axis=1)           # [e, s]
    G = xp.where(filled, xp.take_along_axis(S_T, I, axis=1), 0.0)
    return G, xp.where(filled, I, -1).astype(xp.int64)


def moe_ffn(x, gates, token_index, w_in, w_out):
    """Dispatch tokens to experts, run each expert's FFN, and combine (Eq. 3 and 4).

    x [n, d], gates [e, s], token_index [e, s] (token per slot, -1 = empty slot),
    w_in [e, d, f], w_out [e, f, d] -> y [n, d]

    y[t] = sum over slots (i, j) holding token t of  G[i, j] * GeLU(x[t] W1[i]) W2[i].
    The paper writes dispatch as a one-hot product P . X; gathering rows of x by index is the
    same thing without the [e, s, n] tensor. A token no expert chose gets y[t] = 0.
    """
    xp = _array_module(x, gates, token_index, w_in, w_out)
    _check_matrix("x", x)
    n, d = x.shape
    _check_matrix("gates", gates)
    e, s = gates.shape
    _check_matrix("token_index", token_index, rows=e, cols=s)
    if getattr(w_in, "ndim", None) != 3 or w_in.shape[:2] != (e, d):
        raise ValueError(f"w_in must have shape [e={e}, d={d}, f], got {getattr(w_in, 'shape', None)}")
    f = w_in.shape[2]
    if getattr(w_out, "ndim", None) != 3 or w_out.shape != (e, f, d):
        raise ValueError(f"w_out must have shape [e={e}, f={f}, d={d}], got {getattr(w_out, 'shape', None)}")
    if not np.issubdtype(token_index.dtype, np.integer):   # CuPy dtypes are NumPy dtypes
        raise ValueError(f"token_index must hold integers, got dtype {token_index.dtype}")
    if bool(xp.any(token_index < -1)) or bool(xp.any(token_index >= n)):
        raise ValueError(f"token_index must be in [-1, {n - 1}] (-1 marks an empty slot)")
    for name, a in (("x", x), ("gates", gates), ("w_in", w_in), ("w_out", w_out)):
        _check_finite(name, a, xp)

    filled = token_index >= 0                                # [e, s]
    I = xp.where(filled, token_index, 0)                     # empty slots read token 0 ...
    G = xp.where(filled, gates, 0)                           # ... with gate 0
    # Eq. 3: X_in = P . X, as a gather.
    X_in = x[I]                                              # [e, s, d]
    # X_e[i] = GeLU(X_in[i] W1[i]) W2[i]^T (here W2 is stored as [f, d], so no transpose).
    X_e = gelu_tanh(X_in @ w_in) @ w_out                     # [e, s, f] -> [e, s, d]
    # Eq. 4: X_out[l] = sum_{i,j} P[i, j, l] G[i, j] X_e[i, j], as a scatter-add.
    X_out = xp.zeros((n, d), dtype=X_e.dtype)
    _scatter_add_rows(xp, X_out, I.reshape(-1), (G[..., None] * X_e).reshape(-1, d))
    return X_out


def _scatter_add_rows(xp, out, rows, values):
    """out[rows[m]] += values[m], accumulating repeated rows (np.add.at / cupy.add.at)."""
    xp.add.at(out, rows, values)   # CuPy 13 deprecates cupyx.scatter_add in favour of cupy.add.at


# ----------------------------------------------------------------------------------------------
# Token-choice baselines: Switch top-1 and GShard top-2.

def token_choice(probs, top_k, capacity, second_uniform=None, second_threshold=0.2, bias=None):
    """Each token picks its top_k experts; experts accept claims until their buffer is full.

    probs [n, e], top_k in [1, e], capacity >= 1 -> gates [e, capacity], token_index [e, capacity]
    * choices: a token's experts by decreasing probability, ties to the lower expert index;
    * gates: top-1 keeps the raw probability (Switch); top-2 and up renormalise the token's
      chosen probabilities to sum to 1 (GShard), before any drop;
    * capacity: all first choices claim in token order, then all second choices, and so on;
      slot j of expert i holds the j-th claim it accepted; a claim on a full expert is dropped;
    * empty slots have token_index -1 and gate 0.
    Dropless top-2 (OLMoE, Mixtral, MegaBlocks) is simply capacity = n: no claim is ever dropped.

    GShard's random second expert (Mesh-TensorFlow's default policy "random", threshold 0.2):
    pass second_uniform [n], one draw u ~ U[0, 1) per token (top_k must be 2). Token t then
    claims its second expert only if u[t] < g2[t] / second_threshold, i.e. with probability
    min(1, g2 / threshold), g2 being the RENORMALISED second gate. A skipped second choice
    claims no capacity (it is removed before the queue positions are counted) and the first
    gate stays the renormalised g1. second_uniform=None keeps every second choice.

    bias [e] (auxiliary-loss-free balancing, `lossfree_choice`): the experts are chosen on
    probs + bias; the gates are still the chosen probs (renormalised). None: chosen on probs.
    """
    xp = _array_module(probs)
    _check_probs(probs, xp)
    n, e = probs.shape
    _check_int("top_k", top_k, 1, e)
    _check_int("capacity", capacity, 1, math.inf)
    _check_second_choice(second_uniform, second_threshold, top_k, n, xp)
    scores = probs if bias is None else probs + _checked_bias(bias, e, xp)   # S (+ b)

    choice = xp.argsort(-scores, axis=1, kind="stable")[:, :top_k]    # [n, top_k] expert ids
    choice_probs = xp.take_along_axis(probs, choice, axis=1)          # [n, top_k]
    if top_k == 1:
        choice_gates = choice_probs
    else:
        total = choice_probs.sum(axis=1, keepdims=True)
        choice_gates = choice_probs / xp.where(total > 0, total, 1)

    # Claims in priority order: rank-major (all first choices first), then token order.
    claim_expert = choice.T.reshape(-1)                              # [top_k * n]
    claim_token = xp.tile(xp.arange(n), top_k)                       # [top_k * n]
    claim_gate = choice_gates.T.reshape(-1)                          # [top_k * n]
    claim_made = xp.ones(top_k * n, dtype=bool)                      # [top_k * n]
    if second_uniform is not None:
        # GShard: the second expert only with probability min(1, g2 / threshold).
        claim_made[n:] = second_uniform < choice_gates[:, 1] / second_threshold
    # Position of each claim in its expert's queue = earlier claims made on the same expert.
    onehot = (claim_expert[:, None] == xp.arange(e)[None, :]) & claim_made[:, None]   # [top_k * n, e]
    queue_pos = xp.cumsum(onehot, axis=0)[xp.arange(top_k * n), claim_expert] - 1
    accepted = claim_made & (queue_pos < capacity)

    token_index = xp.full((e, capacity), -1, dtype=xp.int64)
    gates = xp.zeros((e, capacity), dtype=probs.dtype)
    token_index[claim_expert[accepted], queue_pos[accepted]] = claim_token[accepted]
    gates[claim_expert[accepted], queue_pos[accepted]] = claim_gate[accepted]
    return gates, token_index


def _check_second_choice(second_uniform, second_threshold, top_k, n, xp):
    if isinstance(second_threshold, bool) or not isinstance(second_threshold, (int, float, np.floating, np.integer)) \
            or not math.isfinite(second_threshold) or second_threshold <= 0:
        raise ValueError(f"second_threshold must be a finite number > 0, got {second_threshold!r}")
    if second_uniform is None:
        return
    if top_k != 2:
        raise ValueError(f"second_uniform needs top_k=2 (GShard's random second expert), got top_k={top_k}")
    if getattr(second_uniform, "shape", None) != (n,) or not np.issubdtype(second_uniform.dtype, np.floating):
        raise ValueError(f"second_uniform must be a float array of shape [n={n}], "
                         f"got {getattr(second_uniform, 'shape', None)}")
    if not bool(xp.all((second_uniform >= 0) & (second_uniform < 1))):
        raise ValueError("second_uniform must lie in [0, 1) (uniform draws)")


def load_balancing_loss(probs):
    """Switch Transformer balance loss  e * sum_i f_i * P_i  (1.0 when perfectly balanced).

    probs [n, e] -> float. f_i: fraction of tokens whose first choice (argmax, ties to the lower
    index) is expert i, counted before any capacity drop; P_i: mean router probability of i.
    """
    xp = _array_module(probs)
    _check_probs(probs, xp)
    n, e = probs.shape
    first_choice = xp.argmax(probs, axis=1)                          # [n]
    f = xp.bincount(first_choice, minlength=e) / n                   # [e]
    P = probs.mean(axis=0)                                           # [e]
    return float(e * (f * P).sum())


def router_z_loss(logits):
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2.

    logits [n, e] -> float
    """
    xp = _array_module(logits)
    _check_matrix("logits", logits)
    _check_finite("logits", logits, xp)
    m = logits.max(axis=1)
    lse = m + xp.log(xp.exp(logits - m[:, None]).sum(axis=1))       # [n]
    return float((lse ** 2).mean())


def _checked_bias(bias, e, xp):
    if getattr(bias, "shape", None) != (e,) or not np.issubdtype(bias.dtype, np.floating):
        raise ValueError(f"bias must be a float array of shape [e={e}], got {getattr(bias, 'shape', None)}")
    _check_finite("bias", bias, xp)
    return bias


# ----------------------------------------------------------------------------------------------
# Routing since the paper: Expert Threshold (arXiv 2603.11535) and auxiliary-loss-free
# balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3). ecmoe's versions: moe/threshold.py
# and moe/token_choice.py's LossFreeMoE.

def expert_threshold_cutoff(probs, capacity_factor):
    """The cutoff expert choice would use over these tokens: each expert's k-th best score.

    probs [N, e] (ALL tokens of one forward, every group stacked), c -> cutoff [e], with
    k = expert_capacity(N, e, c). Expert Threshold routing keeps tau, the EMA of these cutoffs
    (`expert_threshold_update`), and routes every token with threshold_choice(probs, tau): a
    training forward uses the tau of EARLIER forwards, then updates it with its own cutoff; the
    first forward (no tau yet) routes with its own cutoff.
    """
    xp = _array_module(probs)
    _check_probs(probs, xp)
    N, e = probs.shape
    k = expert_capacity(N, e, capacity_factor)
    # the k-th largest score of each expert (column): sort each column best first, take row k-1
    return -xp.sort(-probs, axis=0)[k - 1]                   # [e]


def expert_threshold_update(threshold, cutoff, decay):
    """EMA of the cutoffs: tau <- decay * tau + (1 - decay) * cutoff.

    threshold [e] or None (no forward yet: tau = cutoff), cutoff [e], decay in [0, 1) -> tau [e]
    """
    if not 0 <= decay < 1:
        raise ValueError(f"decay must be in [0, 1), got {decay!r}")
    if threshold is None:
        return cutoff.copy()
    return decay * threshold + (1 - decay) * cutoff


def lossfree_choice(probs, bias, top_k=2):
    """Top-k with auxiliary-loss-free balancing: choose on S + b, gate with S, drop nothing.

    probs [n, e], bias b [e] -> gates [e, s], token_index [e, s] (-1 = empty slot), load [e]
    (tokens each expert got); s = the largest load (at least 1), so no claim is ever dropped.
    b only decides WHICH experts a token gets; its gates are its raw probabilities of them,
    renormalised to sum 1 (GShard's top-2 gates). Slots in claim order, as token_choice.
    """
    xp = _array_module(probs, bias)
    _check_probs(probs, xp)
    n, e = probs.shape
    _check_int("top_k", top_k, 1, e)
    # each token's top_k experts of S + b (ties to the lower expert index)
    choice = xp.argsort(-(probs + _checked_bias(bias, e, xp)), axis=1, kind="stable")[:, :top_k]
    load = xp.bincount(choice.reshape(-1), minlength=e)      # [e]
    gates, token_index = token_choice(probs, top_k, max(int(load.max()), 1), bias=bias)
    return gates, token_index, load


def lossfree_bias_update(bias, loads, rate):
    """After an optimizer step: b_i <- b_i + u * sign(mean load - load_i), mean-centred.

    bias [e], loads [e] (tokens routed to each expert since the last update), rate u >= 0
    -> new bias [e]. Underloaded experts move up, overloaded ones down; subtracting the update's
    mean (as torchtitan) keeps the mean of b where it was.
    """
    xp = _array_module(bias, loads)
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) or not math.isfinite(rate) \
            or rate < 0:
        raise ValueError(f"rate must be a finite number >= 0, got {rate!r}")
    delta = rate * xp.sign(loads.mean() - loads)             # u * sign(mean load - load_i)
    return bias + (delta - delta.mean())                     # mean-centred


# ----------------------------------------------------------------------------------------------
# Sec. 3.3: expert choice with a cap on experts per token (EC-CAP).

DEFAULT_ENTROPY_WEIGHT = 1e-2   # lambda; the paper's 1e-3 does not converge in 100 sweeps (docs/capped.md)
DEFAULT_MAX_ITER = 1000         # Dykstra sweeps at most
DEFAULT_TOL = 1e-5              # stop when constraints hold and A and the corrections stop moving
CONVERGENCE_CHECK_EVERY = 10    # the stopping test runs every 10th sweep (ecmoe's GPU-friendly period)


class CappedLPSolution(NamedTuple):
    """Result of `solve_capped_lp`."""
    assignment: object       # A [e, n], the soft assignment (expert i takes token j)
    n_iter: int              # sweeps run
    row_residual: object     # [n_iter] max_i |sum_j A[i, j] - k|
    col_residual: object     # [n_iter] max_j max(sum_i A[i, j] - b, 0)
    entry_residual: object   # [n_iter] max_ij max(A[i, j] - 1, 0)


def _logsumexp(a, axis, xp):
    m = a.max(axis=axis, keepdims=True)
    return (m + xp.log(xp.exp(a - m).sum(axis=axis, keepdims=True)))


def _check_cap(probs, k, max_experts_per_token, xp):
    _check_probs(probs, xp)
    n, e = probs.shape
    _check_int("k", k, 1, n)
    _check_int("max_experts_per_token", max_experts_per_token, 1, math.inf)
    b = max_experts_per_token
    if b * n < k * e:
        raise ValueError(f"max_experts_per_token={b} is infeasible: the {e} experts need k*e = {k * e} "
                         f"slots but n*b = {n * b}; need max_experts_per_token >= {math.ceil(k * e / n)}")


def solve_capped_lp(probs, k, max_experts_per_token, entropy_weight=DEFAULT_ENTROPY_WEIGHT,
                    max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL):
    """Solve the entropy-regularised routing LP of Sec. 3.3 with Dykstra's algorithm.

        maximise <S^T, A> + lambda * H(A)   subject to
            sum_j A[i, j] = k        (every expert takes k tokens)      set R
            sum_i A[i, j] <= b       (a token gets at most b experts)   set C
            0 <= A[i, j] <= 1                                           set B

    probs [n, e], k, b = max_experts_per_token -> CappedLPSolution (A [e, n] and residuals).

    The optimum is the KL projection of K = exp(S^T / lambda) onto R n C n B, and the KL
    projection onto each set alone is a closed-form scaling: rows * k/rowsum, columns *
    min(1, b/colsum), entries min(., 1). Dykstra cycles through them, keeping a correction
    per inequality set (for the affine set R the correction cancels, so none is kept). All
    in log space: S^T/lambda reaches 100 at lambda = 1e-2 and exp would overflow in float32.
    Sweep order C, B, R: every expert's row sums to exactly k at the end of a sweep.
    Stopping rule, tested after every CONVERGENCE_CHECK_EVERY-th sweep (10, 20, ...) so that
    ecmoe.py, which must fetch the verdict from the GPU, stops at exactly the same sweep: stop
    when all three residuals are <= tol AND that sweep changed neither A nor either Dykstra
    correction (log space) by more than tol. Feasibility plus a still A is not enough: A can
    stand still for hundreds of sweeps while the corrections keep moving, far from the optimum
    (e.g. 12 tokens, 4 experts, k=6, b=3, lambda=1e-3 stopped at <S,A> = 8.19 vs 8.73 before).
    Otherwise it stops after max_iter sweeps. n_iter = the sweeps run.
    """
    xp = _array_module(probs)
    _check_cap(probs, k, max_experts_per_token, xp)
    if not (isinstance(entropy_weight, (int, float, np.floating)) and math.isfinite(entropy_weight)
            and entropy_weight > 0):
        raise ValueError(f"entropy_weight must be a finite number > 0, got {entropy_weight!r}")
    _check_int("max_iter", max_iter, 1, math.inf)
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)) or not math.isfinite(tol) \
            or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    b = max_experts_per_token

    log_A = probs.T / entropy_weight                     # log K, [e, n]
    q_col = xp.zeros_like(log_A)                         # Dykstra correction for C (log space)
    q_box = xp.zeros_like(log_A)                         # Dykstra correction for B
    row_res, col_res, box_res = [], [], []
    A = None
    for sweep in range(1, max_iter + 1):
        A_before, q_col_before, q_box_before = A, q_col, q_box
        # C: columns scaled by min(1, b / colsum).
        y = log_A + q_col
        log_A = y - xp.maximum(_logsumexp(y, 0, xp) - math.log(b), 0)
        q_col = y - log_A
        # B: entries min(A, 1).
        y = log_A + q_box
        log_A = xp.minimum(y, 0)
        q_box = y - log_A
        # R: rows scaled to sum to k.
        log_A = log_A - (_logsumexp(log_A, 1, xp) - math.log(k))

        A = xp.exp(log_A)
        row_res.append(float(xp.abs(A.sum(axis=1) - k).max()))
        col_res.append(float(xp.maximum(A.sum(axis=0) - b, 0).max()))
        box_res.append(float(xp.maximum(A - 1, 0).max()))
        if sweep % CONVERGENCE_CHECK_EVERY == 0:
            # Feasible is not enough, nor is a still A: the corrections must be still too.
            change = math.inf if A_before is None else max(
                float(xp.abs(A - A_before).max()), float(xp.abs(q_col - q_col_before).max()),
                float(xp.abs(q_box - q_box_before).max()))
            if max(row_res[-1], col_res[-1], box_res[-1], change) <= tol:
                break
    return CappedLPSolution(A, len(row_res), np.array(row_res), np.array(col_res), np.array(box_res))


def capped_expert_choice(probs, k, max_experts_per_token, entropy_weight=DEFAULT_ENTROPY_WEIGHT,
                         max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL):
    """EC-CAP: expert choice where no token gets more than b = max_experts_per_token experts.

    probs [n, e], k, b -> gates [e, k], token_index [e, k] (empty slots: -1, gate 0)

    1. Solve the regularised LP (`solve_capped_lp`) for a soft assignment A [e, n].
    2. Round A to a hard routing. The paper's TopK(A, k) per expert can break the cap when A
       has not converged, so instead we visit (expert, token) pairs in order of decreasing A
       (ties: higher probability, then lower expert index, then lower token index) and accept
       a pair while its expert holds < k tokens and its token holds < b experts. The cap then
       holds exactly and no expert takes more than k tokens, but the bucket size is an upper
       bound, not a guarantee: the result is maximal (a slot stays empty only when every token
       it could still take already has b experts), not maximum. When the LP is tight (c = b)
       a full assignment always exists (total unimodularity), yet greedy rounding leaves a few
       slots empty (0.04-0.47% in random trials); no repair step fills them (yet).
       Gates are the raw router probabilities of the accepted pairs.
    The greedy loop is sequential by nature; it is the slow, clear way (ecmoe.py computes the
    same routing in parallel rounds of expert proposals).
    """
    xp = _array_module(probs)
    sol = solve_capped_lp(probs, k, max_experts_per_token, entropy_weight, max_iter, tol)
    n, e = probs.shape
    b = max_experts_per_token
    A = sol.assignment                                               # [e, n]
    S_T = probs.T                                                    # [e, n]
    # Visiting order: lexsort's LAST key is the primary one; the flat index i*n + j breaks
    # the remaining ties by expert, then token.
    order = xp.lexsort(xp.stack([xp.arange(e * n), -S_T.reshape(-1), -A.reshape(-1)]))

    token_index = np.full((e, k), -1, dtype=np.int64)
    experts_of_token = np.zeros(n, dtype=np.int64)
    filled = np.zeros(e, dtype=np.int64)
    for flat in order.tolist():
        i, j = divmod(flat, n)
        if filled[i] < k and experts_of_token[j] < b:
            token_index[i, filled[i]] = j
            filled[i] += 1
            experts_of_token[j] += 1
            if filled.sum() == e * k:
                break
    token_index = xp.asarray(token_index)
    filled_slots = token_index >= 0
    gates = xp.where(filled_slots, xp.take_along_axis(S_T, xp.where(filled_slots, token_index, 0), axis=1), 0)
    return gates, token_index


# ----------------------------------------------------------------------------------------------
# `python reference_numpy.py`: how good is the capped solver at its defaults?

def _exact_lp_value(probs, k, b):
    """max <S^T, A> s.t. the EC-CAP constraints, lambda = 0, solved exactly by HiGHS."""
    from scipy.optimize import linprog
    n, e = probs.shape
    A_eq = np.kron(np.eye(e), np.ones((1, n)))                       # row sums = k
    A_ub = np.kron(np.ones((1, e)), np.eye(n))                       # column sums <= b
    res = linprog(-probs.T.reshape(-1), A_ub=A_ub, b_ub=np.full(n, b), A_eq=A_eq,
                  b_eq=np.full(e, k), bounds=(0, 1), method="highs")
    return -res.fun


def _capped_report(entropy_weight, max_iter, trials=10, seed=0):
    rng = np.random.default_rng(seed)
    print(f"\nEC-CAP solver with entropy_weight={entropy_weight}, max_iter={max_iter}, tol={DEFAULT_TOL}; "
          f"{trials} random groups per row,\nrouter probs = softmax of N(0, 1) logits. Mean (max) over the trials.")
    header = ("n", "e", "c", "b", "sweeps", "row res", "col res", "TopK(A) over cap",
              "empty slots", "gap to exact LP")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for n, e, c, b in [(64, 8, 1, 2), (64, 8, 2, 2), (64, 8, 2, 3), (256, 16, 2, 2), (256, 16, 2, 3)]:
        k = expert_capacity(n, e, c)
        rows = []
        for _ in range(trials):
            logits = rng.standard_normal((n, e))
            probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            sol = solve_capped_lp(probs, k, b, entropy_weight, max_iter)
            # Before rounding: the paper's TopK(A, k) per expert; how many tokens break the cap?
            topk = np.argsort(-sol.assignment, axis=1, kind="stable")[:, :k]
            over_cap = np.mean(np.bincount(topk.ravel(), minlength=n) > b)
            gates, index = capped_expert_choice(probs, k, b, entropy_weight, max_iter)
            value = gates.sum()
            exact = _exact_lp_value(probs, k, b)
            rows.append((sol.n_iter, sol.row_residual[-1], sol.col_residual[-1], over_cap,
                         np.mean(index < 0), (exact - value) / exact))
        r = np.array(rows)
        cells = [f"{m:.3g} ({x:.3g})" for m, x in zip(r.mean(0), r.max(0))]
        cells[3:] = [f"{100 * m:.2f}% ({100 * x:.2f}%)" for m, x in zip(r.mean(0)[3:], r.max(0)[3:])]
        print(f"| {n} | {e} | {c} | {b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    import argparse
    argparse.ArgumentParser(description="The paper in NumPy. Import it (`import reference_numpy as R`); "
                            "run it to print the EC-CAP solver report (residuals, cap violations, "
                            "gap to the exact LP) at the paper's and our settings, ~10 s.").parse_args()
    _capped_report(1e-3, 100)                                  # the paper's setting
    _capped_report(DEFAULT_ENTROPY_WEIGHT, 100)                # train_tiny.py's --cap-iters
    _capped_report(DEFAULT_ENTROPY_WEIGHT, DEFAULT_MAX_ITER)   # our defaults
