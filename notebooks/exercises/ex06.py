"""Checks for the exercises of notebook 06 (expert choice at inference).

- check_group_routing_cost: predict k and the mean experts per token that group routing gives a
  group of n tokens; compared with ecmoe.expert_capacity and with experts counted after routing
  random scores through ecmoe.expert_choice.
- check_threshold_routing: threshold routing by hand; compared with reference_numpy.threshold_choice
  on scores that include ties with the thresholds.
"""
import numpy as np
import torch

import ecmoe
import nbhelp
import reference_numpy as R
from exercises import attempt, check, right, to_numpy, wrong

COST_CASES = [(1, 16, 2.0), (32, 16, 2.0), (4, 16, 2.0), (8, 8, 1.0), (3, 4, 2.0), (64, 16, 2.0)]


def measured_experts_per_token(n, e, c, seed=0):
    """Route random scores of one group of n tokens with ecmoe.expert_choice; mean experts per token."""
    probs = torch.softmax(torch.randn(1, n, e, generator=torch.Generator().manual_seed(seed)), -1)
    _, token_index = ecmoe.expert_choice(probs, ecmoe.expert_capacity(n, e, c))
    return float((token_index >= 0).sum()) / n


@check
def check_group_routing_cost(fn):
    """fn(n, e, c) -> (k, mean experts per token) of group routing over groups of n tokens."""
    for n, e, c in COST_CASES:
        got = attempt(fn, n, e, c)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return wrong(f"return the pair (k, experts_per_token), yours is {got!r}.")
        k, per_token = got
        k_ref, per_ref = ecmoe.expert_capacity(n, e, c), measured_experts_per_token(n, e, c)
        case = f"a group of n={n} (e={e}, c={c})"
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
            if isinstance(k, (float, np.floating)) and k != int(k) and np.isclose(k, n * c / e):
                return wrong(f"for {case} your k = {k:g} = n·c/e, a fraction of a token. The layer rounds up and "
                             f"clips to [1, n] (ecmoe.expert_capacity): k = {k_ref}.")
            if not (isinstance(k, (float, np.floating)) and float(k) == int(k)):
                return wrong(f"for {case} k must be a whole number of tokens, yours is {k!r}.")
            k = int(k)
        if k != k_ref:
            if n == 1 and k == 0:
                return wrong(f"for {case} (batch size 1, position groups) your k = 0: the paper's n·c/e = "
                             f"{n * c / e:g} rounds to 0, but then no expert would take the token. The library "
                             f"clips k to at least 1.")
            return wrong(f"for {case}: k = ceil(n·c/e) = ceil({n * c / e:g}), clipped to [1, n], is {k_ref}; "
                         f"yours {k}.")
        if not isinstance(per_token, (int, float, np.integer, np.floating)) or isinstance(per_token, bool):
            return wrong(f"for {case} the experts per token must be a number, yours is {per_token!r}.")
        if not np.isclose(per_token, per_ref, rtol=1e-9):
            if np.isclose(per_token, c):
                return wrong(f"for {case} you say {per_token:g} = c experts per token, but c is what was ASKED "
                             f"for. The group has e·k = {e * k_ref} slots for n = {n} token{'s' if n > 1 else ''}: e·k/n = {per_ref:g} "
                             f"experts per token on average" + (" (every expert takes the one token)." if n == 1 else "."))
            if np.isclose(per_token, k_ref):
                return wrong(f"for {case} you say {per_token:g} = k experts per token, but k is tokens per "
                             f"EXPERT. Count slots: e·k = {e * k_ref} of them for n = {n} token{'s' if n > 1 else ''}, so e·k/n = {per_ref:g}.")
            return wrong(f"for {case} routing gives {per_ref:g} experts per token on average (e·k/n: every slot "
                         f"holds a token), yours {per_token:g}.")
    return right(f"k and experts per token match the library on {len(COST_CASES)} group sizes. At batch size 1 "
                 f"(n = 1, e = 16, c = 2) k clips up to 1 and the token gets all 16 experts: 8x the c = 2 the "
                 f"model was trained with.")


def threshold_cases():
    """(label, S [n, e], theta [e]) with ties between scores and thresholds."""
    rng = np.random.default_rng(606)
    cases = []
    for n, e in [(10, 4), (16, 8), (7, 5)]:
        logits = rng.normal(size=(n, e)) * 1.5
        S = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        theta = np.sort(S, axis=0)[-max(1, n // 3)]              # about n/3 tokens pass each expert
        theta[0] = S[2, 0]                                     # a score exactly on a threshold
        cases.append((f"a group of n={n}, e={e} (S[2, 0] equals θ_0 exactly)", S, theta))
    S = np.full((4, 4), 0.25)                                  # a token that ties with every threshold
    cases.append(("uniform scores 0.25 with θ = 0.25 (every score on its threshold)", S, np.full(4, 0.25)))
    return cases


@check
def check_threshold_routing(fn):
    """fn(S, theta) -> A [n, e]: A[t, i] = S[t, i] where token t passes expert i's threshold, else 0."""
    cases = threshold_cases()
    for label, S, theta in cases:
        n, e = S.shape
        want = nbhelp.assignment(*R.threshold_choice(S, theta), n)   # [n, e]
        got = to_numpy(attempt(fn, S.copy(), theta.copy())).astype(float)
        if got.shape != (n, e):
            if got.shape == (e, n):
                return wrong(f"on {label}: return A as tokens x experts [n, e] = [{n}, {e}], yours is "
                             f"[e, n]; transpose it.")
            return wrong(f"on {label}: A must have shape [n, e] = [{n}, {e}], yours is {got.shape}.")
        if np.allclose(got, want, rtol=1e-12, atol=0):
            continue
        on_edge = np.isclose(S, theta[None, :], rtol=0, atol=0)
        if np.array_equal(got > 0, (S > theta) & True) and on_edge.any():
            t, i = map(int, np.argwhere(on_edge)[0])
            return wrong(f"on {label}: t{t} scores exactly θ_{i} = {theta[i]:.4g} for E{i} and should pass: the "
                         f"rule is S[t, i] >= θ_i (a token as good as the k-th best of training is in).")
        if np.array_equal(got > 0, want > 0):
            if np.all((got == 0) | (got == 1)):
                return wrong(f"on {label}: the right cells, but put the GATE S[t, i] in them, not 1: the expert's "
                             f"output is weighted by the token's router score, as in group routing.")
            t = int(np.flatnonzero(~np.isclose(got, want, rtol=1e-12, atol=0).all(1))[0])
            return wrong(f"on {label}: the right cells, but the gates must be the raw scores S[t, i] (no "
                         f"renormalising over a token's experts): t{t}'s should be "
                         f"{want[t][want[t] > 0].round(3).tolist()}, yours {got[t][got[t] > 0].round(3).tolist()}.")
        per_token = (got > 0).sum(1)
        if (per_token <= 1).all() and ((want > 0).sum(1) > 1).any():
            t = int(np.flatnonzero((want > 0).sum(1) > 1)[0])
            return wrong(f"on {label}: each of your tokens goes to at most one expert, but t{t} passes "
                         f"{int((want[t] > 0).sum())} thresholds. The rule is per (token, expert) pair: every "
                         f"expert whose threshold it clears takes it, none if it clears none.")
        t, i = map(int, np.argwhere((got > 0) != (want > 0))[0])
        return wrong(f"on {label}: t{t}, E{i}: S = {S[t, i]:.4g}, θ_{i} = {theta[i]:.4g}, so it should be "
                     f"{'taken' if want[t, i] > 0 else 'left out'}. Compare each column of S with its expert's θ.")
    return right(f"A matches R.threshold_choice on {len(cases)} groups, scores exactly on a threshold included. "
                 f"Each token's experts depend on its own scores only: the same at batch 1 and 32, and causal.")
