"""Solutions of notebook 02's exercises, and the typical wrong answers the checks must catch."""
import numpy as np

import reference_numpy as R


# ------------------------------------------------------------------------- unrouted under expert choice
def unrouted(S, k):
    """Tokens in no expert's top-k: count how often each token appears in I, keep the zeros."""
    _, I = R.expert_choice(S, k)
    return np.flatnonzero(np.bincount(I.ravel(), minlength=S.shape[0]) == 0)


def unrouted_token_axis(S, k):
    """Top-k over each token's experts (token choice): every token gets k experts, none unrouted."""
    I = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.flatnonzero(np.bincount(I.ravel(), minlength=S.shape[0]) == 0)   # a token id never appears here


def unrouted_top1_dropped(S, k):
    """The tokens top-1 token choice drops (full buffer): a different rule."""
    _, I = R.token_choice(S, 1, k)
    return np.flatnonzero(np.bincount(I[I >= 0], minlength=S.shape[0]) == 0)


def unrouted_favourite_only(S, k):
    """Counts a token as routed only if its FAVOURITE expert picks it (any expert may pick it)."""
    _, I = R.expert_choice(S, k)
    fav = S.argmax(axis=1)
    return [t for t in range(S.shape[0]) if t not in I[fav[t]]]


def unrouted_first_slot(S, k):
    """Looks only at each expert's first slot I[:, 0]."""
    _, I = R.expert_choice(S, k)
    return [t for t in range(S.shape[0]) if t not in I[:, 0]]


# ------------------------------------------------------------------------- experts per token, top-2
def top2_experts_per_token(S, capacity):
    """GShard top-2: all first choices claim in token order, then all second choices; one buffer."""
    n, e = S.shape
    choice = np.argsort(-S, axis=1, kind="stable")[:, :2]      # [n, 2] ties to the lower expert
    used, got = np.zeros(e, int), np.zeros(n, int)
    for rank in range(2):                                     # rank-major ...
        for t in range(n):                                    # ... then token order
            i = choice[t, rank]
            if used[i] < capacity:
                used[i] += 1
                got[t] += 1
    return got


def top2_token_major(S, capacity):
    """Serves claims token by token (t0's two claims, then t1's): not GShard's order."""
    n, e = S.shape
    used, got = np.zeros(e, int), np.zeros(n, int)
    for t in range(n):
        for i in np.argsort(-S[t], kind="stable")[:2]:
            if used[i] < capacity:
                used[i] += 1
                got[t] += 1
    return got


def top2_no_capacity(S, capacity):
    """Ignores the buffer: every token gets 2 (that is dropless top-2)."""
    return np.full(S.shape[0], 2)


def top2_own_buffer_per_rank(S, capacity):
    """Gives first and second choices a buffer each, instead of one shared buffer."""
    n, e = S.shape
    choice = np.argsort(-S, axis=1, kind="stable")[:, :2]
    got = np.zeros(n, int)
    for rank in range(2):
        used = np.zeros(e, int)
        for t in range(n):
            if used[choice[t, rank]] < capacity:
                used[choice[t, rank]] += 1
                got[t] += 1
    return got


def top2_ties_to_higher_expert(S, capacity):
    """Breaks a token's tied scores towards the HIGHER expert index (reversed ascending argsort)."""
    n, e = S.shape
    choice = np.argsort(S, axis=1, kind="stable")[:, ::-1][:, :2]
    used, got = np.zeros(e, int), np.zeros(n, int)
    for rank in range(2):
        for t in range(n):
            if used[choice[t, rank]] < capacity:
                used[choice[t, rank]] += 1
                got[t] += 1
    return got


SOLUTIONS = {"check_unrouted": unrouted, "check_top2_experts_per_token": top2_experts_per_token}
WRONG = {
    "check_unrouted": [unrouted_token_axis, unrouted_top1_dropped, unrouted_favourite_only, unrouted_first_slot],
    "check_top2_experts_per_token": [top2_token_major, top2_no_capacity, top2_own_buffer_per_rank,
                                     top2_ties_to_higher_expert],
}
