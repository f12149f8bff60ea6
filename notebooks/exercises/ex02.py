"""Checks for the exercises of notebook 02 (token choice vs expert choice).

Each check runs the student's function on fixed groups (notebook 01's toy group, skewed random
groups, scores with ties) and compares it with reference_numpy's expert_choice / token_choice.
"""
import numpy as np

import reference_numpy as R
from exercises import attempt, check, right, to_numpy, wrong


def groups():
    """(label, S [n, e]) the checks run on: the toy group, skewed random groups, tied scores."""
    rng = np.random.default_rng(4)                       # notebook 01's toy group
    X = rng.normal(size=(8, 4)).round(1)
    cases = [("notebook 01's toy group (n=8, e=4)", R.router_probs(X, rng.normal(size=(4, 4)).round(1)))]
    rng = np.random.default_rng(202)
    for n, e in [(16, 4), (24, 6)]:
        logits = rng.normal(size=(n, e)) + np.linspace(1.0, -1.0, e)        # a router skewed to E0
        cases.append((f"a skewed random group (n={n}, e={e})", np.exp(logits) / np.exp(logits).sum(1, keepdims=True)))
    logits = rng.normal(size=(12, 4)).round(0)                               # whole numbers: many ties
    cases.append(("a group with tied scores (n=12, e=4)", np.exp(logits) / np.exp(logits).sum(1, keepdims=True)))
    return cases


def _token_ids(got, n):
    """A collection of token ids -> sorted list of ints (raises on anything else)."""
    arr = to_numpy(got)
    if arr.dtype == bool and arr.shape == (n,):
        raise TypeError("return the token ids (e.g. np.flatnonzero(mask)), not a boolean mask")
    arr = np.asarray(sorted(set(np.ravel(arr).tolist())))
    if arr.size and (not np.all(arr == np.round(arr)) or arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"token ids must be integers in [0, {n - 1}], got {arr.tolist()}")
    return [int(t) for t in arr]


def _unrouted_if(S, k, rule):
    """Token ids a (possibly wrong) rule leaves unrouted, for naming the student's mistake."""
    n = S.shape[0]
    if rule == "token axis":       # top-k over each token's experts, read as token ids
        I = np.argsort(-S, axis=1, kind="stable")[:, :k]
        return np.flatnonzero(np.bincount(I.ravel(), minlength=n) == 0).tolist()
    if rule == "top-1 drops":      # top-1 token choice with buffer k
        _, I = R.token_choice(S, 1, k)
        return np.flatnonzero(np.bincount(I[I >= 0], minlength=n) == 0).tolist()
    _, I = R.expert_choice(S, k)
    if rule == "favourite":        # routed only if the favourite expert picks it
        return [t for t in range(n) if t not in I[S[t].argmax()]]
    if rule == "first slot":       # only each expert's first slot
        return [t for t in range(n) if t not in I[:, 0]]
    raise ValueError(rule)


UNROUTED_HINTS = {
    "token axis": "you ranked each token's EXPERTS (top-k over axis 1: token choice), so your I holds expert ids "
                  "per token, not token ids per expert. Expert choice ranks the tokens of each column: TopK over S^T.",
    "top-1 drops": "those are the tokens TOP-1 token choice drops (their favourite expert's buffer was full). "
                   "Expert choice has no queue: a token is unrouted when it is in no expert's top-k of its column.",
    "favourite": "you counted a token as routed only when its FAVOURITE expert picks it. In expert choice any "
                 "expert may pick any token: look for the token in every row of I.",
    "first slot": "you looked only at each expert's first slot I[:, 0]; every one of the k slots holds a routed token.",
}


@check
def check_unrouted(fn):
    """fn(S, k) -> the ids of the tokens NO expert picks under expert choice with bucket k."""
    runs = []
    for label, S in groups():
        n, e = S.shape
        for c in (1.0, 2.0):
            k = R.expert_capacity(n, e, c)
            runs.append((f"on {label}, k = {k} (c = {c})", S, k, _token_ids(attempt(fn, S.copy(), k), n)))
    wrong_runs = []
    for where, S, k, got in runs:
        G, I = R.expert_choice(S, k)
        want = np.flatnonzero(np.bincount(I.ravel(), minlength=S.shape[0]) == 0).tolist()
        if got != want:
            wrong_runs.append((where, S, k, got, want, G, I))
    if not wrong_runs:
        return right(f"the unrouted tokens match R.expert_choice's on {len(runs)} groups (c = 1 and c = 2, "
                     f"ties included).")
    where, S, k, got, want, G, I = wrong_runs[0]
    for rule, hint in UNROUTED_HINTS.items():
        if all(got_ == _unrouted_if(S_, k_, rule) for _, S_, k_, got_ in runs):
            return wrong(f"{where}: yours {got}, the answer {want}: {hint}")
    if not got and want:
        return wrong(f"{where}: you say every token is routed, but {want} are in no expert's top-{k}.")
    extra = [t for t in got if t not in want]
    if extra:
        t = extra[0]
        i, j = map(int, np.argwhere(I == t)[0])
        return wrong(f"{where}: t{t} is routed: E{i} takes it in slot {j}. A token is unrouted only when it is "
                     f"in none of the e rows of I.")
    t = [t for t in want if t not in got][0]
    return wrong(f"{where}: t{t} is in no expert's top-{k} (its best score {S[t].max():.3f} is below every "
                 f"expert's k-th best: {G[:, -1].round(3).tolist()}), so it is unrouted; yours misses it.")


def _counts(fn, S, capacity):
    n = S.shape[0]
    got = to_numpy(attempt(fn, S.copy(), capacity))
    if got.shape != (n,):
        raise ValueError(f"return one count per token, shape [n] = [{n}], got shape {got.shape}")
    if not np.all(got == np.round(got)):
        raise ValueError(f"counts must be whole numbers, got {got[:5].tolist()}...")
    return got.astype(int)


@check
def check_top2_experts_per_token(fn):
    """fn(S, capacity) -> [n] experts each token gets under GShard top-2 with a buffer of `capacity`."""
    runs = []
    for label, S in groups():
        n, e = S.shape
        for c in (1.0, 2.0):
            cap = R.expert_capacity(n, e, c)
            _, I = R.token_choice(S, 2, cap)
            runs.append((f"on {label} with capacity {cap} (c = {c})", S, cap,
                         _counts(fn, S, cap), np.bincount(I[I >= 0], minlength=n)))
    bad = [r for r in runs if not np.array_equal(r[3], r[4])]
    if not bad:
        return right(f"experts per token match R.token_choice(S, 2, capacity) on {len(runs)} groups, ties "
                     f"included (equal scores: the lower expert index first).")
    where, S, cap, got, want = bad[0]
    n, e = S.shape
    t = int(np.flatnonzero(got != want)[0])
    claims = ", ".join(f"E{i}" for i in np.argsort(-S[t], kind="stable")[:2])
    head = f"{where}: t{t} should get {want[t]} expert(s) (it claims {claims}), yours {got[t]}."
    for rule, hint in TOP2_HINTS.items():
        if all(np.array_equal(g, _top2_if(S_, cap_, rule)) for _, S_, cap_, g, _ in runs):
            return wrong(f"{head} {hint}")
    if got.max() > 2:
        return wrong(f"{head} Top-2 gives a token at most 2 experts (fewer when a claim is dropped).")
    if got.sum() > e * cap:
        return wrong(f"{head} Yours fills {got.sum()} slots, but there are only e · capacity = {e * cap}: an "
                     f"expert accepts claims until its buffer is full; later claims are dropped.")
    return wrong(f"{head} Queue all first choices in token order, then all second choices (a token's choices: "
                 f"its two best experts, ties to the lower index); an expert accepts the first {cap} claims.")


TOP2_HINTS = {
    "token-major": "You served claims token by token (t0's two, then t1's, ...). GShard serves ALL first choices "
                   "before ANY second choice: a later token's first choice beats an earlier token's second.",
    "dropless": "Every token gets 2 in yours: you ignored the buffer (that is dropless top-2). An expert accepts "
                "claims until its `capacity` slots are full; later claims are dropped.",
    "own buffer": "You gave second choices a buffer of their own; first and second choices share ONE buffer of "
                  "`capacity` slots per expert.",
    "ties high": "Where a token's scores tie, yours picks the HIGHER expert index (a reversed ascending argsort). "
                 "Ties go to the lower expert index: np.argsort(-S, axis=1, kind='stable').",
}


def _top2_if(S, cap, rule):
    """Experts per token under a (possibly wrong) top-2 rule, for naming the student's mistake."""
    n, e = S.shape
    if rule == "dropless":
        return np.full(n, 2)
    order = np.argsort(S, axis=1, kind="stable")[:, ::-1] if rule == "ties high" else np.argsort(-S, axis=1, kind="stable")
    claims = ([(t, order[t, r]) for t in range(n) for r in range(2)] if rule == "token-major"
              else [(t, order[t, r]) for r in range(2) for t in range(n)])
    got = np.zeros(n, int)
    used = {r: np.zeros(e, int) for r in range(2)}
    for m, (t, i) in enumerate(claims):
        r = (m % 2) if rule == "token-major" else m // n
        buffer = used[r] if rule == "own buffer" else used[0]
        if buffer[i] < cap:
            buffer[i] += 1
            got[t] += 1
    return got
