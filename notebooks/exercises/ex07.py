"""Checks for the exercises of notebook 07 (after expert choice).

- check_et_cutoff: Expert Threshold's cutoff, each expert's k-th best score over a forward (its
  (1 - k/N) score quantile); compared with reference_numpy.expert_threshold_cutoff, ties included.
- check_bias_update: the auxiliary-loss-free bias step; compared with
  reference_numpy.lossfree_bias_update, with loads that equal the mean.
"""
import numpy as np

import reference_numpy as R
from exercises import attempt, check, right, to_numpy, wrong


def cutoff_cases():
    """(label, P [N, e], c): N*c/e a whole number, a fraction, ties, a skewed router."""
    rng = np.random.default_rng(707)
    soft = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return [
        ("N=16, e=4, c=2 (k = 8)", soft(rng.normal(size=(16, 4))), 2.0),
        ("N=10, e=4, c=1 (N·c/e = 2.5, k = 3)", soft(rng.normal(size=(10, 4))), 1.0),
        ("N=64, e=8, c=2, a router skewed to E0 (k = 16)", soft(rng.normal(size=(64, 8)) + np.linspace(1, -1, 8)), 2.0),
        ("N=12, e=3, c=1, scores rounded to 1 decimal: ties (k = 4)", soft(rng.normal(size=(12, 3))).round(1), 1.0),
    ]


def _cutoff_if(P, c, rule):
    """The cutoffs a (wrong) rule gives, for naming the student's mistake; None where undefined."""
    N, e = P.shape
    k = R.expert_capacity(N, e, c)
    col = -np.sort(-P, axis=0)                                   # [N, e] each column best first
    if rule == "quantile":
        return np.quantile(P, 1 - c / e, axis=0)
    if rule == "lowest":
        return np.sort(P, axis=0)[k - 1]
    if rule == "off by one":
        return col[k] if k < N else None
    if rule == "floor":
        return col[max(int(N * c // e), 1) - 1]
    raise ValueError(rule)


CUTOFF_HINTS = {
    "quantile": "np.quantile(P, 1 - c/e) INTERPOLATES between two scores, so its cutoff is a score no token has "
                "(and N·c/e need not be whole). ET's cutoff is expert choice's: the k-th best score itself, "
                "k = ceil(N·c/e): -np.sort(-P, axis=0)[k - 1]. The quantile is the idea, the k-th best the number.",
    "lowest": "yours is each expert's k-th LOWEST score; the cutoff is the k-th HIGHEST (the score of the last "
              "token expert choice would keep). Sort descending.",
    "off by one": "off by one: yours is the (k+1)-th best score, the first token expert choice LEAVES OUT. "
                  "Python counts from 0: the k-th best is row k - 1.",
    "floor": "you rounded N·c/e down; ET uses expert choice's bucket, k = expert_capacity(N, e, c) = "
             "ceil(N·c/e), clipped to [1, N].",
}


@check
def check_et_cutoff(fn):
    """fn(P, c) -> cutoff [e]: each expert's k-th best score over the N tokens, k = expert_capacity(N, e, c)."""
    cases = cutoff_cases()
    runs = []
    for label, P, c in cases:
        N, e = P.shape
        got = to_numpy(attempt(fn, P.copy(), c)).astype(float)
        if got.shape != (e,):
            if got.shape == (N,):
                return wrong(f"on {label}: one cutoff per EXPERT, shape [e] = [{e}]; yours has one per token "
                             f"({N}). Rank each column P[:, i] (axis 0), not each token's row.")
            return wrong(f"on {label}: the cutoff must have shape [e] = [{e}], yours is {got.shape}.")
        runs.append((label, P, c, got))
    bad = [r for r in runs if not np.allclose(r[3], R.expert_threshold_cutoff(r[1], r[2]), rtol=1e-12, atol=0)]
    if not bad:
        return right(f"the cutoffs match R.expert_threshold_cutoff on {len(cases)} forwards, ties included. Each "
                     f"is the score of the last token expert choice would keep: ET's tau is their EMA.")
    label, P, c, got = bad[0]
    want = R.expert_threshold_cutoff(P, c)
    k = R.expert_capacity(*P.shape, c)
    head = f"on {label}: the cutoffs should be {want.round(4).tolist()}, yours {got.round(4).tolist()}"
    for rule, hint in CUTOFF_HINTS.items():
        def same(P_, c_, g_):
            other = _cutoff_if(P_, c_, rule)
            return other is not None and np.allclose(g_, other, rtol=1e-12, atol=0)
        if all(same(P_, c_, g_) for _, P_, c_, g_ in runs):
            return wrong(f"{head}: {hint}")
    return wrong(f"{head}: each expert's {k}-th best score, k = ceil(N·c/e).")


def bias_cases():
    """(label, bias [e], loads [e], u): skewed loads, loads equal to the mean, a bias that is not 0."""
    rng = np.random.default_rng(717)
    return [
        ("a skewed step: loads [40, 20, 12, 8], b = 0, u = 0.01", np.zeros(4), np.array([40., 20., 12., 8.]), 0.01),
        ("E1 and E2 exactly at the mean load 16: loads [30, 16, 16, 2], u = 0.001",
         np.array([0.02, -0.01, 0.0, -0.01]), np.array([30., 16., 16., 2.]), 0.001),
        ("8 experts, random loads, a learned b, u = 0.003", rng.normal(0, 0.02, size=8),
         rng.integers(0, 60, size=8).astype(float), 0.003),
        ("balanced loads [10, 10, 10]: nothing to do, u = 0.01", np.array([0.01, 0.0, -0.01]), np.full(3, 10.0), 0.01),
    ]


@check
def check_bias_update(fn):
    """fn(b, loads, u) -> new b: b_i + u·sign(mean load - load_i), then the update's mean subtracted."""
    cases = bias_cases()
    for label, b, load, u in cases:
        e = len(b)
        want = R.lossfree_bias_update(b, load, u)
        got = to_numpy(attempt(fn, b.copy(), load.copy(), u)).astype(float)
        if got.shape != (e,):
            return wrong(f"on {label}: the new bias has one entry per expert, shape [{e}], yours {got.shape}.")
        if np.allclose(got, want, rtol=1e-12, atol=1e-15):
            continue
        step, step_ref = got - b, want - b
        busiest = int(np.argmax(load))
        raw = u * np.sign(load.mean() - load)
        if step[busiest] > 0 and step_ref[busiest] < 0:
            return wrong(f"on {label}: E{busiest} has the most tokens ({load[busiest]:g}) and yours RAISES its "
                         f"bias, so even more tokens pick it. Overloaded experts go down: "
                         f"b_i += u·sign(mean load - load_i).")
        if np.allclose(got, b + raw, rtol=1e-12, atol=1e-15):
            return wrong(f"on {label}: the right signs, but subtract the mean of the update (torchtitan's centring, "
                         f"as R.lossfree_bias_update): it keeps the mean of b fixed, {b.mean():.4g} here, yours "
                         f"moves it to {got.mean():.4g}.")
        prop = u * (load.mean() - load)
        if np.allclose(step, prop - prop.mean(), rtol=1e-9) or np.allclose(step, prop, rtol=1e-9):
            return wrong(f"on {label}: your step is proportional to the load gap; the rule takes only its SIGN, "
                         f"so every expert moves by exactly u = {u:g} (before centring), however large the gap.")
        if np.allclose(step, np.sign(load.mean() - load) - np.sign(load.mean() - load).mean(), rtol=1e-9):
            return wrong(f"on {label}: you forgot the rate u = {u:g}: each step moves b_i by u·sign(...), not by 1.")
        return wrong(f"on {label}: the new bias should be {want.round(5).tolist()}, yours {got.round(5).tolist()}. "
                     f"delta = u·sign(mean load - load); b + (delta - mean(delta)).")
    return right(f"the bias matches R.lossfree_bias_update on {len(cases)} steps, loads at the mean (sign 0) and "
                 f"balanced loads included. Only the bias moves, never the gates.")
