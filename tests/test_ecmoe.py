"""Properties of ecmoe.py, the PyTorch layer: equal to reference_numpy, causal where it must be.

Each test's docstring states one property. Float64 equivalence is exact up to ~1e-10; float32 and
bfloat16-autocast runs are compared at looser, stated tolerances.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import ecmoe
import reference_numpy as ref
from conftest import requires_cuda, requires_cupy

ROUTERS = ecmoe.ROUTERS
GROUPS = ecmoe.GROUPS
LP = dict(max_iter=200)  # fewer LP sweeps keep the capped tests fast; passed to both sides


def softmax_probs(*shape, seed=0, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def make_layer(router, group, d=8, f=16, e=4, c=2.0, seed=0, **kw):
    torch.manual_seed(seed)
    layer = ecmoe.MoE(d, f, e, router=router, capacity_factor=c, group=group, **kw)
    with torch.no_grad():  # a router big enough to make routing decisive
        layer.w_router.normal_(0, 1.0)
    return layer


def group_order(B, T, group):
    """[groups, n] (b, t) pairs of each routing group, in the module's documented token order."""
    if group == "batch":
        return [[(b, t) for t in range(T) for b in range(B)]]  # position-major: t*B + b
    if group == "sequence":
        return [[(b, t) for t in range(T)] for b in range(B)]
    return [[(b, t) for b in range(B)] for t in range(T)]


def gshard_draws(layer, x, seed):
    """The U[0, 1) draws [groups, n] a "top2_gshard" forward makes after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return torch.rand(layer.group_tokens(x).shape[:2])  # float32 whatever x's dtype


def reference_layer(layer, x, second_uniform=None):
    """The layer computed with reference_numpy, one routing group at a time (float64 NumPy).

    second_uniform [groups, n]: the draws of a "top2_gshard" layer (see gshard_draws)."""
    w = {n: p.detach().numpy() for n, p in layer.named_parameters()}
    x = x.detach().numpy()
    B, T, d = x.shape
    y, aux, z, routes = np.zeros_like(x), [], [], []
    for g, tokens in enumerate(group_order(B, T, layer.group)):
        x_g = np.stack([x[b, t] for b, t in tokens])  # [n, d]
        probs = ref.router_probs(x_g, w["w_router"])
        n, e = probs.shape
        k = ref.expert_capacity(n, e, layer.capacity_factor)
        if layer.router == "expert_choice":
            gates, index = ref.expert_choice(probs, k)
        elif layer.router == "capped_expert_choice":
            gates, index = ref.capped_expert_choice(probs, k, layer.max_experts_per_token,
                                                    layer.entropy_weight, layer.max_iter, layer.tol)
        elif layer.router == "top2_dropless":
            gates, index = ref.token_choice(probs, 2, n)  # capacity n: nothing can be dropped
        elif layer.router == "top2_gshard":
            gates, index = ref.token_choice(probs, 2, k, second_uniform[g].numpy().astype(np.float64),
                                            layer.second_threshold)
        else:
            gates, index = ref.token_choice(probs, 1 if layer.router == "top1" else 2, k)
        y_g = ref.moe_ffn(x_g, gates, index, w["w_in"], w["w_out"])
        for m, (b, t) in enumerate(tokens):
            y[b, t] = y_g[m]
        aux.append(ref.load_balancing_loss(probs))
        z.append(ref.router_z_loss(x_g @ w["w_router"]))
        routes.append(route_set(gates, index, tokens))
    aux = float(np.mean(aux)) if layer.router in ecmoe.TOKEN_CHOICE_TOP_K else 0.0
    return y, aux, float(np.mean(z)), set().union(*routes)


def route_set(gates, index, tokens):
    """{(expert, (b, t), gate rounded)} of the filled slots."""
    gates, index = np.asarray(gates), np.asarray(index)
    return {(i, tokens[index[i, j]], round(float(gates[i, j]), 10))
            for i in range(index.shape[0]) for j in range(index.shape[1]) if index[i, j] >= 0}


def module_routes(layer, x, second_uniform=None):
    """The module's (expert, (b, t), gate) set, from its public functions on grouped tokens."""
    x_g = layer.group_tokens(x)
    probs = ecmoe.router_probs(x_g, layer.w_router)
    gates, index = layer.route(probs, second_uniform)
    B, T, _ = x.shape
    return set().union(*(route_set(gates[g].detach(), index[g], tokens)
                         for g, tokens in enumerate(group_order(B, T, layer.group))))


# ----------------------------------------------------------------------------- hand-checkable cases
def test_expert_capacity_rounds_up_and_clips():
    """k = ceil(n c / e) clipped to [1, n]; float noise (0.1*30) does not round up."""
    assert ecmoe.expert_capacity(8, 4, 2.0) == 4
    assert ecmoe.expert_capacity(15, 4, 2.0) == 8  # 7.5 -> 8
    assert ecmoe.expert_capacity(1, 8, 2.0) == 1  # paper's k would be 0.25 -> 0
    assert ecmoe.expert_capacity(4, 1, 2.0) == 4  # never more than n
    assert ecmoe.expert_capacity(10, 1, 0.1 * 3) == 3  # 3.0000000000000004 stays 3
    for n, e, c in [(1, 8, 2.0), (7, 3, 1.25), (64, 8, 0.5), (30, 10, 0.3), (5, 5, 10.0)]:
        assert ecmoe.expert_capacity(n, e, c) == ref.expert_capacity(n, e, c)


def test_expert_choice_tiny_case_by_hand():
    """Each expert takes its k best tokens; ties go to the lower token index; gates are raw probs."""
    probs = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)
    gates, index = ecmoe.expert_choice(probs, 2)
    assert index.tolist() == [[0, 2], [1, 0]]  # expert 0: tie 0.6/0.6 -> token 0 first
    assert gates.tolist() == [[0.6, 0.6], [0.7, 0.4]]


@pytest.mark.parametrize("seed", range(3))
def test_expert_choice_ties_match_stable_sort(seed):
    """With many exact ties, expert_choice picks and orders tokens exactly as a stable sort does."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.randint(0, 4, (3, 40, 5), generator=g).double() / 4
    for k in (1, 7, 40):
        index = ecmoe.expert_choice(probs, k)[1]
        expected = torch.sort(probs.transpose(1, 2), dim=-1, descending=True, stable=True).indices[..., :k]
        assert torch.equal(index, expected)
        for gi in range(3):
            assert index[gi].tolist() == ref.expert_choice(probs[gi].numpy(), k)[1].tolist()


def test_token_choice_tiny_case_by_hand():
    """Top-2: all first choices claim before second choices; a full expert drops the claim."""
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.5, 0.4]], dtype=torch.float64)
    gates, index = ecmoe.token_choice(probs, 2, 2)
    # 1st choices: t0->E0, t1->E0, t2->E1. 2nd: t0->E1, t1->E1 (full: dropped), t2->E2.
    assert index.tolist() == [[0, 1], [2, 0], [2, -1]]
    expected = [[0.7 / 0.9, 0.6 / 0.9], [0.5 / 0.9, 0.2 / 0.9], [0.4 / 0.9, 0.0]]
    torch.testing.assert_close(gates, torch.tensor(expected, dtype=torch.float64))


def test_token_choice_gshard_tiny_case_by_hand():
    """GShard top-2, capacity 1: a skipped second choice claims no slot; g1 stays renormalised."""
    probs = torch.tensor([[0.85, 0.10, 0.05], [0.60, 0.35, 0.05], [0.05, 0.15, 0.80]], dtype=torch.float64)
    u = torch.tensor([0.9, 0.0, 0.0], dtype=torch.float64)  # t0: 0.9 >= (0.10/0.95)/0.2 -> skip
    gates, index = ecmoe.token_choice(probs, 2, 1, second_uniform=u)
    # 1st: t0->E0, t1->E0 full, t2->E2. 2nd: t0 skipped, t1->E1 accepted, t2->E1 full
    assert index.tolist() == [[0], [1], [2]]
    torch.testing.assert_close(gates, torch.tensor([[0.85], [0.35], [0.80]], dtype=torch.float64) / 0.95)
    assert ecmoe.token_choice(probs, 2, 1)[1].tolist() == [[0], [0], [2]]  # plain top-2


@pytest.mark.parametrize("seed", range(3))
def test_token_choice_gshard_extreme_uniforms(seed):
    """u = 0 is bitwise top-2 (all g2 > 0); u = 1 - eps keeps a 2nd choice exactly where g2 >= threshold."""
    probs = softmax_probs(2, 40, 4, seed=seed)
    for capacity in (5, 40):
        top2 = ecmoe.token_choice(probs, 2, capacity)
        zero = ecmoe.token_choice(probs, 2, capacity, second_uniform=torch.zeros(2, 40, dtype=torch.float64))
        assert torch.equal(zero[0], top2[0]) and torch.equal(zero[1], top2[1])
    almost_one = torch.full((2, 40), 1.0).nextafter(torch.tensor(0.0))  # float32, the layer's draws
    index = ecmoe.token_choice(probs, 2, 40, second_uniform=almost_one)[1]
    top = probs.sort(-1, descending=True).values[..., :2]
    g2 = top[..., 1] / top.sum(-1)  # [2, 40] renormalised second gate
    assert 0 < int((g2 >= 0.2).sum()) < 80  # both cases occur
    for gi in range(2):
        per_token = torch.bincount(index[gi][index[gi] >= 0], minlength=40)
        assert torch.equal(per_token, 1 + (g2[gi] >= 0.2).long())


def test_token_choice_gshard_keeps_second_with_probability_min_1_g2_over_threshold():
    """Over 4000 draws the second expert is used with frequency min(1, g2 / 0.2) (+- 0.03)."""
    probs = softmax_probs(1, 12, 4, seed=3, scale=2.0).expand(4000, 12, 4)
    u = torch.rand(4000, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    index = ecmoe.token_choice(probs, 2, 12, second_uniform=u)[1]  # capacity n: no capacity drops
    per_token = torch.zeros(4000, 12).scatter_add_(1, index.clamp(min=0).flatten(1), (index >= 0).flatten(1).float())
    top = probs[0].sort(-1, descending=True).values[:, :2]
    want = (top[:, 1] / top.sum(-1) / 0.2).clamp(max=1)
    torch.testing.assert_close((per_token - 1).mean(0).double(), want, rtol=0, atol=0.03)


def test_top2_dropless_layer_never_drops():
    """top2_dropless: every token gets exactly its 2 experts; = token_choice(probs, 2, capacity=n)."""
    layer = make_layer("top2_dropless", "sequence", e=4, c=0.5)  # c is ignored, nothing dropped
    with torch.no_grad():
        layer.w_router.mul_(5)  # very unbalanced routing: capped top-2 would drop a lot
    x = torch.randn(3, 10, 8, generator=torch.Generator().manual_seed(1))
    probs = ecmoe.router_probs(layer.group_tokens(x), layer.w_router)
    gates, index = layer.route(probs)
    s = index.shape[-1]  # slots = the largest demand of any expert over the batch
    full_gates, full_index = ecmoe.token_choice(probs, 2, 10)
    assert torch.equal(index, full_index[..., :s]) and torch.equal(gates, full_gates[..., :s])
    assert bool((full_index[..., s:] == -1).all()) and bool((index[..., -1] >= 0).any())  # s is tight
    stats = layer(x).stats
    assert float(stats.dropped_fraction) == 0.0 and float(stats.overflow_fraction) == 0.0
    assert stats.experts_per_token.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    capped = make_layer("top2", "sequence", e=4, c=0.5)
    capped.load_state_dict(layer.state_dict())
    assert float(capped(x).stats.dropped_fraction) > 0.2


def test_top2_gshard_layer_draws_from_the_global_generator():
    """top2_gshard: torch.manual_seed pins the draws; fork_rng isolates them; other routers draw nothing."""
    layer = make_layer("top2_gshard", "batch", e=4, d=8)
    with torch.no_grad():
        layer.w_router.mul_(0.5)  # many tokens with g2 just under 0.2: their second expert is random
    x = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    y0 = layer(x).y
    torch.manual_seed(0)
    assert torch.equal(layer(x).y, y0)
    torch.manual_seed(1)
    assert not torch.equal(layer(x).y, y0)
    torch.manual_seed(0)
    with torch.random.fork_rng():
        layer(x)
    assert torch.equal(layer(x).y, y0)  # the fork left the global generator where it was
    u = gshard_draws(layer, x, seed=0)
    probs = ecmoe.router_probs(layer.group_tokens(x), layer.w_router)
    torch.manual_seed(0)
    stats = layer(x).stats
    gates, index = layer.route(probs, u)
    y = layer.ungroup_tokens(ecmoe.moe_ffn(layer.group_tokens(x), gates, index, layer.w_in, layer.w_out), 4, 6)
    assert torch.equal(y, y0)
    # stats: dropped = claims made but not accepted / claims made (a skipped 2nd choice is no claim)
    top = probs.sort(-1, descending=True).values[..., :2]
    claims = 24 + int((u < top[..., 1] / top.sum(-1) / 0.2).sum())
    assert 24 < claims < 48
    assert float(stats.dropped_fraction) == pytest.approx(1 - int((index >= 0).sum()) / claims)
    for router in ("expert_choice", "top2", "top2_dropless"):
        other = make_layer(router, "batch")
        before = torch.get_rng_state()
        other(x)
        assert torch.equal(torch.get_rng_state(), before), router


def test_stable_sort_tie_order_on_cpu():
    """torch.sort(stable=True, descending=True) keeps equal values in index order (large sizes too)."""
    values = torch.randint(0, 3, (3, 5000), generator=torch.Generator().manual_seed(0)).double()
    index = torch.sort(values, dim=-1, descending=True, stable=True).indices
    key = -values.gather(-1, index) * 10**5 + index  # sorted order must be increasing in key
    assert bool((key[:, 1:] > key[:, :-1]).all())


def test_routing_stats_by_hand():
    """Stats: Fig. 3 histogram bins 0,1,2,3-4,>4; dropped/overflow only for token choice."""
    layer = make_layer("top2", "sequence", e=3, c=2.0)
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.5, 0.4]]], dtype=torch.float64)
    stats = layer.routing_stats(probs, ecmoe.token_choice(probs, 2, 2)[1])
    assert stats.experts_per_token.tolist() == [0.0, pytest.approx(1 / 3), pytest.approx(2 / 3), 0.0, 0.0]
    assert float(stats.dropped_fraction) == pytest.approx(1 / 6)  # t1's 2nd choice
    assert float(stats.load_max_over_mean) == pytest.approx(3 / 2)  # demand E0,E1,E2 = 2,3,1
    assert float(stats.overflow_fraction) == pytest.approx(1 / 3)  # E1 wants 3 > 2
    ec = make_layer("expert_choice", "sequence", e=3)(torch.randn(2, 6, 8)).stats
    assert float(ec.load_max_over_mean) == 1.0 and float(ec.dropped_fraction) == 0.0
    assert float(ec.experts_per_token.sum()) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- capped EC rounding
def greedy_b_matching_loop(A, probs, k, b):
    """The reference's rule as a plain loop: pairs by (A desc, prob desc, expert, token)."""
    e, n = len(A), len(A[0])
    order = sorted((-A[i][j], -probs[j][i], i, j) for i in range(e) for j in range(n))
    slots, per_token = [[] for _ in range(e)], [0] * n
    for _, _, i, j in order:
        if len(slots[i]) < k and per_token[j] < b:
            slots[i].append(j)
            per_token[j] += 1
    return [s + [-1] * (k - len(s)) for s in slots]


@pytest.mark.parametrize("seed", range(6))
def test_deferred_acceptance_equals_greedy_with_ties(seed):
    """Deferred acceptance (vectorised) gives exactly the greedy b-matching, ties included."""
    g = torch.Generator().manual_seed(seed)
    G, e, n = 3, 5, 9
    A = torch.randint(0, 4, (G, e, n), generator=g).double() / 4  # many exact ties in A
    probs = torch.randint(0, 3, (G, n, e), generator=g).double() / 3  # and in the probs
    for k, b in [(1, 1), (3, 2), (4, 3), (9, 5)]:
        if b * n < k * e:
            continue
        held, rank = ecmoe._greedy_b_matching(A, probs.transpose(1, 2), k, b)
        slot_rank, slot_token = torch.where(held, rank, e * n).sort(dim=2)
        got = torch.where(slot_rank[..., :k] < e * n, slot_token[..., :k], -1)
        for gi in range(G):
            assert got[gi].tolist() == greedy_b_matching_loop(A[gi].tolist(), probs[gi].tolist(), k, b)


@pytest.mark.parametrize("c,b", [(1.0, 1), (1.0, 2), (2.0, 2), (2.0, 3)])
def test_capped_expert_choice_matches_reference_and_holds_cap(c, b):
    """Capped EC: LP and routing equal the reference per group; cap b and bucket k always hold."""
    n, e = 16, 4
    probs = softmax_probs(3, n, e, seed=int(10 * c + b), scale=2.0)
    k = ecmoe.expert_capacity(n, e, c)
    sol = ecmoe.solve_capped_lp(probs, k, b, **LP)
    gates, index = ecmoe.capped_expert_choice(probs, k, b, **LP)
    for gi in range(3):
        ref_sol = ref.solve_capped_lp(probs[gi].numpy(), k, b, **LP)
        assert int(sol.n_iter[gi]) == ref_sol.n_iter
        np.testing.assert_allclose(sol.assignment[gi].numpy(), ref_sol.assignment, atol=1e-10)
        np.testing.assert_allclose(sol.row_residual[gi, :ref_sol.n_iter].numpy(), ref_sol.row_residual, atol=1e-10)
        np.testing.assert_allclose(sol.col_residual[gi, :ref_sol.n_iter].numpy(), ref_sol.col_residual, atol=1e-10)
        ref_gates, ref_index = ref.capped_expert_choice(probs[gi].numpy(), k, b, **LP)
        assert index[gi].tolist() == ref_index.tolist()
        np.testing.assert_allclose(gates[gi].numpy(), ref_gates, atol=1e-12)
        per_token = torch.bincount(index[gi][index[gi] >= 0], minlength=n)
        assert int(per_token.max()) <= b
    assert ecmoe.DEFAULT_ENTROPY_WEIGHT == ref.DEFAULT_ENTROPY_WEIGHT
    assert (ecmoe.DEFAULT_MAX_ITER, ecmoe.DEFAULT_TOL) == (ref.DEFAULT_MAX_ITER, ref.DEFAULT_TOL)
    assert ecmoe.CONVERGENCE_CHECK_EVERY == ref.CONVERGENCE_CHECK_EVERY


def test_capped_with_loose_cap_is_plain_expert_choice():
    """With b >= e the cap is inactive: capped EC routes the same token sets as plain EC."""
    probs = softmax_probs(2, 12, 3, seed=3, scale=3.0)
    capped = ecmoe.capped_expert_choice(probs, 4, 3, max_iter=1000)[1]
    plain = ecmoe.expert_choice(probs, 4)[1]
    assert [sorted(r) for r in capped.reshape(-1, 4).tolist()] == [sorted(r) for r in plain.reshape(-1, 4).tolist()]


def test_capped_lp_stopping_rule_matches_reference_and_waits_for_the_corrections():
    """Module and reference stop at the same sweep (checks every 10th); the lambda=1e-3 case that
    the old rule stopped 0.54 short of the LP optimum now ends within 0.002 of it."""
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((12, 4))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # = test_reference's random_probs
    exact = ref._exact_lp_value(probs, 6, 3)
    sol = ecmoe.solve_capped_lp(torch.tensor(probs)[None], 6, 3, entropy_weight=1e-3, max_iter=5000)
    assert exact - float((torch.tensor(probs).T * sol.assignment[0]).sum()) < 0.002
    batch = torch.stack([softmax_probs(16, 4, seed=s) for s in range(3)])
    for tol, max_iter in [(1e-2, 1000), (1e-3, 1000), (0.0, 25)]:
        sol = ecmoe.solve_capped_lp(batch, 4, 2, tol=tol, max_iter=max_iter)
        for gi in range(3):
            want = ref.solve_capped_lp(batch[gi].numpy(), 4, 2, tol=tol, max_iter=max_iter)
            assert int(sol.n_iter[gi]) == want.n_iter
            np.testing.assert_allclose(sol.assignment[gi].numpy(), want.assignment, rtol=0, atol=1e-12)
            np.testing.assert_allclose(sol.row_residual[gi, :want.n_iter].numpy(), want.row_residual, atol=1e-12)


# ----------------------------------------------------------------------------- functional equivalence
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n,e", [(1, 4), (7, 3), (16, 4), (33, 8)])
def test_functions_match_reference_float64(n, e, seed):
    """Each function, batched over 2 groups, equals the reference on every group (float64)."""
    d, f = 6, 10
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, d, generator=g, dtype=torch.float64)
    w_router = torch.randn(d, e, generator=g, dtype=torch.float64)
    w_in = torch.randn(e, d, f, generator=g, dtype=torch.float64)
    w_out = torch.randn(e, f, d, generator=g, dtype=torch.float64)
    probs = ecmoe.router_probs(x, w_router)
    k = ecmoe.expert_capacity(n, e, 1.5)
    u = torch.rand(2, n, generator=g, dtype=torch.float64)
    routed = {"ec": ecmoe.expert_choice(probs, k), "top1": ecmoe.token_choice(probs, 1, k),
              "top2": ecmoe.token_choice(probs, min(2, e), k), "top2_dropless": ecmoe.token_choice(probs, 2, n),
              "top2_gshard": ecmoe.token_choice(probs, 2, k, second_uniform=u)}
    lb, zl = ecmoe.load_balancing_loss(probs), ecmoe.router_z_loss(x @ w_router)
    for gi in range(2):
        p = ref.router_probs(x[gi].numpy(), w_router.numpy())
        np.testing.assert_allclose(probs[gi].numpy(), p, rtol=0, atol=1e-14)
        ref_routed = {"ec": ref.expert_choice(p, k), "top1": ref.token_choice(p, 1, k),
                      "top2": ref.token_choice(p, min(2, e), k), "top2_dropless": ref.token_choice(p, 2, n),
                      "top2_gshard": ref.token_choice(p, 2, k, second_uniform=u[gi].numpy())}
        for name, (gates, index) in routed.items():
            ref_gates, ref_index = ref_routed[name]
            assert index[gi].tolist() == ref_index.tolist(), name
            np.testing.assert_allclose(gates[gi].numpy(), ref_gates, atol=1e-14)
            y = ecmoe.moe_ffn(x, gates, index, w_in, w_out)[gi]
            ref_y = ref.moe_ffn(x[gi].numpy(), ref_gates, ref_index, w_in.numpy(), w_out.numpy())
            np.testing.assert_allclose(y.numpy(), ref_y, atol=1e-10)
        assert float(lb[gi]) == pytest.approx(ref.load_balancing_loss(p), abs=1e-12)
        assert float(zl[gi]) == pytest.approx(ref.router_z_loss((x[gi] @ w_router).numpy()), abs=1e-12)


def test_moe_ffn_empty_slots_add_nothing():
    """Slots with token_index -1 contribute exactly nothing, whatever their gate says."""
    x = torch.randn(5, 4, dtype=torch.float64)
    w_in, w_out = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 6, 4, dtype=torch.float64)
    index = torch.tensor([[3, -1], [-1, -1]])
    y = ecmoe.moe_ffn(x, torch.tensor([[0.5, 9.0], [7.0, 7.0]], dtype=torch.float64), index, w_in, w_out)
    expected = 0.5 * torch.nn.functional.gelu(x[3] @ w_in[0], approximate="tanh") @ w_out[0]
    assert torch.equal(y[[0, 1, 2, 4]], torch.zeros(4, 4, dtype=torch.float64))
    torch.testing.assert_close(y[3], expected)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("B,T,seed", [(4, 6, 0), (2, 8, 1), (1, 5, 2)])
def test_layer_matches_reference_float64(router, group, B, T, seed):
    """MoE forward == reference per group (outputs, (expert, token, gate) sets, losses), float64."""
    c = 1.0 if router == "capped_expert_choice" else 2.0  # c=1 < b=2 is feasible for every group
    layer = make_layer(router, group, c=c, seed=seed, max_iter=200).double()
    x = torch.randn(B, T, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    if router == "capped_expert_choice" and group == "position" and B == 1:
        # groups of 1 token: k=1 for each of e=4 experts, but the cap allows only b*n = 2 slots
        with pytest.raises(ValueError, match="infeasible in routing groups of n=1 tokens"):
            layer(x)
        return
    torch.manual_seed(seed)  # top2_gshard draws from the global generator
    out = layer(x)
    u = gshard_draws(layer, x, seed) if layer.router == "top2_gshard" else None
    y, aux, z, routes = reference_layer(layer, x, u)
    np.testing.assert_allclose(out.y.detach().numpy(), y, atol=1e-10)
    assert module_routes(layer, x, u) == routes
    assert out.aux_loss.item() == pytest.approx(aux, abs=1e-10)
    assert out.z_loss.item() == pytest.approx(z, abs=1e-10)


@pytest.mark.parametrize("router", ROUTERS)
def test_layer_float32_close_to_float64(router):
    """Float32 forward is within 1e-4 (relative to max |y|) of the float64 forward."""
    layer = make_layer(router, "sequence", c=1.0)
    x = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.random.fork_rng():  # top2_gshard: the same (float32) draws in both dtypes
        torch.manual_seed(0)
        y32 = layer(x).y
    with torch.random.fork_rng():
        torch.manual_seed(0)
        y64 = layer.double()(x.double()).y
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=0, atol=1e-4 * y64.abs().max().item())


@pytest.mark.parametrize("router", ROUTERS)
def test_bfloat16_autocast_router_fp32_experts_bf16(router):
    """Under bf16 autocast the router stays fp32 (same routing) and the experts run in bf16 (y within 3%)."""
    layer = make_layer(router, "batch", d=16, f=32, c=1.0)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(6))
    seen = []  # what forward hands to the router: probs dtype, gates, token_index
    route = layer.route
    layer.route = lambda probs, *u: seen.append((probs.dtype, *route(probs, *u))) or seen[-1][1:]
    torch.manual_seed(0)  # top2_gshard draws the same uniforms both times
    reference = layer(x)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    (dtype_plain, gates_plain, index_plain), (dtype_autocast, gates_autocast, index_autocast) = seen
    assert dtype_plain == dtype_autocast == torch.float32
    assert torch.equal(index_autocast, index_plain) and torch.equal(gates_autocast, gates_plain)
    assert not torch.equal(out.y, reference.y)  # the expert matmuls really ran in bf16
    scale = reference.y.abs().max().item()
    torch.testing.assert_close(out.y.float(), reference.y, rtol=0, atol=0.03 * scale)
    assert out.z_loss.item() == pytest.approx(reference.z_loss.item(), rel=1e-6)


# ----------------------------------------------------------------------------- gradients
def test_gradcheck_routers_and_losses():
    """Gates are differentiable w.r.t. probs (EC, top-1, top-2, GShard top-2, capped); losses too."""
    logits = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(3 * logits, -1).requires_grad_()
    torch.autograd.gradcheck(lambda p: ecmoe.expert_choice(p, 2)[0], (probs,))
    torch.autograd.gradcheck(lambda p: ecmoe.token_choice(p, 1, 2)[0], (probs,))
    torch.autograd.gradcheck(lambda p: ecmoe.token_choice(p, 2, 3)[0], (probs,))
    u = torch.tensor([0.9, 0.1, 0.5, 0.0, 0.99, 0.3], dtype=torch.float64)
    torch.autograd.gradcheck(lambda p: ecmoe.token_choice(p, 2, 3, second_uniform=u)[0], (probs,))
    torch.autograd.gradcheck(lambda p: ecmoe.capped_expert_choice(p, 2, 2)[0], (probs,))
    torch.autograd.gradcheck(lambda p: ecmoe.load_balancing_loss(p), (probs,))
    torch.autograd.gradcheck(ecmoe.router_z_loss, (logits.clone().requires_grad_(),))


def test_gradcheck_moe_ffn():
    """moe_ffn is differentiable w.r.t. x, gates, w_in and w_out (duplicates and empty slots included)."""
    g = torch.Generator().manual_seed(1)
    x, gates = torch.randn(2, 5, 3, generator=g, dtype=torch.float64), torch.rand(2, 3, 2, generator=g, dtype=torch.float64)
    w_in, w_out = torch.randn(3, 3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, 3, generator=g, dtype=torch.float64)
    index = torch.tensor([[[0, 1], [1, 4], [-1, 2]], [[3, 3], [0, -1], [4, 1]]])
    args = [t.requires_grad_() for t in (x, gates, w_in, w_out)]
    torch.autograd.gradcheck(lambda x, gt, a, b: ecmoe.moe_ffn(x, gt, index, a, b), args)


def test_gradcheck_layer_with_clear_margin():
    """The EC layer is differentiable w.r.t. x and weights where routing has a clear margin."""
    layer = make_layer("expert_choice", "sequence", d=4, f=5, e=3, c=1.0, seed=3).double()
    x = torch.randn(2, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    probs = ecmoe.router_probs(x, layer.w_router.detach()).transpose(-1, -2).sort(-1, descending=True).values
    k = ecmoe.expert_capacity(6, 3, 1.0)
    assert float((probs[..., k - 1] - probs[..., k]).min()) > 1e-4  # eps=1e-6 cannot flip routing
    x.requires_grad_()
    torch.autograd.gradcheck(lambda x: layer(x).y, (x,))
    params = (layer.w_router, layer.w_in, layer.w_out)

    def forward_with(w_router, w_in, w_out):
        probs = ecmoe.router_probs(x.detach(), w_router)
        gates, index = ecmoe.expert_choice(probs, k)
        return ecmoe.moe_ffn(x.detach(), gates, index, w_in, w_out)
    torch.autograd.gradcheck(forward_with, [p.detach().clone().requires_grad_() for p in params])


# ----------------------------------------------------------------------------- causality
# dropless top-2 has no capacity to compete for, so it is causal under every grouping
CAUSAL = [(r, "position") for r in ROUTERS] + [("top1", "batch"), ("top1", "sequence"),
                                               ("top2_dropless", "batch"), ("top2_dropless", "sequence")]


@pytest.mark.parametrize("router,group", CAUSAL)
def test_causal_routing_never_sees_the_future(router, group):
    """Changing tokens at positions > t never changes any output at positions <= t (exactly)."""
    B, T = 4, 6
    layer = make_layer(router, group, c=1.0 if router == "top1" else 2.0, max_iter=100)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, T, 8, generator=g)

    def run(x):  # top2_gshard: the same draws every call, so only x differs
        torch.manual_seed(0)
        return layer(x).y
    y = run(x)
    for t in range(T - 1):
        for _ in range(3):
            x2 = x.clone()
            x2[:, t + 1:] = 3 * torch.randn(B, T - t - 1, 8, generator=g)
            assert torch.equal(run(x2)[:, :t + 1], y[:, :t + 1]), (router, group, t)


def leaks(layer, x, x_changed, t):
    """True if changing positions > t (x -> x_changed) changed an output at positions <= t."""
    assert torch.equal(x[:, :t + 1], x_changed[:, :t + 1])
    torch.manual_seed(0)  # top2_gshard: the same draws for both calls
    y = layer(x).y
    torch.manual_seed(0)
    return not torch.equal(y[:, :t + 1], layer(x_changed).y[:, :t + 1])


def identity_router_layer(router, group, c):
    """2 experts, d=2, w_router = identity: a token's logits are its own features."""
    layer = make_layer(router, group, d=2, f=4, e=2, c=c)
    with torch.no_grad():
        layer.w_router.copy_(torch.eye(2))
    return layer


@pytest.mark.parametrize("group", ["batch", "sequence"])
def test_expert_choice_leaks_under_batch_and_sequence_grouping(group):
    """EC over a sequence is not causal: a future token can evict an earlier one from an expert."""
    layer = identity_router_layer("expert_choice", group, c=1.0)  # n=4, e=2 -> k=2
    x = torch.tensor([[[1.0, 0.0], [0.5, 0.0], [0.0, 1.0], [0.0, 0.5]]])  # E0 takes t0, t1
    x_changed = x.clone()
    x_changed[0, 3] = torch.tensor([3.0, 0.0])  # t3 now outranks t1 on E0: t1 loses its expert
    assert leaks(layer, x, x_changed, t=2)
    assert not leaks(identity_router_layer("expert_choice", "position", 1.0), x, x_changed, t=2)


@pytest.mark.parametrize("router", ["top2", "top2_gshard"])
@pytest.mark.parametrize("group", ["batch", "sequence"])
def test_top2_leaks_through_second_choice_capacity(router, group):
    """Top-2 is not causal over a sequence: a later FIRST choice changes an earlier SECOND choice."""
    layer = identity_router_layer(router, group, c=1.0)  # n=2, e=2 -> capacity 1
    # t0's renormalised g2 = 0.27 >= 0.2, so top2_gshard keeps its second choice whatever u is
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # 1st: t0->E0, t1->E1; t0's 2nd (E1) is dropped
    x_changed = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])  # t1 -> E0 (dropped); now E1 takes t0
    assert leaks(layer, x, x_changed, t=0)
    assert not leaks(identity_router_layer("top1", group, 1.0), x, x_changed, t=0)
    assert not leaks(identity_router_layer("top2_dropless", group, 1.0), x, x_changed, t=0)


# ----------------------------------------------------------------------------- tiny groups
def test_single_token_group_every_expert_takes_it():
    """group="position" at batch size 1: n=1, so k=1 and every expert processes the one token."""
    layer = make_layer("expert_choice", "position", e=4, c=2.0).double()
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    probs = ecmoe.router_probs(x, layer.w_router)[0]  # [T, e]
    expected = sum(probs[:, i, None] * torch.nn.functional.gelu(x[0] @ layer.w_in[i], approximate="tanh")
                   @ layer.w_out[i] for i in range(4))
    out = layer(x)
    torch.testing.assert_close(out.y[0], expected)
    assert out.stats.experts_per_token.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]  # 4 experts each


def test_group_smaller_than_e_over_c_gets_k_one():
    """A group of n < e/c tokens gets k = 1 (not 0): each expert takes its single best token."""
    assert ecmoe.expert_capacity(3, 16, 2.0) == 1
    layer = make_layer("expert_choice", "position", e=16, c=2.0)
    index = layer.route(ecmoe.router_probs(layer.group_tokens(torch.randn(3, 2, 8)), layer.w_router))[1]
    assert index.shape == (2, 16, 1) and bool((index >= 0).all())


# ----------------------------------------------------------------------------- bad input
def test_bad_layer_inputs_raise_clear_errors():
    """ValueError naming the argument for integer x, wrong last dim, non-3-D x, NaN x."""
    layer = make_layer("expert_choice", "batch")
    with pytest.raises(ValueError, match="x must be a floating-point"):
        layer(torch.ones(2, 3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="3-D"):
        layer(torch.randn(6, 8))
    with pytest.raises(ValueError, match="finite"):
        layer(torch.full((2, 3, 8), float("nan")))


def test_infeasible_cap_error_names_the_group_and_the_fixes():
    """The README's own capped example at its defaults (8 sequences in position groups, 32
    experts, c = b = 2) fails with an error naming the routing-group size and what would fix it;
    where a lower capacity factor would do, it names the largest one."""
    layer = ecmoe.MoE(256, 16, 32, router="capped_expert_choice", group="position")
    with pytest.raises(ValueError, match=r"n=8 tokens \(group='position'\).*larger routing group"
                                         r".*max_experts_per_token >= 4$"):
        layer(torch.randn(8, 2, 256))
    small = ecmoe.MoE(16, 8, 4, router="capped_expert_choice", group="position")
    with pytest.raises(ValueError, match=r"n=3 tokens.*capacity_factor <= 1\.33333"):
        small(torch.randn(3, 2, 16))
    # and that capacity factor is indeed feasible there
    ecmoe.MoE(16, 8, 4, router="capped_expert_choice", group="position",
              capacity_factor=4 / 3)(torch.randn(3, 2, 16))


def test_bad_constructor_arguments_raise():
    """Unknown router/group, bad capacity_factor and infeasible caps are ValueErrors."""
    with pytest.raises(ValueError, match="router must be one of"):
        ecmoe.MoE(8, 16, 4, router="top3")
    with pytest.raises(ValueError, match="group must be one of"):
        ecmoe.MoE(8, 16, 4, group="token")
    for c in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="capacity_factor"):
            ecmoe.MoE(8, 16, 4, capacity_factor=c)
    with pytest.raises(ValueError, match="capacity_factor must be <= max_experts_per_token"):
        ecmoe.MoE(8, 16, 4, router="capped_expert_choice", capacity_factor=3.0, max_experts_per_token=2)
    with pytest.raises(ValueError, match="infeasible in routing groups of n=1 tokens"):  # 4 experts
        make_layer("capped_expert_choice", "position", e=4, c=1.0)(torch.randn(1, 3, 8))
    for router in ("top2", "top2_dropless", "top2_gshard"):
        with pytest.raises(ValueError, match=f"n_experts must be >= 2 for router='{router}'"):
            ecmoe.MoE(8, 16, 1, router=router)
    for threshold in (0.0, -0.2, float("nan"), True):
        with pytest.raises(ValueError, match="second_threshold must be a finite number > 0"):
            ecmoe.MoE(8, 16, 4, router="top2_gshard", second_threshold=threshold)
    for kw, match in [(dict(entropy_weight=0.0), "entropy_weight"), (dict(entropy_weight=-1e-2), "entropy_weight"),
                      (dict(max_iter=0), "max_iter"), (dict(tol=float("nan")), "tol"), (dict(tol=-1.0), "tol")]:
        with pytest.raises(ValueError, match=match):
            ecmoe.MoE(8, 16, 4, router="capped_expert_choice", **kw)


def test_bad_function_arguments_raise():
    """Functions reject out-of-range k, top_k, capacity, caps, token indices, NaN and non-probabilities."""
    probs = softmax_probs(5, 3)
    for call, match in [
            (lambda: ecmoe.expert_choice(probs, 0), r"k must be an integer in \[1, 5\]"),
            (lambda: ecmoe.expert_choice(probs, 6), r"k must be an integer in \[1, 5\]"),
            (lambda: ecmoe.expert_choice(probs * 2, 2), r"probs must lie in \[0, 1\]"),
            (lambda: ecmoe.expert_choice(probs[0], 1), "at least 2 dims"),
            (lambda: ecmoe.expert_choice(probs.clone().fill_(float("nan")), 1), "finite"),
            (lambda: ecmoe.token_choice(probs, 4, 2), r"top_k must be an integer in \[1, 3\]"),
            (lambda: ecmoe.token_choice(probs, 1, 0), "capacity must be an integer"),
            (lambda: ecmoe.token_choice(probs, 1, 2, second_uniform=torch.zeros(5)), "second_uniform needs top_k=2"),
            (lambda: ecmoe.token_choice(probs, 2, 2, second_uniform=torch.zeros(4)),
             r"second_uniform must be a floating-point tensor of shape \[..., n\] = \(5,\)"),
            (lambda: ecmoe.token_choice(probs, 2, 2, second_uniform=torch.zeros(5, dtype=torch.long)),
             "second_uniform must be a floating-point"),
            (lambda: ecmoe.token_choice(probs, 2, 2, second_uniform=torch.ones(5)), r"second_uniform must lie in \[0, 1\)"),
            (lambda: ecmoe.token_choice(probs, 2, 2, second_uniform=torch.full((5,), -0.5)), r"second_uniform must lie"),
            (lambda: ecmoe.token_choice(probs, 2, 2, second_uniform=torch.full((5,), float("nan"))), "second_uniform must lie"),
            (lambda: ecmoe.token_choice(probs, 2, 2, second_threshold=0.0), "second_threshold must be"),
            (lambda: ecmoe.capped_expert_choice(probs, 4, 2), "infeasible"),  # 2*5 < 4*3
            (lambda: ecmoe.capped_expert_choice(probs, 2, 0), "max_experts_per_token must be"),
            (lambda: ecmoe.capped_expert_choice(probs, 1, 2, entropy_weight=0.0), "entropy_weight"),
            (lambda: ecmoe.solve_capped_lp(probs, 1, 2, tol=float("nan")), "tol must be"),
            (lambda: ecmoe.expert_capacity(0, 4, 1.0), "n_tokens"),
            (lambda: ecmoe.router_z_loss(torch.tensor([[float("inf"), 0.0]])), "logits must be finite"),
            (lambda: ecmoe.moe_ffn(torch.randn(5, 2), torch.ones(3, 1), torch.full((3, 1), 5),
                                   torch.randn(3, 2, 4), torch.randn(3, 4, 2)), r"token_index must lie in \[-1, 5\)"),
            (lambda: ecmoe.moe_ffn(torch.randn(5, 2), torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.long),
                                   torch.randn(3, 3, 4), torch.randn(3, 4, 3)), "w_in must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


# ----------------------------------------------------------------------------- sync-free forward
def test_check_inputs_runs_value_checks_on_cpu_by_default_and_on_request():
    """check_inputs: None checks values on CPU (not on other devices), True always, False never."""
    x_nan = torch.full((2, 3, 8), float("nan"))
    for check_inputs in (None, True):
        with pytest.raises(ValueError, match="x must be finite"):
            make_layer("expert_choice", "batch", check_inputs=check_inputs)(x_nan)
    layer = make_layer("expert_choice", "batch")
    assert layer.value_checks_on(torch.randn(1)) and not layer.value_checks_on(torch.empty(1, device="meta"))
    assert make_layer("top1", "batch", check_inputs=True).value_checks_on(torch.empty(1, device="meta"))
    for router in ("expert_choice", "top1", "top2", "top2_gshard"):  # unchecked: runs, no error
        out = make_layer(router, "batch", check_inputs=False)(x_nan)
        assert out.y.shape == (2, 3, 8)
    bad_router = make_layer("top2", "batch")
    with torch.no_grad():
        bad_router.w_router[0, 0] = float("inf")
    with pytest.raises(ValueError, match="router probabilities are NaN"):
        bad_router(torch.ones(2, 3, 8))
    bad_router.check_inputs = False
    bad_router(torch.ones(2, 3, 8))  # no check, no error
    with pytest.raises(ValueError, match="check_inputs must be None"):
        ecmoe.MoE(8, 16, 4, check_inputs="cpu")
    with pytest.raises(ValueError, match="x must be a floating-point"):  # type checks always run
        make_layer("expert_choice", "batch", check_inputs=False)(torch.ones(2, 3, 8, dtype=torch.long))


def compiled_matches_eager(router, backend):
    layer = make_layer(router, "batch", d=8, f=16, e=4)
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(layer, fullgraph=True, backend=backend, dynamic=False)
    torch.manual_seed(0)  # top2_gshard: the same draws (eager RNG under aot_eager)
    out = compiled(x)
    torch.manual_seed(0)
    eager = layer(x)
    torch.testing.assert_close(out.y, eager.y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, eager.aux_loss)
    torch.testing.assert_close(out.z_loss, eager.z_loss)
    for got, want in zip(out.stats, eager.stats):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("router", ["expert_choice", "top1", "top2", "top2_gshard"])
def test_forward_traces_as_one_graph(router):
    """torch.compile(fullgraph=True) traces the forward without a graph break (aot_eager) = eager."""
    compiled_matches_eager(router, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("router", ["expert_choice", "top1", "top2"])
def test_forward_compiles_with_inductor(router):
    """The default torch.compile backend (inductor, needs a C compiler) with fullgraph=True = eager."""
    compiled_matches_eager(router, "inductor")


def test_extra_repr_shows_the_settings():
    """print(moe) shows sizes, router, capacity factor, group, and the router's own settings."""
    assert repr(ecmoe.MoE(8, 16, 4)) == ("MoE(d_model=8, d_ff=16, n_experts=4, router='expert_choice', "
                                         "capacity_factor=2.0, group='batch')")
    capped = repr(ecmoe.MoE(8, 16, 4, router="capped_expert_choice", capacity_factor=1.0, group="position"))
    assert "router='capped_expert_choice', capacity_factor=1.0, group='position', max_experts_per_token=2, " \
           f"entropy_weight={ecmoe.DEFAULT_ENTROPY_WEIGHT}, max_iter={ecmoe.DEFAULT_MAX_ITER}, tol={ecmoe.DEFAULT_TOL}" in capped
    assert "second_threshold=0.3" in repr(ecmoe.MoE(8, 16, 4, router="top2_gshard", second_threshold=0.3))
    assert "capacity_factor=ignored (dropless)" in repr(ecmoe.MoE(8, 16, 4, router="top2_dropless"))
    assert "check_inputs=False" in repr(ecmoe.MoE(8, 16, 4, check_inputs=False))
    assert "max_iter" not in repr(ecmoe.MoE(8, 16, 4, router="top1"))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("router", ["expert_choice", "top1", "top2", "top2_gshard"])
def test_cuda_forward_and_backward_never_sync(router):
    """On CUDA the training forward (and backward) makes no host-device sync (sync debug mode 'error')."""
    layer = make_layer(router, "batch", d=16, f=32, e=4).cuda()
    x = torch.randn(4, 8, 16, device="cuda")
    layer(x)  # warm-up: lazy CUDA init may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
        (out.y.square().mean() + 0.01 * out.aux_loss + 1e-3 * out.z_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- GPU (CuPy reference)
@pytest.mark.gpu
@requires_cuda
@requires_cupy
@pytest.mark.parametrize("router", ROUTERS)
def test_cuda_layer_matches_cupy_reference(router):
    """On CUDA, the layer equals the reference run on CuPy arrays (float64, per group)."""
    import cupy
    layer = make_layer(router, "sequence", d=16, f=32, e=4, c=1.0, max_iter=200).double().cuda()
    x = torch.randn(3, 16, 16, dtype=torch.float64, device="cuda")
    out = layer(x)
    w = {name: cupy.asarray(p.detach().cpu().numpy()) for name, p in layer.named_parameters()}
    for b in range(3):
        x_g = cupy.asarray(x[b].cpu().numpy())
        probs = ref.router_probs(x_g, w["w_router"])
        k = ref.expert_capacity(16, 4, 1.0)
        if router == "expert_choice":
            gates, index = ref.expert_choice(probs, k)
        elif router == "capped_expert_choice":
            gates, index = ref.capped_expert_choice(probs, k, 2, max_iter=200)
        else:
            gates, index = ref.token_choice(probs, 1 if router == "top1" else 2, k)
        assert isinstance(gates, cupy.ndarray)
        y = ref.moe_ffn(x_g, gates, index, w["w_in"], w["w_out"])
        np.testing.assert_allclose(out.y[b].detach().cpu().numpy(), cupy.asnumpy(y), atol=1e-9)
        module_index = layer.route(ecmoe.router_probs(x[b:b + 1], layer.w_router))[1][0]
        assert module_index.cpu().tolist() == cupy.asnumpy(index).tolist()


@pytest.mark.gpu
@requires_cuda
def test_cuda_matches_cpu_and_bf16_autocast_runs():
    """The same layer on CUDA matches CPU (fp32), and runs under CUDA bf16 autocast."""
    layer = make_layer("expert_choice", "batch", d=16, f=32, e=4)
    x = torch.randn(4, 8, 16)
    y_cpu = layer(x).y
    layer = layer.cuda()
    torch.testing.assert_close(layer(x.cuda()).y.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x.cuda()).y
    torch.testing.assert_close(y.float().cpu(), y_cpu, rtol=0, atol=0.03 * float(y_cpu.abs().max()))


# ----------------------------------------------------------------------------- benchmark smoke
def test_bench_quick_runs(tmp_path):
    """`python bench.py --quick --json PATH` runs and writes timings for every method."""
    path = tmp_path / "bench.json"
    subprocess.run([sys.executable, "bench.py", "--quick", "--json", str(path)], check=True,
                   capture_output=True, text=True, timeout=120)
    result = json.loads(path.read_text())
    assert {"hardware", "torch", "threads", "rows"} <= set(result)
    assert result["rows"] and all("dense_ms" in row and "ec_ms" in row for row in result["rows"])


# ----------------------------------------------------------------------------- inference: thresholds
def trained_threshold_layer(group="position", seed=0, steps=3, **kw):
    """An expert-choice layer (float64) after a few training-mode forwards, switched to eval."""
    layer = make_layer("expert_choice", group, seed=seed, eval_routing="threshold", **kw).double()
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(steps):
        layer(torch.randn(6, 5, 8, generator=g, dtype=torch.float64))
    return layer.eval()


def test_threshold_choice_tiny_case_by_hand():
    """threshold_choice: token t goes to expert i iff S[t, i] >= threshold[i]; slots best first."""
    probs = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]], dtype=torch.float64)
    gates, index = ecmoe.threshold_choice(probs, torch.tensor([0.5, 0.8], dtype=torch.float64))
    # expert 0 takes tokens 0 (0.6) and 2 (0.5 >= 0.5); expert 1 takes none (0.7 < 0.8)
    assert index.tolist() == [[0, 2], [-1, -1]]
    assert gates.tolist() == [[0.6, 0.5], [0.0, 0.0]]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n,e", [(1, 4), (7, 3), (33, 8)])
def test_threshold_choice_matches_reference_float64(n, e, seed):
    """threshold_choice equals reference_numpy's, thresholds picking none, some or all tokens."""
    probs = softmax_probs(n, e, seed=seed, scale=2.0)
    g = torch.Generator().manual_seed(seed)
    for threshold in (torch.rand(e, generator=g, dtype=torch.float64) / e, torch.zeros(e, dtype=torch.float64),
                      torch.full((e,), 2.0, dtype=torch.float64)):
        gates, index = ecmoe.threshold_choice(probs, threshold)
        ref_gates, ref_index = ref.threshold_choice(probs.numpy(), threshold.numpy())
        assert index.tolist() == ref_index.tolist()
        np.testing.assert_allclose(gates.numpy(), ref_gates, rtol=0, atol=1e-12)


@pytest.mark.parametrize("group", GROUPS)
def test_threshold_routing_is_batch_independent(group):
    """eval_routing="threshold": a sequence's output alone equals its output inside any batch."""
    layer = trained_threshold_layer(group)
    x = torch.randn(8, 5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alone = torch.cat([layer(x[i:i + 1]).y for i in range(8)])
    for B in (2, 4, 8):
        together = torch.cat([layer(x[i:i + B]).y for i in range(0, 8, B)])
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("group", GROUPS)
def test_threshold_routing_is_causal_at_batch_size_one(group):
    """eval_routing="threshold", batch size 1: changing tokens after t leaves outputs <= t alone
    (even for group="batch" and "sequence", whose group routing sees the future)."""
    layer = trained_threshold_layer(group)
    x = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for t in range(5):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(1, 5 - t, 8, dtype=torch.float64) * 3
        # not bitwise: the busiest expert's slot count (a matmul shape) may change
        torch.testing.assert_close(layer(x2).y[:, :t + 1], layer(x).y[:, :t + 1], rtol=0, atol=1e-12)


def test_thresholds_move_in_training_forwards_only():
    """threshold and threshold_updates change in train() forwards, never in eval(), either mode."""
    layer = make_layer("expert_choice", "position", eval_routing="threshold").double()
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    before = layer.threshold.clone()
    layer(x)
    assert int(layer.threshold_updates) == 1 and not torch.equal(layer.threshold, before)
    for mode in ("threshold", "group"):
        layer.eval_routing = mode
        layer.eval()
        frozen = layer.threshold.clone()
        with torch.no_grad():
            layer(x)
        assert torch.equal(layer.threshold, frozen) and int(layer.threshold_updates) == 1
        layer.train()


def test_threshold_is_an_ema_of_the_kth_best_score():
    """threshold = EMA (decay 0.9 here) of each expert's k-th best probability, mean over groups;
    the first forward sets it."""
    layer = make_layer("expert_choice", "position", threshold_decay=0.9).double()
    xs = [torch.randn(4, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
          for s in range(2)]
    kth = []
    for x in xs:
        layer(x)
        probs = ecmoe.router_probs(layer.group_tokens(x), layer.w_router).detach().numpy()
        k = ecmoe.expert_capacity(4, 4, 2.0)
        kth.append(np.mean([ref.expert_choice(p, k)[0][:, -1] for p in probs], axis=0))
    np.testing.assert_allclose(layer.threshold.numpy(), 0.9 * kth[0] + 0.1 * kth[1], rtol=0, atol=1e-12)


def test_thresholds_survive_save_and_load(tmp_path):
    """threshold buffers travel in state_dict: a reloaded layer routes the same at inference."""
    layer = trained_threshold_layer()
    torch.save(layer.state_dict(), tmp_path / "moe.pt")
    fresh = make_layer("expert_choice", "position", seed=5, eval_routing="threshold").double()
    fresh.load_state_dict(torch.load(tmp_path / "moe.pt", weights_only=True))
    fresh.eval()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    assert torch.equal(fresh.threshold, layer.threshold) and int(fresh.threshold_updates) == 3
    torch.testing.assert_close(fresh(x).y, layer(x).y, rtol=0, atol=0)


@pytest.mark.parametrize("group", GROUPS)
def test_group_eval_routing_is_bitwise_the_plain_layer(group):
    """eval_routing="group" (default) and "threshold" in training mode compute exactly the
    functional expert_choice layer: thresholds are bookkeeping only."""
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    for mode in ("group", "threshold"):
        layer = make_layer("expert_choice", group, eval_routing=mode).double()
        xg = layer.group_tokens(x)
        probs = ecmoe.router_probs(xg, layer.w_router)
        gates, index = ecmoe.expert_choice(probs, ecmoe.expert_capacity(xg.shape[1], 4, 2.0))
        plain = layer.ungroup_tokens(ecmoe.moe_ffn(xg, gates, index, layer.w_in, layer.w_out), 4, 5)
        assert torch.equal(layer(x).y, plain)          # training mode
        if mode == "group":
            assert torch.equal(layer.eval()(x).y, plain)


def test_threshold_stats_report_loads_around_k():
    """In threshold routing, expert_load and load/overflow describe the varying buckets."""
    layer = trained_threshold_layer(steps=20)
    out = layer(torch.randn(64, 5, 8, dtype=torch.float64))
    load = out.stats.expert_load
    assert load.shape == (4,) and bool((load >= 0).all())
    assert float(out.stats.load_max_over_mean) >= 1.0
    layer.train()
    trained = layer(torch.randn(64, 5, 8, dtype=torch.float64)).stats
    # group routing: every expert takes exactly k of the n tokens of a group
    assert torch.allclose(trained.expert_load, torch.full((4,), ecmoe.expert_capacity(64, 4, 2.0) / 64,
                                                          dtype=trained.expert_load.dtype))


def test_bad_eval_routing_raises_clear_errors():
    """Bad eval_routing / threshold_decay values, and thresholds never trained, name the problem."""
    with pytest.raises(ValueError, match="eval_routing must be 'group' or 'threshold'"):
        ecmoe.MoE(8, 16, 4, eval_routing="greedy")
    for router in ("capped_expert_choice", "top2", "top1"):
        with pytest.raises(ValueError, match="needs router='expert_choice'"):
            ecmoe.MoE(8, 16, 4, router=router, eval_routing="threshold")
    for decay in (1.0, -0.1, "0.9", True):
        with pytest.raises(ValueError, match="threshold_decay"):
            ecmoe.MoE(8, 16, 4, threshold_decay=decay)
    fresh = ecmoe.MoE(8, 16, 4, eval_routing="threshold").eval()
    with pytest.raises(ValueError, match="never run a training-mode forward"):
        fresh(torch.randn(2, 3, 8))
    fresh.eval_routing = "thresh"                   # a bad attribute is caught at the forward
    with pytest.raises(ValueError, match="eval_routing must be"):
        fresh(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"threshold must have shape \[e=4\]"):
        ecmoe.threshold_choice(softmax_probs(3, 4), torch.zeros(3, dtype=torch.float64))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("group", GROUPS)
def test_cuda_threshold_routing_matches_cpu(group):
    """On CUDA, threshold routing (float64) equals the CPU layer and is batch-independent; the
    thresholds learned by CUDA training forwards equal the CPU ones."""
    layer = trained_threshold_layer(group)
    x = torch.randn(8, 5, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cpu = layer(x).y
    gpu_layer = trained_threshold_layer(group).cuda()  # not trained on the GPU yet: copy, then train both
    gpu_layer.load_state_dict(layer.state_dict())
    torch.testing.assert_close(gpu_layer(x.cuda()).y.cpu(), cpu, rtol=0, atol=1e-10)
    alone = torch.cat([gpu_layer(x[i:i + 1].cuda()).y for i in range(8)]).cpu()
    torch.testing.assert_close(alone, cpu, rtol=0, atol=1e-10)
    layer.train(), gpu_layer.train()
    layer(x), gpu_layer(x.cuda())
    torch.testing.assert_close(gpu_layer.threshold.cpu(), layer.threshold, rtol=0, atol=1e-12)
