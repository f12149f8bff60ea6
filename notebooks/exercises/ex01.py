"""Checks for the exercises of notebook 01 (expert choice by hand): Eq. 1, Eq. 2 and Eq. 4.

Each check runs the student's function on several fixed inputs (notebook 01's toy group, random
groups, groups with tied scores, more experts than tokens) and compares it with reference_numpy.
"""
import math

import numpy as np

import reference_numpy as R
from exercises import attempt, check, right, to_numpy, wrong


def toy_group():
    """Notebook 01's toy group: X [8, 4], W_g [4, 4], W1 [4, 4, 3], W2 [4, 3, 4], c = 1."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(8, 4)).round(1)
    W_g = rng.normal(size=(4, 4)).round(1)
    W1 = (rng.normal(size=(4, 4, 3)) / 2).round(1)
    W2 = (rng.normal(size=(4, 3, 4)) / 2).round(1)
    return X, W_g, W1, W2


def score_cases():
    """(label, S [n, e], k) the Eq. 2 checks run on, ties included."""
    X, W_g, _, _ = toy_group()
    cases = [("notebook 01's toy group (n=8, e=4, k=2)", R.router_probs(X, W_g), 2)]
    rng = np.random.default_rng(101)
    cases.append(("a random group (n=12, e=3, k=4)", R.router_probs(rng.normal(size=(12, 5)), rng.normal(size=(5, 3))), 4))
    x = rng.normal(size=(10, 4))
    x[7], x[9] = x[2], x[0]                      # identical tokens: tied scores for every expert
    cases.append(("a group with identical tokens t2 = t7 and t0 = t9 (n=10, e=5, k=3): ties",
                  R.router_probs(x, rng.normal(size=(4, 5)) * 2), 3))
    S = R.router_probs(rng.normal(size=(9, 4)), rng.normal(size=(4, 4)))
    cases.append(("scores rounded to 1 decimal, many ties (n=9, e=4, k=5)", S.round(1), 5))
    cases.append(("more experts than tokens (n=6, e=8, k=1)", R.router_probs(rng.normal(size=(6, 3)), rng.normal(size=(3, 8))), 1))
    return cases


# ---------------------------------------------------------------------------------------- Eq. 1
CAPACITY_CASES = [(8, 4, 1.0), (10, 4, 1.0), (1, 16, 2.0), (3, 16, 2.0), (512, 16, 2.0), (6, 4, 0.5),
                  (100, 8, 1.25), (8, 4, 8.0), (7, 2, 4.0)]   # exact in floating point: no rounding traps


def _clip(k, n):
    return min(max(int(k), 1), n)


@check
def check_capacity(fn):
    """fn(n, e, c) -> k, the bucket size of Eq. 1 as the library computes it (R.expert_capacity)."""
    got = []
    for n, e, c in CAPACITY_CASES:
        k = attempt(fn, n, e, c)
        want = R.expert_capacity(n, e, c)
        case = f"n={n}, e={e}, c={c}: n·c/e = {n * c / e:g}, k should be {want}"
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            if isinstance(k, (float, np.floating)) and float(k) == want:
                return wrong(f"{case}, yours is the float {k!r}. k is a number of tokens, used as a "
                             f"slice bound (I[:, :k]): return an int (math.ceil gives one, np.ceil a float).")
            return wrong(f"{case}, yours is {k!r} ({type(k).__name__}); return an int.")
        got.append(int(k))
    want = [R.expert_capacity(n, e, c) for n, e, c in CAPACITY_CASES]
    if got == want:
        return right(f"k matches R.expert_capacity on all {len(CAPACITY_CASES)} cases, including n·c < e "
                     f"(k = 1) and c > e (k = n).")
    j = next(j for j in range(len(got)) if got[j] != want[j])
    n, e, c = CAPACITY_CASES[j]
    case = f"n={n}, e={e}, c={c}: n·c/e = {n * c / e:g}, k should be {want[j]}, yours {got[j]}"
    patterns = [
        ([_clip(math.floor(n * c / e), n) for n, e, c in CAPACITY_CASES],
         f"you rounded DOWN, so the e·k = {e * got[j]} slots are fewer than the n·c = {n * c:g} the capacity "
         f"factor promises. Round up (math.ceil)."),
        ([_clip(round(n * c / e), n) for n, e, c in CAPACITY_CASES],
         "round() goes to the nearest integer (flaxformer's choice); this library rounds UP, so a group never "
         "gets fewer than n·c slots. Use math.ceil."),
    ]
    for pattern, hint in patterns:
        if got == pattern:
            return wrong(f"{case}: {hint}")
    if any(k < 1 for k in got):
        j = next(j for j in range(len(got)) if got[j] < 1)
        n, e, c = CAPACITY_CASES[j]
        return wrong(f"n={n}, e={e}, c={c}: n·c/e = {n * c / e:g}, yours k = {got[j]}: no expert would take "
                     f"any token and the layer would do nothing. The paper's formula gives 0 when n·c < e; the "
                     f"library rounds up and clips k to at least 1 (here k = {want[j]}).")
    if got[j] > n:
        return wrong(f"{case} > n = {n}: an expert cannot take more tokens than the group holds. Clip k to at most n.")
    if got[j] < want[j]:
        return wrong(f"{case}: too small. Round n·c/e UP (math.ceil), so e·k >= n·c.")
    return wrong(f"{case}. Eq. 1: k = n·c/e, rounded up, clipped to [1, n].")


# ---------------------------------------------------------------------------------------- Eq. 2
def _pair(got, what="(G, I)"):
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise TypeError(f"return the pair {what}, got {type(got).__name__}")
    G, I = (to_numpy(a) for a in got)
    return G.astype(float), I


@check
def check_expert_choice(fn):
    """fn(S, k) -> (G, I), Eq. 2: each expert's k best tokens, as R.expert_choice (ties: lower token first)."""
    cases = score_cases()
    for label, S, k in cases:
        n, e = S.shape
        G_ref, I_ref = R.expert_choice(S, k)
        G, I = _pair(attempt(fn, S.copy(), k))
        if I.shape != (e, k):
            if I.shape == (n, k):
                load = np.bincount(I.ravel().astype(int), minlength=e) if I.min() >= 0 and I.max() < e else None
                also = "" if load is None else (
                    f" Read as token choice it would give E{load.argmax()} {load.max()} tokens and "
                    f"E{load.argmin()} {load.min()}, while each expert must take exactly k = {k}.")
                return wrong(f"on {label}: your I has shape {I.shape}, one row per TOKEN. You took the top-k over "
                             f"the experts axis (each token picks its k best experts): that is token choice."
                             f"{also} Expert choice takes TopK over S^T, each expert's column of scores: I is "
                             f"[e, k] = [{e}, {k}].")
            return wrong(f"on {label}: I must have shape [e, k] = [{e}, {k}], yours is {I.shape}. "
                         f"Row i holds expert i's k chosen token ids.")
        if G.shape != (e, k):
            return wrong(f"on {label}: G must have shape [e, k] = [{e}, {k}] like I, yours is {G.shape}.")
        if not np.issubdtype(I.dtype, np.integer):
            if np.all(I == np.round(I)):
                I = I.astype(int)
            else:
                return wrong(f"on {label}: I must hold token ids (integers), yours holds {I.ravel()[:4]}...: "
                             f"did you return the scores where the indices go? argsort gives indices, sort gives values.")
        if I.min() < 0 or I.max() >= n:
            return wrong(f"on {label}: I must hold token ids in [0, {n - 1}], yours has {I.min()}..{I.max()}.")
        for i in range(e):
            if len(set(I[i].tolist())) < k:
                return wrong(f"on {label}: expert E{i} holds a token twice ({I[i].tolist()}); each expert "
                             f"picks k = {k} DIFFERENT tokens.")
        ascending = np.argsort(S.T, axis=1, kind="stable")[:, :k]
        if np.array_equal(I, ascending) and not np.array_equal(I, I_ref):
            return wrong(f"on {label}: your experts picked their LOWEST-scoring tokens (E0: {I[0].tolist()}, "
                         f"scores {S[I[0], 0].round(3).tolist()}). np.argsort sorts ascending: sort -S^T, or "
                         f"take the end of the ascending order and reverse it.")
        for i in range(e):
            if set(I[i].tolist()) != set(I_ref[i].tolist()):
                mine = np.sort(S[I[i], i])[::-1]
                if np.allclose(mine, G_ref[i], rtol=0, atol=0):
                    tied = np.flatnonzero(S[:, i] == G_ref[i, -1]).tolist()
                    return wrong(f"on {label}: E{i}'s k-th place is a TIE: tokens {tied} all score "
                                 f"{G_ref[i, -1]:.4g}. The library keeps the LOWER token index first (a stable "
                                 f"descending sort: np.argsort(-S.T, axis=1, kind='stable')), so E{i} takes "
                                 f"{I_ref[i].tolist()}; yours {I[i].tolist()}. Neither np.argpartition nor a reversed "
                                 f"ascending argsort keeps that order.")
                return wrong(f"on {label}: E{i} should take tokens {sorted(I_ref[i].tolist())} (the {k} highest "
                             f"scores of its column S[:, {i}]), yours {sorted(I[i].tolist())}.")
        if not np.array_equal(I, I_ref):
            i = int(np.flatnonzero((I != I_ref).any(1))[0])
            if np.array_equal(S[I[i], i], S[I_ref[i], i]):
                return wrong(f"on {label}: E{i}'s slots hold tied tokens in the other order (yours {I[i].tolist()}, "
                             f"the library {I_ref[i].tolist()}): on equal scores the lower token index comes "
                             f"first. Use a stable sort of -S^T.")
            return wrong(f"on {label}: E{i} picked the right tokens but in the order {I[i].tolist()} "
                         f"(scores {S[I[i], i].round(3).tolist()}); slots go by DECREASING score, "
                         f"{I_ref[i].tolist()}. np.argpartition does not sort; argsort does.")
        if not np.allclose(G, G_ref, rtol=1e-9, atol=1e-12):
            if np.allclose(G, G_ref / G_ref.sum(1, keepdims=True), rtol=1e-9):
                return wrong(f"on {label}: your gates are renormalised over each expert's slots. Expert choice "
                             f"uses the RAW router scores as gates: G[i, j] = S[I[i, j], i].")
            return wrong(f"on {label}: G[i, j] must be the score S[I[i, j], i] of the token in that slot; "
                         f"E0 should have {G_ref[0].round(4).tolist()}, yours {G[0].round(4).tolist()}.")
    return right(f"(G, I) match R.expert_choice on all {len(cases)} groups, ties and e > n included.")


# ---------------------------------------------------------------------------------------- Eq. 4
def combine_cases():
    """(label, X, G, I, W1, W2) the Eq. 3-4 check runs on."""
    X, W_g, W1, W2 = toy_group()
    G, I = R.expert_choice(R.router_probs(X, W_g), 2)
    cases = [("notebook 01's toy group (t7 has three experts, t0, t1, t5 none)", X, G, I, W1, W2)]
    rng = np.random.default_rng(102)
    for n, d, e, f, c in [(10, 3, 5, 4, 2.0), (6, 2, 8, 3, 1.0)]:
        X = rng.normal(size=(n, d))
        S = R.router_probs(X, rng.normal(size=(d, e)) * 2)
        G, I = R.expert_choice(S, R.expert_capacity(n, e, c))
        cases.append((f"a random group (n={n}, d={d}, e={e}, c={c})", X, G, I,
                      rng.normal(size=(e, d, f)), rng.normal(size=(e, f, d))))
    return cases


@check
def check_combine(fn):
    """fn(X, G, I, W1, W2) -> X_out [n, d], Eq. 3-4 (dispatch, experts, combine) as R.moe_ffn."""
    cases = combine_cases()
    for label, X, G, I, W1, W2 in cases:
        n, d = X.shape
        want = R.moe_ffn(X, G, I, W1, W2)
        got = to_numpy(attempt(fn, X.copy(), G.copy(), I.copy(), W1.copy(), W2.copy())).astype(float)
        if got.shape != (n, d):
            return wrong(f"on {label}: X_out must have shape [n, d] = [{n}, {d}] (one row per token), yours "
                         f"is {got.shape}. Sum each token's gated expert outputs into its row.")
        if np.allclose(got, want, rtol=1e-9, atol=1e-12):
            continue
        count = np.bincount(I.ravel(), minlength=n)
        bad = ~np.isclose(got, want, rtol=1e-9, atol=1e-12).all(1)
        X_e = R.gelu_tanh(X[I] @ W1) @ W2                                     # [e, k, d]
        ungated = np.zeros((n, d))
        np.add.at(ungated, I.ravel(), X_e.reshape(-1, d))
        gate_in = np.zeros((n, d))
        np.add.at(gate_in, I.ravel(), (R.gelu_tanh((G[..., None] * X[I]) @ W1) @ W2).reshape(-1, d))
        if np.any(bad & (count == 0)):
            t = int(np.flatnonzero(bad & (count == 0))[0])
            return wrong(f"on {label}: no expert picked t{t}, so its row must be 0 (only the residual carries "
                         f"it); yours is {got[t].round(3).tolist()}.")
        if bad.any() and np.all(count[bad] >= 2):
            t = int(np.flatnonzero(bad)[0])
            return wrong(f"on {label}: tokens picked by ONE expert are right, but t{t}, picked by {count[t]}, is "
                         f"not: its row must be the SUM of all its experts' gated outputs. `X_out[I] += v` "
                         f"keeps only one of repeated indices in NumPy; use np.add.at(X_out, I.ravel(), v) "
                         f"or a loop over experts.")
        if np.allclose(got, ungated, rtol=1e-9):
            return wrong(f"on {label}: you summed the expert outputs without their gates. Eq. 4 weights each "
                         f"by G[i, j]: X_out[l] = Σ P[i,j,l] · G[i,j] · X_e[i,j].")
        if np.allclose(got, gate_in, rtol=1e-9):
            return wrong(f"on {label}: you scaled the expert's INPUT by the gate. The gate multiplies the "
                         f"expert's OUTPUT: G[i, j] · GeLU(X_in[i, j] W1[i]) W2[i].")
        t = int(np.flatnonzero(bad)[0])
        return wrong(f"on {label}: row t{t} should be {want[t].round(4).tolist()}, yours {got[t].round(4).tolist()}. "
                     f"X_in = X[I] (Eq. 3), X_e = GeLU_tanh(X_in @ W1) @ W2 (R.gelu_tanh), then add G·X_e into "
                     f"the rows I (Eq. 4).")
    return right(f"X_out matches R.moe_ffn on all {len(cases)} groups, tokens with 0 and with several experts included.")
