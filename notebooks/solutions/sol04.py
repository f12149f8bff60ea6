"""Solutions of notebook 04's exercises, and the typical wrong answers the checks must catch."""
import numpy as np

import reference_numpy as R
from solutions import Wrong

# ------------------------------------------------------------------------- which groupings leak
LEAKS = {"batch": True, "sequence": True, "position": False, "half sequence": True,
         "pairs of sequences": False, "two positions": True}


def _but(**changes):
    return {**LEAKS, **{k.replace("_", " "): v for k, v in changes.items()}}


# ------------------------------------------------------------------------- causal top-2
def causal_top2(S, capacity):
    """Token by token: each token claims its first, then its second choice; an expert accepts while
    it has room. Gates: the two chosen probabilities renormalised (before any drop)."""
    n, e = S.shape
    choice = np.argsort(-S, axis=1, kind="stable")[:, :2]               # [n, 2]
    gate = np.take_along_axis(S, choice, 1)
    gate = gate / gate.sum(1, keepdims=True)
    gates, index = np.zeros((e, capacity)), np.full((e, capacity), -1)
    used = np.zeros(e, int)
    for t in range(n):
        for r in range(2):
            i = choice[t, r]
            if used[i] < capacity:
                gates[i, used[i]], index[i, used[i]] = gate[t, r], t
                used[i] += 1
    return gates, index


def gshard_top2(S, capacity):
    """GShard's order: all first choices before any second choice (R.token_choice). Not causal."""
    return R.token_choice(S, 2, capacity)


def first_choices_only(S, capacity):
    """Causal top-1 in disguise: never serves a second choice."""
    return R.token_choice(S, 1, capacity)


def raw_gates(S, capacity):
    """Token by token, but the gates are the raw probabilities, not renormalised over the two choices."""
    gates, index = causal_top2(S, capacity)
    return np.where(index >= 0, S[index.clip(0), np.arange(S.shape[1])[:, None]], 0.0), index


def no_capacity(S, capacity):
    """Every claim accepted: the buffer ignored (dropless top-2, wider slot arrays)."""
    return R.token_choice(S, 2, S.shape[0])


SOLUTIONS = {"check_leaky_groupings": LEAKS, "check_causal_top2": causal_top2}
WRONG = {
    "check_leaky_groupings": [
        Wrong(_but(sequence=False), "thinks one sequence per group is safe (its tokens compete with each other)"),
        Wrong(_but(position=True, pairs_of_sequences=True), "thinks any group of several tokens leaks"),
        Wrong(_but(two_positions=False, half_sequence=False), "thinks only whole sequences or the whole batch leak"),
        Wrong(_but(batch=False), "carries top-1's verdict over: position-major order is causal for top-1, not for EC"),
    ],
    "check_causal_top2": [gshard_top2, first_choices_only, raw_gates, no_capacity],
}
