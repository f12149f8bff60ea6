"""Solutions of notebook 06's exercises, and the typical wrong answers the checks must catch."""
import math

import numpy as np


# ------------------------------------------------------------------------- the cost of group routing
def group_routing_cost(n, e, c):
    """k = ceil(n·c/e) clipped to [1, n]; every one of the e·k slots holds a token: e·k/n per token."""
    k = min(max(math.ceil(n * c / e), 1), n)
    return k, e * k / n


def cost_paper_formula(n, e, c):
    """The paper's k = n·c/e unrounded, and c experts per token: no clipping, no rounding."""
    return n * c / e, c


def cost_c_per_token(n, e, c):
    """The right k, but c experts per token: c is what is asked for, not what a small group gets."""
    return min(max(math.ceil(n * c / e), 1), n), c


def cost_k_per_token(n, e, c):
    """The right k, and k experts per token: k counts tokens per EXPERT."""
    k = min(max(math.ceil(n * c / e), 1), n)
    return k, k


def cost_floor(n, e, c):
    """Rounds down (0 at batch size 1): the library clips k to at least 1."""
    k = int(n * c // e)
    return k, e * k / n


# ------------------------------------------------------------------------- threshold routing by hand
def threshold_routing(S, theta):
    """Token t goes to expert i iff S[t, i] >= theta[i]; its gate is the raw score."""
    return np.where(S >= theta[None, :], S, 0.0)


def threshold_strict(S, theta):
    """Uses > : a score exactly on the threshold is left out."""
    return np.where(S > theta[None, :], S, 0.0)


def threshold_ones(S, theta):
    """Marks the chosen cells with 1 instead of the gate."""
    return (S >= theta[None, :]).astype(float)


def threshold_renormalised(S, theta):
    """Renormalises each token's gates over the experts it passed (not what EC's gates are)."""
    A = np.where(S >= theta[None, :], S, 0.0)
    return A / np.where(A.sum(1, keepdims=True) > 0, A.sum(1, keepdims=True), 1)


def threshold_best_expert_only(S, theta):
    """Sends a token only to its best expert, and only if it passes that expert's threshold."""
    best = S.argmax(1)
    A = np.zeros_like(S)
    rows = np.arange(S.shape[0])
    passed = S[rows, best] >= theta[best]
    A[rows[passed], best[passed]] = S[rows[passed], best[passed]]
    return A


SOLUTIONS = {"check_group_routing_cost": group_routing_cost, "check_threshold_routing": threshold_routing}
WRONG = {
    "check_group_routing_cost": [cost_paper_formula, cost_c_per_token, cost_k_per_token, cost_floor],
    "check_threshold_routing": [threshold_strict, threshold_ones, threshold_renormalised, threshold_best_expert_only],
}
