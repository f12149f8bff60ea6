"""Solutions of notebook 07's exercises, and the typical wrong answers the checks must catch."""
import math

import numpy as np


def _k(N, e, c):
    return min(max(math.ceil(N * c / e), 1), N)


# ------------------------------------------------------------------------- Expert Threshold's cutoff
def et_cutoff(P, c):
    """Each expert's k-th best score over the forward, k = ceil(N·c/e) clipped to [1, N]."""
    N, e = P.shape
    return -np.sort(-P, axis=0)[_k(N, e, c) - 1]


def cutoff_quantile(P, c):
    """np.quantile(P, 1 - c/e) interpolates between scores: not a score any token has."""
    return np.quantile(P, 1 - c / P.shape[1], axis=0)


def cutoff_kth_lowest(P, c):
    """Sorted ascending: the k-th LOWEST score."""
    N, e = P.shape
    return np.sort(P, axis=0)[_k(N, e, c) - 1]


def cutoff_off_by_one(P, c):
    """Row k of the descending sort: the (k+1)-th best, the first token EC leaves out."""
    N, e = P.shape
    return -np.sort(-P, axis=0)[min(_k(N, e, c), N - 1)]


def cutoff_per_token(P, c):
    """Ranks each token's row (axis 1) instead of each expert's column."""
    N, e = P.shape
    return -np.sort(-P, axis=1)[:, min(_k(N, e, c), e) - 1]


def cutoff_floor_k(P, c):
    """k = floor(N·c/e): one token short of expert choice's bucket when N·c/e is fractional."""
    N, e = P.shape
    return -np.sort(-P, axis=0)[max(int(N * c // e), 1) - 1]


# ------------------------------------------------------------------------- loss-free bias update
def bias_update(b, loads, u):
    """b_i += u·sign(mean load - load_i), then the update's mean subtracted (b keeps its mean)."""
    delta = u * np.sign(loads.mean() - loads)
    return b + delta - delta.mean()


def bias_sign_reversed(b, loads, u):
    """Raises the bias of the overloaded experts: the sign backwards."""
    delta = u * np.sign(loads - loads.mean())
    return b + delta - delta.mean()


def bias_not_centred(b, loads, u):
    """Forgets to subtract the update's mean: b drifts."""
    return b + u * np.sign(loads.mean() - loads)


def bias_proportional(b, loads, u):
    """Moves b in proportion to the load gap instead of by its sign."""
    delta = u * (loads.mean() - loads)
    return b + delta - delta.mean()


def bias_no_rate(b, loads, u):
    """Forgets the rate u: steps of 1."""
    delta = np.sign(loads.mean() - loads)
    return b + delta - delta.mean()


SOLUTIONS = {"check_et_cutoff": et_cutoff, "check_bias_update": bias_update}
WRONG = {
    "check_et_cutoff": [cutoff_quantile, cutoff_kth_lowest, cutoff_off_by_one, cutoff_per_token, cutoff_floor_k],
    "check_bias_update": [bias_sign_reversed, bias_not_centred, bias_proportional, bias_no_rate],
}
