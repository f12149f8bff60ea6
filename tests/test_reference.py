"""Properties of the NumPy reference (reference_numpy.py), written from the design decisions (README, "Decisions where the paper is silent").

Read top to bottom, this file is the list of facts the reference promises:

1. hand-checkable cases (n=6 tokens, e=3 experts) with literal expected G, I and output;
2. properties over random shapes and seeds (hypothesis / parametrize);
3. regression tests for bugs seen in other MoE implementations;
4. every bad input raises a ValueError that names the offending argument;
5. the same results on CuPy arrays (GPU only, skipped cleanly elsewhere).

Every oracle here is written independently of the reference: a plain loop, a stable sort, or
scipy (softmax, logsumexp, linprog). Whole file: a few seconds on 2 CPU cores.
"""
import inspect
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog
from scipy.special import logsumexp, softmax

import reference_numpy as ref
from conftest import requires_cupy

FAST = settings(max_examples=40, deadline=None, derandomize=True)


# ---------------------------------------------------------------------------------------------
# Independent oracles
# ---------------------------------------------------------------------------------------------
def gelu_tanh(u):
    """gelu_tanh(u) = 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))), as in the README."""
    return 0.5 * u * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))


def random_probs(rng, n, e, temperature=1.0):
    """Router-like probabilities: softmax of Gaussian logits (rows sum to 1, ties have prob 0)."""
    return softmax(rng.standard_normal((n, e)) / temperature, axis=1)


def ec_oracle(probs, k):
    """Eq. 2 by definition: stable descending sort of each column (ties -> lower token index)."""
    I = np.argsort(-probs.T, axis=1, kind="stable")[:, :k]  # [e, k]
    G = np.take_along_axis(probs.T, I, axis=1)  # [e, k]
    return G, I


def token_choice_oracle(probs, top_k, capacity):
    """First-come-first-served claiming: all 1st choices in token order, then all 2nd, ..."""
    n, e = probs.shape
    choice = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]  # [n, top_k], ties lower expert
    top = np.take_along_axis(probs, choice, axis=1)
    gate = top if top_k == 1 else top / top.sum(axis=1, keepdims=True)  # renormalise before drops
    G = np.zeros((e, capacity))
    I = np.full((e, capacity), -1, dtype=np.int64)
    fill = np.zeros(e, dtype=int)
    for r in range(top_k):
        for t in range(n):
            i = choice[t, r]
            if fill[i] < capacity:
                I[i, fill[i]], G[i, fill[i]] = t, gate[t, r]
                fill[i] += 1
    return G, I


def moe_oracle(x, gates, token_index, w_in, w_out):
    """y[t] = sum over slots (i, j) naming t of G[i,j] * gelu(x[t] @ W_in[i]) @ W_out[i] (loops)."""
    y = np.zeros_like(x, dtype=np.float64)
    e, s = token_index.shape
    for i in range(e):
        for j in range(s):
            t = token_index[i, j]
            if t >= 0:
                y[t] += gates[i, j] * (gelu_tanh(x[t] @ w_in[i]) @ w_out[i])
    return y


def global_pair_order(A, probs):
    """Pairs (expert, token) by decreasing A; ties: higher prob, lower expert, lower token."""
    e, n = A.shape
    expert, token = np.meshgrid(np.arange(e), np.arange(n), indexing="ij")
    S = probs.T
    order = np.lexsort((token.ravel(), expert.ravel(), -S.ravel(), -A.ravel()))  # last key first
    return expert.ravel()[order], token.ravel()[order]


def greedy_oracle(A, probs, k, b):
    """Greedy b-matching: accept a pair if the expert holds < k tokens and the token < b experts."""
    e, n = A.shape
    I = np.full((e, k), -1, dtype=np.int64)
    G = np.zeros((e, k))
    per_expert, per_token = np.zeros(e, dtype=int), np.zeros(n, dtype=int)
    for i, t in zip(*global_pair_order(A, probs)):
        if per_expert[i] < k and per_token[t] < b:
            I[i, per_expert[i]], G[i, per_expert[i]] = t, probs[t, i]
            per_expert[i] += 1
            per_token[t] += 1
    return G, I


def deferred_acceptance_oracle(A, probs, k, b):
    """Expert-proposing deferred acceptance; tokens keep their best b proposals (global order)."""
    e, n = A.shape
    ex, tok = global_pair_order(A, probs)
    rank = np.empty((e, n), dtype=int)
    rank[ex, tok] = np.arange(e * n)
    prefs = [list(tok[ex == i]) for i in range(e)]  # each expert's tokens, best first
    nxt = [0] * e
    held = [set() for _ in range(n)]  # experts a token currently holds
    n_held = [0] * e
    free = [i for i in range(e)]
    while free:
        i = free.pop()
        while n_held[i] < k and nxt[i] < n:
            t = prefs[i][nxt[i]]
            nxt[i] += 1
            held[t].add(i)
            n_held[i] += 1
            if len(held[t]) > b:  # reject the worst proposal this token holds
                worst = max(held[t], key=lambda j: rank[j, t])
                held[t].remove(worst)
                n_held[worst] -= 1
                if worst != i:
                    free.append(worst)
    chosen = [[t for t in range(n) if i in held[t]] for i in range(e)]
    return [sorted(c, key=lambda t: rank[i, t]) for i, c in enumerate(chosen)]


def lp_optimum(probs, k, b, rows_equal=True):
    """Exact LP optimum of max <S^T, A> s.t. row sums = k (or <= k), col sums <= b, 0 <= A <= 1."""
    n, e = probs.shape
    c = -probs.T.ravel()  # A is [e, n] flattened row-major
    rows = np.kron(np.eye(e), np.ones((1, n)))  # [e, e*n]
    cols = np.kron(np.ones((1, e)), np.eye(n))  # [n, e*n]
    if rows_equal:
        res = linprog(c, A_ub=cols, b_ub=np.full(n, b), A_eq=rows, b_eq=np.full(e, k),
                      bounds=(0, 1), method="highs")
    else:
        res = linprog(c, A_ub=np.vstack([cols, rows]), b_ub=np.r_[np.full(n, b), np.full(e, k)],
                      bounds=(0, 1), method="highs")
    assert res.status == 0
    return -res.fun


def chosen_score(probs, token_index):
    """Sum of probs over the chosen (token, expert) pairs; empty slots (-1) count nothing."""
    e = token_index.shape[0]
    expert = np.broadcast_to(np.arange(e)[:, None], token_index.shape)
    m = token_index >= 0
    return probs[token_index[m], expert[m]].sum()


def default(fn, name):
    return inspect.signature(fn).parameters[name].default


# =============================================================================================
# 1. Hand-checkable cases (verify on paper)
# =============================================================================================
# Six tokens, three experts; every row sums to 1 and the values that matter are distinct.
P_HAND = np.array([
    #  e0    e1    e2        first choice, second choice
    [0.50, 0.30, 0.20],  # t0: e0, e1
    [0.10, 0.60, 0.30],  # t1: e1, e2
    [0.20, 0.10, 0.70],  # t2: e2, e0
    [0.45, 0.35, 0.20],  # t3: e0, e1
    [0.55, 0.10, 0.35],  # t4: e0, e2
    [0.35, 0.50, 0.15],  # t5: e1, e0
])


def test_hand_bucket_size():
    """k = expert_capacity(n=6, e=3, c=1) = ceil(6*1/3) = 2 for the hand case."""
    assert ref.expert_capacity(6, 3, 1.0) == 2


def test_hand_expert_choice():
    """EC k=2 on P_HAND: each expert keeps the two highest entries of its column, best first."""
    G, I = ref.expert_choice(P_HAND, 2)
    # e0 column [.50 .10 .20 .45 .55 .35] -> t4 (.55), t0 (.50)
    # e1 column [.30 .60 .10 .35 .10 .50] -> t1 (.60), t5 (.50)
    # e2 column [.20 .30 .70 .20 .35 .15] -> t2 (.70), t4 (.35)
    # Token 3 is picked by nobody (zero MoE output); token 4 is picked by two experts.
    np.testing.assert_array_equal(I, [[4, 0], [1, 5], [2, 4]])
    np.testing.assert_array_equal(G, [[0.55, 0.50], [0.60, 0.50], [0.70, 0.35]])
    assert I.dtype == np.int64 and I.shape == G.shape == (3, 2)


def test_hand_moe_ffn():
    """moe_ffn on the hand routing, d=f=2: literal output, a token picked twice sums both."""
    G, I = ref.expert_choice(P_HAND, 2)
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -2.0], [-1.0, 0.0], [0.5, 0.5]])
    # W_in[i] = [[1,0],[1,0]]  -> h = x @ W_in[i] = [x0 + x1, 0]   (sums: 1, 1, 2, 1, -1, 1)
    # W_out[i] = [[0, i+1],[0, 0]] -> gelu(h) @ W_out[i] = [0, (i+1) * gelu(x0 + x1)]
    # (both matrices are asymmetric, so a transposed weight gives a different answer)
    w_in = np.tile(np.array([[1.0, 0.0], [1.0, 0.0]]), (3, 1, 1))
    w_out = np.stack([np.array([[0.0, i + 1.0], [0.0, 0.0]]) for i in range(3)])
    g1, g2, gm1 = 0.8411919906082768, 1.954597694087775, -0.15880800939172324  # gelu_tanh(1, 2, -1)
    expected = np.array([
        [0.0, 0.5 * 1 * g1],                # t0: e0, gate .50            =  0.42059599530413840
        [0.0, 0.6 * 2 * g1],                # t1: e1, gate .60            =  1.00943038872993200
        [0.0, 0.7 * 3 * g2],                # t2: e2, gate .70            =  4.10465515758432800
        [0.0, 0.0],                         # t3: no expert chose it      =  0
        [0.0, 0.55 * 1 * gm1 + 0.35 * 3 * gm1],  # t4: e0 .55*1 + e2 .35*3 = 1.6*gelu(-1)
        [0.0, 0.5 * 2 * g1],                # t5: e1, gate .50            =  0.84119199060827680
    ])
    np.testing.assert_allclose(expected[:, 1], [0.4205959953041384, 1.009430388729932,
                                                4.104655157584328, 0.0, -0.2540928150267572,
                                                0.8411919906082768], rtol=1e-15)
    y = ref.moe_ffn(x, G, I, w_in, w_out)
    assert y.shape == (6, 2)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-15)


def test_hand_gelu_is_tanh_approximation():
    """The expert nonlinearity is gelu_tanh (0.84119...), not the erf GELU (0.84134...)."""
    x = np.array([[1.0]])
    y = ref.moe_ffn(x, np.array([[1.0]]), np.array([[0]]), np.ones((1, 1, 1)), np.ones((1, 1, 1)))
    np.testing.assert_allclose(y, [[0.8411919906082768]], rtol=1e-12)


def test_hand_token_choice_top1():
    """Top-1, capacity 2: e0 is wanted by t0, t3, t4 -> t4 (third in token order) is dropped."""
    G, I = ref.token_choice(P_HAND, top_k=1, capacity=2)
    # first choices: t0->e0, t1->e1, t2->e2, t3->e0, t4->e0 (full: dropped), t5->e1
    np.testing.assert_array_equal(I, [[0, 3], [1, 5], [2, -1]])
    np.testing.assert_array_equal(G, [[0.50, 0.45], [0.60, 0.50], [0.70, 0.0]])  # raw probs


def test_hand_token_choice_top2():
    """Top-2, capacity 2: all first choices claim before any second choice, each in token order."""
    G, I = ref.token_choice(P_HAND, top_k=2, capacity=2)
    # pass 1 (first choices) as top-1: e0 <- t0, t3 (t4 dropped); e1 <- t1, t5; e2 <- t2
    # pass 2 (second choices, token order): t0->e1 full, t1->e2 ACCEPTED (slot 1), t2->e0 full
    #   (lost to t3's FIRST choice although t2 comes first), t3->e1 full, t4->e2 full, t5->e0 full
    # Token 4 gets no expert at all.
    np.testing.assert_array_equal(I, [[0, 3], [1, 5], [2, 1]])
    # gates: each token's top-2 renormalised to sum 1 (before drops):
    #   t0 .50/.80 = .625, t3 .45/.80 = .5625, t1 .60/.90 = 2/3, t5 .50/.85 = 10/17,
    #   t2 .70/.90 = 7/9, t1's second choice .30/.90 = 1/3
    np.testing.assert_allclose(G, [[0.625, 0.5625], [2 / 3, 10 / 17], [7 / 9, 1 / 3]], rtol=1e-12)


def test_hand_token_choice_depends_on_token_order():
    """Token choice is first-come-first-served: reversing the tokens changes who is dropped."""
    _, I = ref.token_choice(P_HAND[::-1].copy(), top_k=1, capacity=2)
    # reversed order: t4 (now row 1) and t3 (row 2) claim e0 first; t0 (row 5) is dropped
    np.testing.assert_array_equal(I[0], [1, 2])


def test_hand_load_balancing_loss():
    """Switch loss on P_HAND: e * sum f_i P_i = 3 * (3*2.15 + 2*1.95 + 1*1.90) / 36 = 49/48."""
    # first choices: e0 <- t0, t3, t4; e1 <- t1, t5; e2 <- t2  -> f = [3, 2, 1] / 6
    # column sums 2.15, 1.95, 1.90 -> P = [2.15, 1.95, 1.90] / 6
    np.testing.assert_allclose(ref.load_balancing_loss(P_HAND), 49 / 48, rtol=1e-12)


def test_hand_router_probs_and_z_loss():
    """logits [0, ln 3] -> probs [1/4, 3/4]; logits [0,0,0,0] -> z-loss (ln 4)^2."""
    p = ref.router_probs(np.array([[1.0]]), np.array([[0.0, math.log(3.0)]]))
    np.testing.assert_allclose(p, [[0.25, 0.75]], rtol=1e-12)
    np.testing.assert_allclose(ref.router_z_loss(np.zeros((1, 4))), math.log(4.0) ** 2, rtol=1e-12)


# (n_tokens, n_experts, capacity_factor) -> k, one row per rule in the README
CAPACITY_TABLE = [
    (8, 4, 2.0, 4),      # exact: 8*2/4 = 4
    (6, 3, 1.0, 2),      # the hand case
    (10, 4, 1.0, 3),     # 2.5 rounds UP to 3 (flaxformer's round() would give 2)
    (10, 3, 2.0, 7),     # 6.67 -> 7
    (50, 5, 1.1, 11),    # 50*1.1/5 = 11.000000000000002 in floats: robust ceil gives 11, not 12
    (25, 5, 2.2, 11),    # same float trap
    (4, 8, 1.0, 1),      # 0.5 -> 1
    (1, 64, 0.5, 1),     # 1/128 would be k = 0 in the paper: clipped up to 1
    (2, 8, 1e-9, 1),     # round(2.5e-10, 9) = 0 -> ceil 0: the only way to need the clip to 1
    (4, 2, 4.0, 4),      # 8 > n: clipped down to n = 4
    (5, 1, 2.0, 5),      # 10 > n: clipped to 5
    (64, 8, 2.0, 16),    # = flaxformer round(2*64/8) = 16 and praxis floor(64/8)*2 = 16
    (4096, 64, 2.0, 128),  # flaxformer's default group size
    (32, 8, 1.0, 4),     # = flaxformer round(32/8) = 4 (its minimum)
    (48, 6, 1.0, 8),     # = praxis floor(48/6)*1
    (1024, 64, 0.5, 8),  # EC-CF0.5
]


@pytest.mark.parametrize("n,e,c,k", CAPACITY_TABLE)
def test_expert_capacity_table(n, e, c, k):
    """expert_capacity = ceil(round(n*c/e, 9)) clipped to [1, n], as a literal table."""
    got = ref.expert_capacity(n, e, c)
    assert got == k and isinstance(got, (int, np.integer))


# =============================================================================================
# 2. Properties over random shapes and seeds
# =============================================================================================
@FAST
@given(n=st.integers(1, 300), e=st.integers(1, 64),
       c=st.sampled_from([0.125, 0.5, 1.0, 1.1, 1.25, 2.0, 2.2, 3.0, 4.0, 10.0]))
def test_expert_capacity_properties(n, e, c):
    """1 <= k <= n, and k = min(n, ceil(n*c/e)) so e*k >= n*c unless clipped to n."""
    k = ref.expert_capacity(n, e, c)
    assert 1 <= k <= n
    assert k == min(n, max(1, math.ceil(round(n * c / e, 9))))
    if k < n:
        assert e * k >= n * c - 1e-9


@pytest.mark.parametrize("e", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("c", [1, 2, 3])
def test_expert_capacity_matches_praxis_and_flaxformer(e, c):
    """When e | n: k = praxis floor(n/e)*c; when n*c/e is an integer >= 4: k = flaxformer round."""
    for n in range(e, 40 * e + 1, e):
        if c > e:
            continue  # then n*c/e > n and our k is clipped to n
        k = ref.expert_capacity(n, e, float(c))
        assert k == (n // e) * c
        if n * c / e >= 4:
            assert k == max(4, round(c * n / e))


@FAST
@given(n=st.integers(1, 24), e=st.integers(1, 6), seed=st.integers(0, 2**31), data=st.data())
def test_expert_choice_is_stable_topk_of_each_column(n, e, seed, data):
    """Each expert takes exactly k distinct tokens: a stable descending sort of its column."""
    k = data.draw(st.integers(1, n))
    probs = random_probs(np.random.default_rng(seed), n, e)
    G, I = ref.expert_choice(probs, k)
    Gx, Ix = ec_oracle(probs, k)
    assert I.shape == G.shape == (e, k) and I.dtype == np.int64
    np.testing.assert_array_equal(I, Ix)
    for i in range(e):
        assert len(set(I[i].tolist())) == k  # k distinct tokens
    np.testing.assert_array_equal(G, probs[I, np.arange(e)[:, None]])  # gates = raw probs


@FAST
@given(n=st.integers(1, 24), e=st.integers(1, 6), seed=st.integers(0, 2**31),
       levels=st.integers(1, 4), data=st.data())
def test_expert_choice_ties_go_to_lower_token_index(n, e, seed, levels, data):
    """Exact ties (probs on a coarse grid) are broken toward the lower token index."""
    k = data.draw(st.integers(1, n))
    probs = np.random.default_rng(seed).integers(0, levels + 1, size=(n, e)) / levels  # many ties
    G, I = ref.expert_choice(probs, k)
    np.testing.assert_array_equal(I, ec_oracle(probs, k)[1])
    np.testing.assert_array_equal(G, ec_oracle(probs, k)[0])


def test_expert_choice_all_tied_takes_first_k_tokens():
    """A column of equal probs gives tokens 0..k-1 in order to every expert."""
    _, I = ref.expert_choice(np.full((5, 3), 1 / 3), 3)
    np.testing.assert_array_equal(I, [[0, 1, 2]] * 3)


@pytest.mark.parametrize("seed", range(4))
def test_moe_ffn_matches_loop_formula(seed):
    """moe_ffn = the slot-by-slot loop of the README (EC and token-choice routings, float64)."""
    rng = np.random.default_rng(seed)
    n, e, d, f = 10, 4, 3, 5
    x = rng.standard_normal((n, d))
    w_in, w_out = rng.standard_normal((e, d, f)), rng.standard_normal((e, f, d))
    probs = random_probs(rng, n, e)
    for G, I in (ref.expert_choice(probs, 4), ref.token_choice(probs, top_k=2, capacity=3)):
        np.testing.assert_allclose(ref.moe_ffn(x, G, I, w_in, w_out),
                                   moe_oracle(x, G, I, w_in, w_out), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_moe_ffn_invariant_to_slot_order(seed):
    """Permuting the slots within each expert (G and I together) leaves the output unchanged."""
    rng = np.random.default_rng(seed)
    n, e, d, f, k = 12, 3, 4, 6, 5
    x = rng.standard_normal((n, d))
    w_in, w_out = rng.standard_normal((e, d, f)), rng.standard_normal((e, f, d))
    G, I = ref.expert_choice(random_probs(rng, n, e), k)
    perm = np.stack([rng.permutation(k) for _ in range(e)])  # a different permutation per expert
    Gp, Ip = np.take_along_axis(G, perm, 1), np.take_along_axis(I, perm, 1)
    np.testing.assert_allclose(ref.moe_ffn(x, Gp, Ip, w_in, w_out),
                               ref.moe_ffn(x, G, I, w_in, w_out), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_permuting_tokens_permutes_routing_and_output(seed):
    """With distinct probs, EC routing + moe_ffn is token-permutation equivariant."""
    rng = np.random.default_rng(seed)
    n, e, d, f, k = 16, 4, 3, 4, 6
    x = rng.standard_normal((n, d))
    w_router = rng.standard_normal((d, e))
    w_in, w_out = rng.standard_normal((e, d, f)), rng.standard_normal((e, f, d))

    def route_and_run(x):
        G, I = ref.expert_choice(ref.router_probs(x, w_router), k)
        return G, I, ref.moe_ffn(x, G, I, w_in, w_out)

    G, I, y = route_and_run(x)
    perm = rng.permutation(n)
    inv = np.argsort(perm)  # token t sits at position inv[t] after permuting
    Gp, Ip, yp = route_and_run(x[perm])
    np.testing.assert_array_equal(Ip, inv[I])
    np.testing.assert_allclose(Gp, G, rtol=1e-12)
    np.testing.assert_allclose(yp, y[perm], rtol=1e-12, atol=1e-12)


@FAST
@given(n=st.integers(1, 20), e=st.integers(1, 8), d=st.integers(1, 5),
       scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]), seed=st.integers(0, 2**31))
def test_router_probs_is_softmax_over_experts(n, e, d, scale, seed):
    """router_probs = softmax(x @ W_g) over experts: finite, rows sum to 1, even for huge logits."""
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((n, d)) * scale, rng.standard_normal((d, e))
    p = ref.router_probs(x, w)
    assert p.shape == (n, e) and np.all(np.isfinite(p)) and np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(p, softmax(x @ w, axis=1), rtol=1e-9, atol=1e-300)


@FAST
@given(n=st.integers(1, 20), e=st.integers(1, 8), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       seed=st.integers(0, 2**31))
def test_router_z_loss_matches_formula(n, e, scale, seed):
    """router_z_loss = mean over tokens of logsumexp(logits)^2 (no overflow at logits ~ 1e3)."""
    logits = np.random.default_rng(seed).standard_normal((n, e)) * scale
    np.testing.assert_allclose(ref.router_z_loss(logits), np.mean(logsumexp(logits, axis=1) ** 2),
                               rtol=1e-10)


@FAST
@given(n=st.integers(1, 20), e=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_load_balancing_loss_matches_formula(n, e, seed):
    """load_balancing_loss = e * sum_i f_i * P_i with f from argmax first choices."""
    probs = random_probs(np.random.default_rng(seed), n, e)
    f = np.bincount(np.argmax(probs, axis=1), minlength=e) / n
    np.testing.assert_allclose(ref.load_balancing_loss(probs), e * np.sum(f * probs.mean(0)),
                               rtol=1e-12)


@pytest.mark.parametrize("e,m", [(2, 3), (4, 5), (8, 2)])
def test_load_balancing_loss_is_one_when_balanced(e, m):
    """Equal first-choice counts (f_i = 1/e) give exactly 1.0 for any probs (sum_i P_i = 1)."""
    rng = np.random.default_rng(e * m)
    probs = random_probs(rng, e * m, e)
    for t in range(e * m):  # move each token's largest prob to expert t % e
        a, want = np.argmax(probs[t]), t % e
        probs[t, [a, want]] = probs[t, [want, a]]
    np.testing.assert_allclose(ref.load_balancing_loss(probs), 1.0, rtol=1e-12)


@pytest.mark.parametrize("e", [1, 2, 4, 8])
def test_load_balancing_loss_is_e_when_collapsed(e):
    """All tokens on one expert with prob 1 gives e (the maximum)."""
    probs = np.zeros((7, e))
    probs[:, e - 1] = 1.0
    np.testing.assert_allclose(ref.load_balancing_loss(probs), float(e), rtol=1e-12)


def test_load_balancing_loss_breaks_ties_to_lower_expert():
    """A token tied between e0 and e1 counts as a first choice of e0."""
    probs = np.array([[0.4, 0.4, 0.2], [0.1, 0.2, 0.7]])
    # f = [1/2, 0, 1/2], P = [.25, .30, .45] -> 3 * (.5*.25 + .5*.45) = 1.05 (e1 would give 1.125)
    np.testing.assert_allclose(ref.load_balancing_loss(probs), 1.05, rtol=1e-12)


@FAST
@given(n=st.integers(1, 24), e=st.integers(1, 6), capacity=st.integers(1, 10),
       seed=st.integers(0, 2**31), ties=st.booleans(), data=st.data())
def test_token_choice_is_first_come_first_served(n, e, capacity, seed, ties, data):
    """Token choice = the FCFS loop: 1st choices in token order, then 2nd, ...; drops beyond cap."""
    top_k = data.draw(st.integers(1, e))
    rng = np.random.default_rng(seed)
    probs = random_probs(rng, n, e)
    if ties:  # coarse grid with exact ties inside rows (ties -> lower expert index first)
        probs = (np.round(probs * 4) + 1) / (4 + e)
    G, I = ref.token_choice(probs, top_k=top_k, capacity=capacity)
    Gx, Ix = token_choice_oracle(probs, top_k, capacity)
    assert I.shape == G.shape == (e, capacity) and I.dtype == np.int64
    np.testing.assert_array_equal(I, Ix)
    np.testing.assert_allclose(G, Gx, rtol=1e-12, atol=0)
    # capacity is never exceeded, a token holds each expert at most once and <= top_k experts
    for i in range(e):
        kept = I[i][I[i] >= 0]
        assert len(set(kept.tolist())) == len(kept) <= capacity
        assert np.all(I[i][len(kept):] == -1) and np.all(G[i][len(kept):] == 0)  # empties at end
    assert np.all(np.bincount(I[I >= 0], minlength=n) <= top_k)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_token_choice_gates(top_k):
    """Top-1 gates are raw probs; top-k>=2 gates are the token's top-k probs renormalised."""
    rng = np.random.default_rng(top_k)
    probs = random_probs(rng, 9, 4)
    G, I = ref.token_choice(probs, top_k=top_k, capacity=9)  # room for every claim: no drops
    assert np.all(np.bincount(I[I >= 0], minlength=9) == top_k)  # nothing dropped
    top = np.sort(probs, axis=1)[:, ::-1][:, :top_k]
    for i, j in zip(*np.nonzero(I >= 0)):
        t = I[i, j]
        want = probs[t, i] if top_k == 1 else probs[t, i] / top[t].sum()
        np.testing.assert_allclose(G[i, j], want, rtol=1e-12)
    if top_k >= 2:  # each token's gates sum to 1 when nothing was dropped
        sums = np.bincount(I[I >= 0], weights=G[I >= 0], minlength=9)
        np.testing.assert_allclose(sums, 1.0, rtol=1e-12)


def gshard_oracle(probs, capacity, u, threshold=0.2):
    """GShard top-2 as a loop: t's 2nd choice claims only if u[t] < g2/threshold (g2 renormalised)."""
    n, e = probs.shape
    choice = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    top = np.take_along_axis(probs, choice, axis=1)
    gate = top / top.sum(axis=1, keepdims=True)
    G, I, fill = np.zeros((e, capacity)), np.full((e, capacity), -1, dtype=np.int64), np.zeros(e, dtype=int)
    for r in range(2):
        for t in range(n):
            i = choice[t, r]
            if r == 1 and not u[t] < gate[t, 1] / threshold:
                continue  # the skipped second choice claims nothing
            if fill[i] < capacity:
                I[i, fill[i]], G[i, fill[i]] = t, gate[t, r]
                fill[i] += 1
    return G, I


def test_hand_token_choice_gshard_skipped_second_claims_no_capacity():
    """GShard top-2, capacity 1: t0's skipped second choice leaves e1's slot to t1's second choice."""
    probs = np.array([[0.85, 0.10, 0.05], [0.60, 0.35, 0.05], [0.05, 0.15, 0.80]])
    u = np.array([0.9, 0.0, 0.0])
    G, I = ref.token_choice(probs, 2, 1, second_uniform=u)
    # g2 = .10/.95 = .105 (keep iff u < .526: t0 skips), .35/.95 = .368 (always), .15/.95 = .158
    # 1st: t0->e0, t1->e0 full, t2->e2.  2nd: t0 skipped, t1->e1 ACCEPTED, t2->e1 full
    np.testing.assert_array_equal(I, [[0], [1], [2]])
    np.testing.assert_allclose(G, [[0.85 / 0.95], [0.35 / 0.95], [0.80 / 0.95]], rtol=1e-12)  # g1 stays renormalised
    _, I_top2 = ref.token_choice(probs, 2, 1)
    np.testing.assert_array_equal(I_top2, [[0], [0], [2]])  # plain top-2: t0's second takes e1


@FAST
@given(n=st.integers(1, 24), e=st.integers(2, 6), capacity=st.integers(1, 10),
       seed=st.integers(0, 2**31), threshold=st.sampled_from([0.05, 0.2, 0.5, 1.0, 3.0]))
def test_token_choice_gshard_equals_loop(n, e, capacity, seed, threshold):
    """GShard's random second expert = the FCFS loop that skips 2nd choices with u >= g2/threshold."""
    rng = np.random.default_rng(seed)
    probs, u = random_probs(rng, n, e), rng.random(n)
    G, I = ref.token_choice(probs, 2, capacity, second_uniform=u, second_threshold=threshold)
    Gx, Ix = gshard_oracle(probs, capacity, u, threshold)
    np.testing.assert_array_equal(I, Ix)
    np.testing.assert_allclose(G, Gx, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", range(3))
def test_token_choice_gshard_extreme_uniforms(seed):
    """u = 0 keeps every second choice (= top-2); u just below 1 keeps it only where g2 >= threshold."""
    rng = np.random.default_rng(seed)
    n, e = 40, 4
    probs = random_probs(rng, n, e)
    top2 = ref.token_choice(probs, 2, n)
    zero = ref.token_choice(probs, 2, n, second_uniform=np.zeros(n))
    np.testing.assert_array_equal(zero[1], top2[1])
    np.testing.assert_array_equal(zero[0], top2[0])
    G, I = ref.token_choice(probs, 2, n, second_uniform=np.full(n, np.nextafter(1.0, 0.0)))
    top = np.sort(probs, axis=1)[:, ::-1][:, :2]
    g2 = top[:, 1] / top.sum(axis=1)
    assert 0 < (g2 >= 0.2).sum() < n  # both cases occur
    np.testing.assert_array_equal(np.bincount(I[I >= 0], minlength=n), 1 + (g2 >= 0.2))


def test_token_choice_capacity_n_is_dropless():
    """Top-2 with capacity = n (dropless top-2) never drops: every token holds exactly 2 experts."""
    probs = random_probs(np.random.default_rng(5), 30, 4, temperature=0.1)  # very unbalanced
    _, I_capped = ref.token_choice(probs, 2, ref.expert_capacity(30, 4, 2.0))
    assert (I_capped >= 0).sum() < 60  # the capped top-2 does drop here
    _, I = ref.token_choice(probs, 2, 30)
    np.testing.assert_array_equal(np.bincount(I[I >= 0], minlength=30), 2)


# ---------------------------------------------------------------------------------------------
# EC-CAP: solver, rounding, cap, LP oracle
# ---------------------------------------------------------------------------------------------
CAPPED_CASES = [  # (n, e, c, b): c <= b so the LP is feasible; c == b is the tight case
    (16, 4, 1, 2), (16, 4, 1, 3), (24, 4, 1, 2), (32, 4, 1, 3),
    (16, 4, 2, 2), (32, 4, 2, 2), (32, 4, 2, 3), (24, 6, 2, 3),
]


def capped_problem(n, e, c, b, seed):
    probs = random_probs(np.random.default_rng(1000 + seed), n, e, temperature=0.5)
    return probs, ref.expert_capacity(n, e, float(c)), b


def check_capped_routing(probs, k, b, G, I):
    """<= b experts per token, <= k distinct tokens per expert, gates = raw probs, maximal."""
    n, e = probs.shape
    assert I.shape == G.shape == (e, k) and I.dtype == np.int64
    per_token = np.bincount(I[I >= 0], minlength=n)
    assert per_token.max() <= b  # the cap holds exactly, for every token
    for i in range(e):
        kept = I[i][I[i] >= 0]
        assert len(set(kept.tolist())) == len(kept) <= k
        assert np.all(I[i][len(kept):] == -1) and np.all(G[i][len(kept):] == 0)  # empties at end
        np.testing.assert_array_equal(G[i][: len(kept)], probs[kept, i])
        if len(kept) < k:  # maximal: every token this expert lacks is already at the cap
            missing = np.setdiff1d(np.arange(n), kept)
            assert np.all(per_token[missing] == b)
    if b * (n - k + 1) >= e * k:  # then an unfilled expert would force > e*k assignments
        assert np.all(I >= 0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n,e,c,b", CAPPED_CASES)
def test_capped_respects_cap_bucket_and_is_maximal(n, e, c, b, seed):
    """Capped EC: <= b experts a token, <= k distinct tokens an expert, raw-prob gates, maximal."""
    probs, k, b = capped_problem(n, e, c, b, seed)
    G, I = ref.capped_expert_choice(probs, k, max_experts_per_token=b)
    check_capped_routing(probs, k, b, G, I)


@pytest.mark.parametrize("n,e,c,b", [(16, 4, 2, 2), (32, 4, 2, 2), (64, 8, 2, 2), (64, 8, 2, 3)])
def test_capped_keeps_the_cap_where_topk_of_A_breaks_it(n, e, c, b):
    """At the paper's lambda=1e-3, 100 sweeps TopK(A) breaks the cap; greedy rounding never does."""
    topk_broke, empty_slots = 0, 0
    for seed in range(5):
        probs = random_probs(np.random.default_rng(seed), n, e)
        k = ref.expert_capacity(n, e, float(c))
        sol = ref.solve_capped_lp(probs, k, b, entropy_weight=1e-3, max_iter=100)
        A = np.asarray(sol.assignment)
        topk = np.argsort(-A, axis=1, kind="stable")[:, :k]  # the paper's I = TopK(A, k)
        topk_broke += np.bincount(topk.ravel(), minlength=n).max() > b
        G, I = ref.capped_expert_choice(probs, k, max_experts_per_token=b, entropy_weight=1e-3,
                                        max_iter=100)
        check_capped_routing(probs, k, b, G, I)  # includes maximality when slots stay empty
        Gx, Ix = greedy_oracle(A, probs, k, b)
        np.testing.assert_array_equal(I, Ix)
        np.testing.assert_array_equal(G, Gx)
        empty_slots += np.sum(I < 0)
    assert topk_broke > 0  # the failure mode PAPER.md measured is real here
    if (n, e) != (64, 8):
        assert empty_slots > 0  # tight LP (c == b), unconverged A: maximality branch exercised


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n,e,c,b", CAPPED_CASES)
def test_capped_is_greedy_rounding_of_the_lp_solution(n, e, c, b, seed):
    """Capped EC = greedy b-matching over solve_capped_lp's A in the documented pair order."""
    probs, k, b = capped_problem(n, e, c, b, seed)
    A = ref.solve_capped_lp(probs, k, b).assignment
    assert A.shape == (e, n)
    G, I = ref.capped_expert_choice(probs, k, max_experts_per_token=b)
    Gx, Ix = greedy_oracle(np.asarray(A, dtype=np.float64), probs, k, b)
    np.testing.assert_array_equal(I, Ix)
    np.testing.assert_array_equal(G, Gx)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n,e,c,b", CAPPED_CASES)
def test_greedy_equals_expert_proposing_deferred_acceptance(n, e, c, b, seed):
    """README: global greedy == expert-proposing deferred acceptance (same sets and order)."""
    probs, k, b = capped_problem(n, e, c, b, seed)
    _, I = ref.capped_expert_choice(probs, k, max_experts_per_token=b)
    A = np.asarray(ref.solve_capped_lp(probs, k, b).assignment, dtype=np.float64)
    da = deferred_acceptance_oracle(A, probs, k, b)
    for i in range(e):
        assert I[i][I[i] >= 0].tolist() == da[i]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n,e,c,b", CAPPED_CASES)
def test_capped_score_is_near_the_exact_lp_optimum(n, e, c, b, seed):
    """Capped total score is within 1% of the HiGHS LP optimum and never above the relaxed LP."""
    probs, k, b = capped_problem(n, e, c, b, seed)
    _, I = ref.capped_expert_choice(probs, k, max_experts_per_token=b)
    score = chosen_score(probs, I)
    assert score <= lp_optimum(probs, k, b, rows_equal=False) + 1e-9  # an integral feasible point
    assert score >= 0.99 * lp_optimum(probs, k, b)  # assets/capped_solver_report.txt: <= 0.63%


def separated_probs(n, e, k, gap):
    """Router probs whose top k+1 entries in every column differ pairwise by more than gap."""
    for seed in range(20000):
        probs = random_probs(np.random.default_rng(seed), n, e, temperature=0.3)
        top = -np.sort(-probs, axis=0)[: min(k + 1, n)]
        if np.all(-np.diff(top, axis=0) > gap):
            return probs
    raise AssertionError("no separated example found")


@pytest.mark.parametrize("n,e,k,b", [(12, 3, 3, 3), (16, 4, 4, 4), (16, 4, 3, 6), (10, 2, 10, 2)])
def test_capped_equals_plain_ec_when_cap_is_inactive(n, e, k, b):
    """With b >= e and well-separated probs, capped EC == plain EC exactly (G, I and slot order)."""
    # When must exact equality hold? (1) b >= e: a token can be taken by at most e experts, so the
    # column constraint never binds and the entropic optimum is A[i, j] = min(1, r_i exp(S/lam)),
    # increasing in the prob within each expert; the greedy then takes each expert's k best tokens
    # in descending prob order (saturated A = 1 ties fall back to the higher prob). (2) The top k+1
    # probs of every column differ by several lam, so the finite-iteration A orders them like the
    # probs; a near-tie at the bucket boundary makes the LP (nearly) degenerate, and then either
    # token is a valid answer. k = n (every expert takes every token) is the trivial case.
    lam = default(ref.capped_expert_choice, "entropy_weight")
    probs = separated_probs(n, e, k, gap=max(0.02, 5 * float(lam)))
    G, I = ref.capped_expert_choice(probs, k, max_experts_per_token=b)
    Gx, Ix = ref.expert_choice(probs, k)
    np.testing.assert_array_equal(I, Ix)
    np.testing.assert_array_equal(G, Gx)


def test_capped_lp_residuals_shrink_and_are_small_at_defaults():
    """solve_capped_lp: residual histories shrink; at defaults A nearly satisfies all three sets."""
    n, e, c, b = 64, 8, 2, 3  # the paper-sized check of PAPER.md
    probs = random_probs(np.random.default_rng(7), n, e)
    k = ref.expert_capacity(n, e, float(c))
    sol = ref.solve_capped_lp(probs, k, b)
    max_iter = default(ref.solve_capped_lp, "max_iter")
    assert 1 <= sol.n_iter <= max_iter
    for r in (sol.row_residual, sol.col_residual, sol.entry_residual):
        r = np.asarray(r)
        assert r.shape == (sol.n_iter,) and np.all(np.isfinite(r)) and np.all(r >= 0)
        assert r[-1] <= r[0] + 1e-12
        assert r[-1] < 0.05
    early = ref.solve_capped_lp(probs, k, b, tol=1e-3)  # a loose tol stops early ...
    assert early.n_iter < max_iter
    assert max(early.row_residual[-1], early.col_residual[-1], early.entry_residual[-1]) <= 1e-3  # ... once met
    A = np.asarray(sol.assignment)
    assert A.shape == (e, n) and np.all(A >= 0) and np.all(A <= 1 + 0.05)
    np.testing.assert_allclose(A.sum(axis=1), k, atol=0.05 * k)
    assert np.all(A.sum(axis=0) <= b + 0.05)
    # the full run ends far closer to the column and box sets than a 5-sweep run
    short = ref.solve_capped_lp(probs, k, b, max_iter=5)
    assert short.n_iter <= 5
    final = max(sol.col_residual[-1], sol.entry_residual[-1])
    assert final <= 0.01 * max(short.col_residual[-1], short.entry_residual[-1])


def test_capped_lp_does_not_stop_while_the_corrections_still_move():
    """Regression: 12 tokens, 4 experts, k=6, b=3, lambda=1e-3. The old rule (feasible and A still over
    one sweep) stopped at sweep 314 with <S,A> = 8.19 against the LP optimum 8.73, while the Dykstra
    corrections still moved; now the solver runs on to within 0.002 of it and rounds to the optimum."""
    probs = random_probs(np.random.default_rng(1), 12, 4)
    exact = lp_optimum(probs, 6, 3)
    sol = ref.solve_capped_lp(probs, 6, 3, entropy_weight=1e-3, max_iter=5000)
    assert exact - (probs.T * sol.assignment).sum() < 0.002
    gates, index = ref.capped_expert_choice(probs, 6, 3, entropy_weight=1e-3, max_iter=5000)
    assert gates.sum() == pytest.approx(exact, abs=1e-9) and np.all(index >= 0)


def test_capped_lp_tests_its_stopping_rule_every_10th_sweep():
    """The stopping rule runs after sweeps 10, 20, ...: n_iter is a multiple of 10 or max_iter."""
    assert ref.CONVERGENCE_CHECK_EVERY == 10
    probs = random_probs(np.random.default_rng(3), 16, 4)
    for tol, max_iter in [(1e-2, 1000), (1e-3, 1000), (1e-2, 7), (0.0, 25)]:
        sol = ref.solve_capped_lp(probs, 4, 2, tol=tol, max_iter=max_iter)
        assert sol.n_iter == max_iter or (sol.n_iter % 10 == 0 and sol.n_iter < max_iter)
        assert len(sol.row_residual) == len(sol.col_residual) == len(sol.entry_residual) == sol.n_iter
    assert ref.solve_capped_lp(probs, 4, 2, tol=1e-2).n_iter < 1000  # a loose tol does stop early


def test_capped_solver_defaults_match_the_torch_module():
    """The capped solver defaults (constants and signature defaults) equal moe.capped's and CappedMoE's."""
    capped = pytest.importorskip("moe.capped")  # torch: this file's oracles stay NumPy/SciPy
    names = ("DEFAULT_ENTROPY_WEIGHT", "DEFAULT_MAX_ITER", "DEFAULT_TOL", "CONVERGENCE_CHECK_EVERY")
    assert [getattr(ref, n) for n in names] == [getattr(capped, n) for n in names]
    for fn in (ref.solve_capped_lp, ref.capped_expert_choice, capped.solve_capped_lp,
               capped.capped_expert_choice, capped.CappedMoE.__init__):
        assert (default(fn, "entropy_weight"), default(fn, "max_iter"), default(fn, "tol")) == \
            (ref.DEFAULT_ENTROPY_WEIGHT, ref.DEFAULT_MAX_ITER, ref.DEFAULT_TOL), fn.__qualname__


# =============================================================================================
# 3. Regression tests for bugs seen in peer implementations
# =============================================================================================
def test_all_negative_logits_still_route():
    """Very negative logits (DeepSpeed's raw-logit bug) still give valid probs and full buckets."""
    x = -np.ones((6, 2)) * 1e4
    w_router = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])  # logits ~ -2e4, -3e4, -4e4
    probs = ref.router_probs(x, w_router)
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-12)
    G, I = ref.expert_choice(probs, 3)
    for i in range(3):  # every expert (even those with prob exp(-1e4) = 0.0) takes 3 real tokens
        assert sorted(I[i].tolist()) == [0, 1, 2]  # all probs in a column tie -> lowest indices
    assert np.all((I >= 0) & (I < 6))
    _, I_tc = ref.token_choice(probs, top_k=1, capacity=6)
    np.testing.assert_array_equal(I_tc[0], np.arange(6))  # token choice too: all pick expert 0


def test_zero_probability_columns_still_fill_buckets():
    """An expert whose probs underflow to 0 still takes k distinct real tokens (no padding)."""
    probs = np.zeros((5, 2))
    probs[:, 0] = 1.0
    _, I = ref.expert_choice(probs, 2)
    np.testing.assert_array_equal(I, [[0, 1], [0, 1]])


@pytest.mark.parametrize("top_k", [1, 2])
def test_over_capacity_really_drops(top_k):
    """HF Switch v5 regression: demand above capacity is dropped (the first tokens are kept)."""
    probs = np.tile([0.7, 0.2, 0.1], (6, 1))  # every token wants e0 first, e1 second
    G, I = ref.token_choice(probs, top_k=top_k, capacity=2)
    np.testing.assert_array_equal(I[0], [0, 1])  # tokens 2..5 dropped from e0
    assert np.sum(I >= 0) == 2 * top_k
    if top_k == 2:
        np.testing.assert_array_equal(I[1], [0, 1])
        np.testing.assert_allclose(G[0], 0.7 / 0.9, rtol=1e-12)


def test_bucket_larger_than_group():
    """k > n: expert_capacity clips k to n; expert_choice(k > n) raises a clear ValueError."""
    assert ref.expert_capacity(3, 2, 4.0) == 3
    assert ref.expert_capacity(1, 1, 100.0) == 1
    probs = random_probs(np.random.default_rng(0), 3, 2)
    with pytest.raises(ValueError, match=r"\bk\b"):
        ref.expert_choice(probs, 4)
    G, I = ref.expert_choice(probs, ref.expert_capacity(3, 2, 4.0))  # the clipped k works
    assert sorted(I[0].tolist()) == [0, 1, 2]


def test_moe_ffn_empty_slot_with_nonzero_gate_contributes_nothing():
    """token_index -1 is 'empty', never Python's 'last token', even if its gate is nonzero."""
    x = np.ones((3, 1))
    y = ref.moe_ffn(x, np.array([[0.7, 0.9]]), np.array([[0, -1]]), np.ones((1, 1, 1)),
                    np.ones((1, 1, 1)))
    np.testing.assert_allclose(y, [[0.7 * 0.8411919906082768], [0.0], [0.0]], rtol=1e-12)


def test_moe_ffn_sums_repeated_token_slots():
    """Slots naming the same token all add up (np.add.at semantics, not fancy-index +=)."""
    x = np.ones((2, 1))
    gates = np.array([[0.5, 0.25], [0.125, 0.0]])
    token_index = np.array([[1, 1], [1, 0]])  # token 1 appears three times, token 0 with gate 0
    y = ref.moe_ffn(x, gates, token_index, np.ones((2, 1, 1)), np.ones((2, 1, 1)))
    np.testing.assert_allclose(y, [[0.0], [0.875 * 0.8411919906082768]], rtol=1e-12)


# =============================================================================================
# 4. Bad inputs: ValueError naming the argument
# =============================================================================================
P = random_probs(np.random.default_rng(0), 6, 3)
X = np.random.default_rng(1).standard_normal((6, 4))
W_ROUTER = np.random.default_rng(2).standard_normal((4, 3))
W_IN = np.random.default_rng(3).standard_normal((3, 4, 5))
W_OUT = np.random.default_rng(4).standard_normal((3, 5, 4))
G2, I2 = ec_oracle(P, 2)  # valid routing built without the reference
with_nan = lambda a, v=np.nan: np.where(np.arange(a.size).reshape(a.shape) == 1, v, a)  # noqa: E731

BAD_CALLS = {
    # shapes
    "router_probs x 1-D": (lambda: ref.router_probs(X[0], W_ROUTER), r"\bx\b"),
    "router_probs w_router 3-D": (lambda: ref.router_probs(X, W_ROUTER[None]), "w_router"),
    "router_probs d mismatch": (lambda: ref.router_probs(X, W_ROUTER[:3]), r"w_router|\bx\b"),
    "expert_choice probs 1-D": (lambda: ref.expert_choice(P[0], 1), "probs"),
    "expert_choice probs 3-D": (lambda: ref.expert_choice(P[None], 1), "probs"),
    "token_choice probs 1-D": (lambda: ref.token_choice(P[0], top_k=1, capacity=1), "probs"),
    "capped probs 3-D": (lambda: ref.capped_expert_choice(P[None], 2, max_experts_per_token=2),
                         "probs"),
    "solve_capped_lp probs 1-D": (lambda: ref.solve_capped_lp(P[0], 1, 2), "probs"),
    "load_balancing_loss probs 1-D": (lambda: ref.load_balancing_loss(P[0]), "probs"),
    "router_z_loss logits 1-D": (lambda: ref.router_z_loss(P[0]), "logits"),
    "moe_ffn x 1-D": (lambda: ref.moe_ffn(X[0], G2, I2, W_IN, W_OUT), r"\bx\b"),
    "moe_ffn gates 1-D": (lambda: ref.moe_ffn(X, G2[0], I2, W_IN, W_OUT), "gates|token_index"),
    "moe_ffn gates/token_index mismatch": (lambda: ref.moe_ffn(X, G2[:, :1], I2, W_IN, W_OUT),
                                           "gates|token_index"),
    "moe_ffn w_in 2-D": (lambda: ref.moe_ffn(X, G2, I2, W_IN[0], W_OUT), "w_in"),
    "moe_ffn w_in expert count": (lambda: ref.moe_ffn(X, G2, I2, W_IN[:2], W_OUT),
                                  "w_in|gates|token_index"),
    "moe_ffn w_in d mismatch": (lambda: ref.moe_ffn(X, G2, I2, W_IN[:, :3], W_OUT), r"w_in|\bx\b"),
    "moe_ffn w_out f mismatch": (lambda: ref.moe_ffn(X, G2, I2, W_IN, W_OUT[:, :4]), "w_out|w_in"),
    "moe_ffn w_out d mismatch": (lambda: ref.moe_ffn(X, G2, I2, W_IN, W_OUT[:, :, :3]),
                                 r"w_out|\bx\b"),
    # k, bucket size
    "expert_choice k=0": (lambda: ref.expert_choice(P, 0), r"\bk\b"),
    "expert_choice k>n": (lambda: ref.expert_choice(P, 7), r"\bk\b"),
    "capped k=0": (lambda: ref.capped_expert_choice(P, 0, max_experts_per_token=2), r"\bk\b"),
    "capped k>n": (lambda: ref.capped_expert_choice(P, 7, max_experts_per_token=3), r"\bk\b"),
    "solve_capped_lp k=0": (lambda: ref.solve_capped_lp(P, 0, 2), r"\bk\b"),
    # capacity factor
    "capacity_factor 0": (lambda: ref.expert_capacity(8, 2, 0.0), "capacity_factor"),
    "capacity_factor <0": (lambda: ref.expert_capacity(8, 2, -1.0), "capacity_factor"),
    "capacity_factor nan": (lambda: ref.expert_capacity(8, 2, float("nan")), "capacity_factor"),
    "capacity_factor inf": (lambda: ref.expert_capacity(8, 2, float("inf")), "capacity_factor"),
    "n_tokens 0": (lambda: ref.expert_capacity(0, 2, 1.0), "n_tokens"),
    "n_experts 0": (lambda: ref.expert_capacity(8, 0, 1.0), "n_experts"),
    # token choice
    "top_k 0": (lambda: ref.token_choice(P, top_k=0, capacity=2), "top_k"),
    "top_k > e": (lambda: ref.token_choice(P, top_k=4, capacity=2), "top_k"),
    "capacity 0": (lambda: ref.token_choice(P, top_k=1, capacity=0), r"\bcapacity\b"),
    "second_uniform needs top_k=2": (lambda: ref.token_choice(P, 1, 2, second_uniform=np.zeros(6)),
                                     "second_uniform"),
    "second_uniform shape": (lambda: ref.token_choice(P, 2, 2, second_uniform=np.zeros(5)), "second_uniform"),
    "second_uniform = 1": (lambda: ref.token_choice(P, 2, 2, second_uniform=np.ones(6)), "second_uniform"),
    "second_uniform < 0": (lambda: ref.token_choice(P, 2, 2, second_uniform=np.full(6, -0.1)), "second_uniform"),
    "second_uniform nan": (lambda: ref.token_choice(P, 2, 2, second_uniform=np.full(6, np.nan)), "second_uniform"),
    "second_threshold 0": (lambda: ref.token_choice(P, 2, 2, second_threshold=0.0), "second_threshold"),
    "second_threshold nan": (lambda: ref.token_choice(P, 2, 2, second_threshold=float("nan")), "second_threshold"),
    # cap
    "cap infeasible b*n < k*e": (lambda: ref.capped_expert_choice(P, 5, max_experts_per_token=2),
                                 "max_experts_per_token"),  # 2*6 = 12 < 5*3 = 15
    "cap b=0": (lambda: ref.capped_expert_choice(P, 1, max_experts_per_token=0),
                "max_experts_per_token"),
    "solve_capped_lp infeasible": (lambda: ref.solve_capped_lp(P, 5, 2), "max_experts_per_token"),
    # non-finite / out-of-range values
    "router_probs x nan": (lambda: ref.router_probs(with_nan(X), W_ROUTER), r"\bx\b"),
    "router_probs x inf": (lambda: ref.router_probs(with_nan(X, np.inf), W_ROUTER), r"\bx\b"),
    "expert_choice probs nan": (lambda: ref.expert_choice(with_nan(P), 2), "probs"),
    "expert_choice probs inf": (lambda: ref.expert_choice(with_nan(P, np.inf), 2), "probs"),
    "expert_choice probs > 1": (lambda: ref.expert_choice(with_nan(P, 1.5), 2), "probs"),
    "expert_choice probs < 0": (lambda: ref.expert_choice(with_nan(P, -0.1), 2), "probs"),
    "token_choice probs nan": (lambda: ref.token_choice(with_nan(P), top_k=1, capacity=2), "probs"),
    "capped probs nan": (lambda: ref.capped_expert_choice(with_nan(P), 2, max_experts_per_token=2),
                         "probs"),
    "load_balancing_loss probs nan": (lambda: ref.load_balancing_loss(with_nan(P)), "probs"),
    "router_z_loss logits nan": (lambda: ref.router_z_loss(with_nan(P)), "logits"),
    "router_z_loss logits inf": (lambda: ref.router_z_loss(with_nan(P, -np.inf)), "logits"),
    "moe_ffn x nan": (lambda: ref.moe_ffn(with_nan(X), G2, I2, W_IN, W_OUT), r"\bx\b"),
    "moe_ffn token_index = n": (lambda: ref.moe_ffn(X, G2, np.where(I2 == I2[0, 0], 6, I2), W_IN,
                                                    W_OUT), "token_index"),
    "moe_ffn token_index = -2": (lambda: ref.moe_ffn(X, G2, np.where(I2 == I2[0, 0], -2, I2), W_IN,
                                                     W_OUT), "token_index"),
    "router_probs w_router nan": (lambda: ref.router_probs(X, with_nan(W_ROUTER)), "w_router"),
    "moe_ffn gates nan": (lambda: ref.moe_ffn(X, with_nan(G2), I2, W_IN, W_OUT), "gates"),
    "moe_ffn w_in inf": (lambda: ref.moe_ffn(X, G2, I2, with_nan(W_IN, np.inf), W_OUT), "w_in"),
    "moe_ffn w_out nan": (lambda: ref.moe_ffn(X, G2, I2, W_IN, with_nan(W_OUT)), "w_out"),
    "moe_ffn token_index float": (lambda: ref.moe_ffn(X, G2, I2.astype(float), W_IN, W_OUT),
                                  "token_index"),
    # solver settings
    "entropy_weight 0": (lambda: ref.solve_capped_lp(P, 2, 2, entropy_weight=0.0), "entropy_weight"),
    "entropy_weight nan": (lambda: ref.capped_expert_choice(P, 2, 2, entropy_weight=float("nan")),
                           "entropy_weight"),
    "max_iter 0": (lambda: ref.solve_capped_lp(P, 2, 2, max_iter=0), "max_iter"),
    "tol nan": (lambda: ref.solve_capped_lp(P, 2, 2, tol=float("nan")), "tol"),
    "tol < 0": (lambda: ref.capped_expert_choice(P, 2, 2, tol=-1.0), "tol"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_value_error_naming_the_argument(name):
    """Each bad input raises ValueError whose message names the argument."""
    call, pattern = BAD_CALLS[name]
    with pytest.raises(ValueError, match=pattern):
        call()


# =============================================================================================
# 5. CuPy (GPU only)
# =============================================================================================
@pytest.mark.gpu
@requires_cupy
def test_cupy_matches_numpy():
    """expert_choice, capped_expert_choice and moe_ffn give the NumPy answers on CuPy arrays."""
    import cupy as cp

    rng = np.random.default_rng(0)
    n, e, d, f, b = 32, 4, 8, 16, 2
    k = ref.expert_capacity(n, e, 2.0)
    x = rng.standard_normal((n, d))
    w_router = rng.standard_normal((d, e))
    w_in, w_out = rng.standard_normal((e, d, f)), rng.standard_normal((e, f, d))
    probs = ref.router_probs(x, w_router)
    probs_gpu = ref.router_probs(cp.asarray(x), cp.asarray(w_router))
    assert isinstance(probs_gpu, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(probs_gpu), probs, rtol=1e-12)
    for route in (lambda p: ref.expert_choice(p, k),
                  lambda p: ref.capped_expert_choice(p, k, max_experts_per_token=b)):
        G, I = route(probs)
        G_gpu, I_gpu = route(cp.asarray(probs))
        assert isinstance(I_gpu, cp.ndarray)
        np.testing.assert_array_equal(cp.asnumpy(I_gpu), I)
        np.testing.assert_allclose(cp.asnumpy(G_gpu), G, rtol=1e-12)
        y = ref.moe_ffn(x, G, I, w_in, w_out)
        y_gpu = ref.moe_ffn(cp.asarray(x), G_gpu, I_gpu, cp.asarray(w_in), cp.asarray(w_out))
        np.testing.assert_allclose(cp.asnumpy(y_gpu), y, rtol=1e-10, atol=1e-12)
