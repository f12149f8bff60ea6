"""Solutions of notebook 01's exercises, and the typical wrong answers the checks must catch."""
import math

import numpy as np

import reference_numpy as R


# ---------------------------------------------------------------------------------------- Eq. 1
def capacity(n, e, c):
    """k = n·c/e, rounded up, clipped to [1, n]."""
    return min(max(math.ceil(n * c / e), 1), n)


def capacity_floor(n, e, c):
    """Rounds down: e·k < n·c slots, fewer experts per token than c promises."""
    return min(max(int(n * c // e), 1), n)


def capacity_round(n, e, c):
    """round() to nearest (flaxformer's rule), not up."""
    return min(max(round(n * c / e), 1), n)


def capacity_unclipped(n, e, c):
    """No clip to n: k > n when c > e."""
    return max(math.ceil(n * c / e), 1)


def capacity_paper(n, e, c):
    """The paper's formula as is, int(n·c/e): 0 when n·c < e."""
    return int(n * c / e)


def capacity_float(n, e, c):
    """np.ceil and np.clip return a float, not a count."""
    return np.clip(np.ceil(n * c / e), 1, n)


# ---------------------------------------------------------------------------------------- Eq. 2
def expert_choice(S, k):
    """Each expert (a column of S, a row of S^T) keeps its k best tokens, ties to the lower index."""
    I = np.argsort(-S.T, axis=1, kind="stable")[:, :k]      # [e, k]
    G = np.take_along_axis(S.T, I, axis=1)                  # [e, k] raw scores
    return G, I


def token_choice_axis(S, k):
    """Top-k over the experts axis: each token picks its k best experts. That is token choice."""
    I = np.argsort(-S, axis=1, kind="stable")[:, :k]        # [n, k]
    return np.take_along_axis(S, I, axis=1), I


def ascending(S, k):
    """np.argsort sorts ascending: each expert takes its k WORST tokens."""
    I = np.argsort(S.T, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S.T, I, axis=1), I


def ties_to_higher_index(S, k):
    """Reverses an ascending argsort: equal scores go to the HIGHER token index first."""
    I = np.argsort(S.T, axis=1, kind="stable")[:, ::-1][:, :k]
    return np.take_along_axis(S.T, I, axis=1), I


def unsorted_slots(S, k):
    """np.argpartition finds the k best but does not order the slots by score."""
    I = np.argpartition(S.T, -k, axis=1)[:, -k:][:, ::-1]
    return np.take_along_axis(S.T, I, axis=1), I


def renormalised_gates(S, k):
    """Gates renormalised over each expert's slots; EC's gates are the raw scores."""
    G, I = R.expert_choice(S, k)
    return G / G.sum(axis=1, keepdims=True), I


# ---------------------------------------------------------------------------------------- Eq. 4
def combine(X, G, I, W1, W2):
    """Dispatch by gather (Eq. 3), run the experts, scatter-add the gated outputs (Eq. 4)."""
    X_e = R.gelu_tanh(X[I] @ W1) @ W2                        # [e, k, d]
    X_out = np.zeros_like(X)
    np.add.at(X_out, I.ravel(), (G[..., None] * X_e).reshape(-1, X.shape[1]))
    return X_out


def combine_fancy_index(X, G, I, W1, W2):
    """X_out[I] += ... : NumPy keeps one of repeated indices, so a token with several experts gets one."""
    X_e = R.gelu_tanh(X[I] @ W1) @ W2
    X_out = np.zeros_like(X)
    X_out[I.ravel()] += (G[..., None] * X_e).reshape(-1, X.shape[1])
    return X_out


def combine_no_gate(X, G, I, W1, W2):
    """Forgets the gates: a plain sum of expert outputs."""
    X_e = R.gelu_tanh(X[I] @ W1) @ W2
    X_out = np.zeros_like(X)
    np.add.at(X_out, I.ravel(), X_e.reshape(-1, X.shape[1]))
    return X_out


def combine_gate_on_input(X, G, I, W1, W2):
    """Scales the expert's input by the gate instead of its output."""
    X_e = R.gelu_tanh((G[..., None] * X[I]) @ W1) @ W2
    X_out = np.zeros_like(X)
    np.add.at(X_out, I.ravel(), X_e.reshape(-1, X.shape[1]))
    return X_out


def combine_residual(X, G, I, W1, W2):
    """Adds the input back (the residual belongs to the block, not the MoE layer): unpicked tokens get X."""
    return X + combine(X, G, I, W1, W2)


SOLUTIONS = {"check_capacity": capacity, "check_expert_choice": expert_choice, "check_combine": combine}
WRONG = {
    "check_capacity": [capacity_floor, capacity_round, capacity_unclipped, capacity_paper, capacity_float],
    "check_expert_choice": [token_choice_axis, ascending, ties_to_higher_index, unsorted_slots, renormalised_gates],
    "check_combine": [combine_fancy_index, combine_no_gate, combine_gate_on_input, combine_residual],
}
