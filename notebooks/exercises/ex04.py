"""Checks for the exercises of notebook 04 (causality).

- check_leaky_groupings: which groupings of a [B, T] batch let expert choice leak the future. The
  check MEASURES the answer with reference_numpy.expert_choice (route each group, change the
  tokens at one position, see whether any earlier token's experts change), it does not look it up.
- check_causal_top2: top-2 token choice with a buffer, made causal within a sequence. Compared with
  reference_numpy.token_choice's choices and gates, and probed for causality the same way.
"""
import numpy as np

import nbhelp
import reference_numpy as R
from exercises import attempt, check, right, to_numpy, wrong

B, T = 4, 8          # the batch the groupings below split: B sequences of T positions


def _ids(f):
    b, t = np.meshgrid(np.arange(B), np.arange(T), indexing="ij")      # [B, T] each
    return f(b, t)


GROUPINGS = {        # name -> (what one routing group is, group id of each token [B, T])
    "batch": ("all B*T tokens of the batch", _ids(lambda b, t: 0 * b)),
    "sequence": ("one sequence (T tokens)", _ids(lambda b, t: b)),
    "position": ("the B tokens at one position", _ids(lambda b, t: t)),
    "half sequence": ("one half of one sequence", _ids(lambda b, t: 2 * b + (t >= T // 2))),
    "pairs of sequences": ("2 tokens at one position (b 0-1 or 2-3)", _ids(lambda b, t: 2 * t + b // 2)),
    "two positions": ("the 2B tokens at positions 2j, 2j+1", _ids(lambda b, t: t // 2)),
}

WHY = {              # what to say when a grouping is judged wrongly: (said it leaks, said it is causal)
    "batch": (None, "one group holds every position, so a future token competes for the same slots as the past "
                    "(top-1 is causal under it, expert choice is not)."),
    "sequence": (None, "the tokens of one sequence compete for an expert's k slots: a later token with a high "
                       "score takes a slot and pushes an earlier one out (section 1)."),
    "position": ("a position group holds only tokens at the SAME position t; a token at t' > t is never in its "
                 "group, whatever happens there.", None),
    "half sequence": (None, "each half still holds several positions of one sequence, and within it a later "
                            "position competes with an earlier one."),
    "pairs of sequences": ("a group holds two tokens at the same position; smaller groups only change k, no "
                           "later position ever shares a group with an earlier one.", None),
    "two positions": (None, "position 2j+1 shares a group with 2j: a token at 2j+1 can push one at 2j out of a "
                            "bucket, and that is the future leaking into the past."),
}


def route_grouped(S, group_id, c):
    """Expert choice in each group: S [B, T, e], group_id [B, T] -> experts of each token, bool [B, T, e]."""
    e = S.shape[-1]
    chosen = np.zeros(S.shape, dtype=bool)
    for g in np.unique(group_id):
        b, t = np.nonzero(group_id == g)                      # the group's tokens, in (b, t) order
        k = R.expert_capacity(len(b), e, c)
        _, I = R.expert_choice(S[b, t], k)                    # [e, k] indices into the group
        for i in range(e):
            chosen[b[I[i]], t[I[i]], i] = True
    return chosen


def leaks(group_id, trials=30, e=4, c=1.0, seed=404):
    """Measured: does changing every token at one position t* ever change an earlier token's experts?"""
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        logits = 3 * rng.normal(size=(B, T, e))
        t_star = int(rng.integers(1, T))
        changed = logits.copy()
        changed[:, t_star:] = 3 * rng.normal(size=(B, T - t_star, e))
        soft = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        before, after = route_grouped(soft(logits), group_id, c), route_grouped(soft(changed), group_id, c)
        if not np.array_equal(before[:, :t_star], after[:, :t_star]):
            return True
    return False


@check
def check_leaky_groupings(answer):
    """answer: {grouping name: True if expert choice under it leaks the future, False if causal}."""
    answer = attempt(answer)
    if not isinstance(answer, dict):
        return wrong(f"answer with a dict {{name: True (leaks) / False (causal)}} for the {len(GROUPINGS)} "
                     f"groupings {list(GROUPINGS)}; yours is a {type(answer).__name__}.")
    missing = [g for g in GROUPINGS if g not in answer]
    if missing:
        return wrong(f"say True (leaks) or False (causal) for every grouping; missing: {missing}.")
    for g in GROUPINGS:
        if not isinstance(answer[g], (bool, np.bool_)):
            return wrong(f"answer[{g!r}] must be True (leaks) or False (causal), yours is {answer[g]!r}.")
    mistakes = [(g, bool(answer[g])) for g in GROUPINGS if bool(answer[g]) != leaks(GROUPINGS[g][1])]
    if not mistakes:
        return right(f"all {len(GROUPINGS)} verdicts agree with the measurement (expert choice per group, "
                     f"tokens at one position changed, earlier tokens' experts compared): a grouping is causal "
                     f"exactly when no group holds two different positions.")
    lines = []
    for g, said in mistakes:
        why = WHY[g][0] if said else WHY[g][1]
        lines.append(f"'{g}' ({GROUPINGS[g][0]}) {'is causal' if said else 'LEAKS'}: {why}")
    return wrong(f"{len(mistakes)} of {len(GROUPINGS)} verdicts differ from the measurement:\n  " + "\n  ".join(lines))


# ---------------------------------------------------------------------------------- causal top-2
def causal_top2_expected(S, capacity):
    """The token x expert gate matrix [n, e] of top-2 served token by token (the causal order),
    gates = the token's two probabilities renormalised (R.token_choice's gates, before any drop)."""
    n, e = S.shape
    full = nbhelp.assignment(*R.token_choice(S, 2, n), n)        # capacity n: nothing dropped, [n, e]
    used, A = np.zeros(e, int), np.zeros((n, e))
    for t in range(n):
        for i in np.argsort(-S[t], kind="stable")[:2]:          # its first, then its second choice
            if used[i] < capacity:
                used[i] += 1
                A[t, i] = full[t, i]
    return A


def _assignment_of(fn, S, capacity, where):
    n, e = S.shape
    got = attempt(fn, S.copy(), capacity)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise TypeError(f"return the pair (gates, token_index), got {type(got).__name__}")
    gates, index = to_numpy(got[0]).astype(float), to_numpy(got[1])
    if gates.shape != index.shape or gates.ndim != 2 or gates.shape[0] != e:
        raise ValueError(f"{where}: gates and token_index must both be [e, slots] = [{e}, {capacity}] as "
                         f"R.token_choice returns, got {gates.shape} and {index.shape}")
    if not np.all(index == np.round(index)) or index.min() < -1 or index.max() >= n:
        raise ValueError(f"{where}: token_index must hold token ids in [0, {n - 1}] or -1 (empty slot)")
    index = index.astype(int)
    filled = (index >= 0).sum(1)
    return nbhelp.assignment(gates, index, n), filled


@check
def check_causal_top2(fn):
    """fn(S, capacity) -> (gates, token_index) [e, capacity]: top-2 with a buffer, causal in token order."""
    rng = np.random.default_rng(440)
    cases = [("section 2's hand-made group (S_before)", np.array([[0.6, 0.4, 0.0], [0.0, 0.1, 0.9]]), 1)]
    for n, e, cap in [(8, 4, 3), (12, 3, 5), (16, 4, 4)]:
        logits = rng.normal(size=(n, e)) * 2 + np.linspace(1, -1, e)
        cases.append((f"a skewed random group (n={n}, e={e}, capacity {cap})",
                      np.exp(logits) / np.exp(logits).sum(1, keepdims=True), cap))
    for where, S, cap in cases:
        n, e = S.shape
        A, filled = _assignment_of(fn, S, cap, where)
        if filled.max() > cap:
            i = int(filled.argmax())
            return wrong(f"on {where}: E{i} holds {filled.max()} tokens but its buffer has room for {cap}; claims "
                         f"beyond the buffer are dropped.")
        if ((A > 0).sum(1) > 2).any():
            return wrong(f"on {where}: a token got more than 2 experts; top-2 claims at most two.")
        for t_star, shift in [(t, s) for t in range(1, n) for s in range(1, e)]:   # the causality probe
            later = S.copy()
            later[t_star:] = np.roll(later[t_star:][::-1], shift, axis=1)   # other tokens from t_star on
            A2, _ = _assignment_of(fn, later, cap, where)
            moved = np.flatnonzero((A2[:t_star] != A[:t_star]).any(1))
            if moved.size:
                t = int(moved[0])
                before = [f"E{i}" for i in np.flatnonzero(A[t])] or ["none"]
                after = [f"E{i}" for i in np.flatnonzero(A2[t])] or ["none"]
                return wrong(f"on {where}: not causal. Changing the tokens from position {t_star} on changed the "
                             f"experts of the EARLIER token t{t} ({', '.join(before)} -> {', '.join(after)}). "
                             f"Serving all first choices before any second choice (GShard) lets a later first "
                             f"choice take the slot an earlier token's second choice wanted: serve the claims "
                             f"token by token, each token's first then second choice.")
        want = causal_top2_expected(S, cap)
        if np.array_equal(A > 0, want > 0):
            if not np.allclose(A, want, rtol=1e-9, atol=1e-12):
                t = int(np.flatnonzero(~np.isclose(A, want).all(1))[0])
                return wrong(f"on {where}: the right experts, but t{t}'s gates are {A[t][A[t] > 0].round(3).tolist()}, "
                             f"they should be {want[t][want[t] > 0].round(3).tolist()}: renormalise a token's two "
                             f"chosen probabilities to sum to 1 (GShard, as R.token_choice), before any drop.")
            continue
        t = int(np.flatnonzero(((A > 0) != (want > 0)).any(1))[0])
        mine = [f"E{i}" for i in np.flatnonzero(A[t])] or ["none"]
        should = [f"E{i}" for i in np.flatnonzero(want[t])] or ["none"]
        if (A > 0).sum() < (want > 0).sum() and ((A > 0).sum(1) <= 1).all():
            return wrong(f"on {where}: causal, but t{t} gets {', '.join(mine)} where it should get "
                         f"{', '.join(should)}: you never serve second choices. Each token claims its first, "
                         f"then its second choice, while the expert's buffer has room.")
        return wrong(f"on {where}: t{t} gets {', '.join(mine)}, it should get {', '.join(should)}. Go through the "
                     f"tokens in order; each claims its best expert, then its second best (ties to the lower "
                     f"index); an expert accepts while it holds fewer than its capacity, {cap}.")
    return right(f"causal (no earlier token's experts ever move when later tokens change) and the same "
                 f"routing as token-by-token top-2 on {len(cases)} groups: the first-come-first-served order is "
                 f"the token order, so the past never waits for the future.")
