"""Properties of moe/grouped.py: the grouped expert path computes what the padded path computes.

Float64 runs take the per-expert loop (torch._grouped_mm has no float64) and agree with
ecmoe.moe_ffn to ~1e-12; float32 runs with d, f multiples of 4 take torch._grouped_mm where this
torch has it and agree to float32 tolerances. "No host sync" is checked on CPU by recording every
op that reads tensor values to the host or whose output shape depends on them (a sync on a GPU).
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ecmoe
from conftest import requires_cuda
from moe.grouped import (GroupedDroplessMoE, GroupedLossFreeMoE, GroupedMoE, dropless_top_k_ffn,
                         grouped_expert_ffn, grouped_moe_ffn, grouped_mm_supported)
from moe.token_choice import LossFreeMoE, TokenChoiceMoE

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
F64 = dict(rtol=1e-12, atol=1e-12)
F32 = dict(rtol=1e-4, atol=1e-5)


def random_slots(G, n, e, s, empty=0.3, seed=0, dtype=torch.float64):
    """gates, token_index [G, e, s]: random tokens, a fraction `empty` of slots -1 (with a gate
    that must be ignored), and a token at most once per expert."""
    g = torch.Generator().manual_seed(seed)
    token_index = torch.rand(G, e, n, generator=g).argsort(-1)[..., :s]  # distinct tokens
    token_index = torch.where(torch.rand(G, e, s, generator=g) < empty, -1, token_index)
    return torch.rand(G, e, s, generator=g, dtype=dtype), token_index


def random_weights(e, d, f, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, d, f, generator=g, dtype=dtype) / d ** 0.5, \
        torch.randn(e, f, d, generator=g, dtype=dtype) / f ** 0.5


def value_and_grads(fn, x, gates, w_in, w_out, *args):
    """y = fn(x, gates, *args, w_in, w_out) and d(sum y^2)/d(x, gates, w_in, w_out)."""
    leaves = [t.detach().requires_grad_() for t in (x, gates, w_in, w_out)]
    x, gates, w_in, w_out = leaves
    y = fn(x, gates, *args, w_in, w_out)
    return (y, *torch.autograd.grad(y.square().sum(), leaves, allow_unused=True))


def assert_all_close(got, want, **tol):
    for name, a, b in zip(("y", "dx", "dgates", "dw_in", "dw_out"), got, want):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


def copied(layer, cls, **kw):
    """A `cls` layer with `layer`'s weights."""
    other = cls(layer.d_model, layer.d_ff, layer.n_experts, group=layer.group, **kw).to(layer.w_in.dtype)
    other.load_state_dict(layer.state_dict())
    return other


# ----------------------------------------------------------------------------- a case by hand
def test_dropless_top_k_is_each_token_summing_its_k_experts():
    """y[t] = sum over t's top-k experts i of g_i(t) FFN_i(x[t]), gates renormalised: the
    definition, token by token, in a loop a student can follow."""
    torch.manual_seed(0)
    G, n, d, f, e, k = 2, 5, 4, 6, 3, 2
    x, probs = torch.randn(G, n, d, dtype=torch.float64), torch.randn(G, n, e, dtype=torch.float64).softmax(-1)
    w_in, w_out = random_weights(e, d, f)
    y, demand = dropless_top_k_ffn(x, probs, k, w_in, w_out)
    for g in range(G):
        for t in range(n):
            top = probs[g, t].argsort(descending=True)[:k]
            want = sum(probs[g, t, i] / probs[g, t, top].sum()
                       * (F.gelu(x[g, t] @ w_in[i], approximate="tanh") @ w_out[i]) for i in top)
            torch.testing.assert_close(y[g, t], want, **F64)
    chosen = probs.argsort(-1, descending=True)[..., :k]  # [G, n, k]
    assert demand.tolist() == [[float((chosen[g] == i).sum()) for i in range(e)] for g in range(G)]


# ----------------------------------------------------------------------------- equal to the padded path
@pytest.mark.parametrize("lead, n, e, s, seed", [((1,), 7, 3, 4, 0), ((5,), 9, 4, 6, 1), ((2, 3), 6, 5, 6, 2),
                                                 ((4,), 16, 8, 3, 3)])
def test_grouped_equals_padded_float64(lead, n, e, s, seed):
    """grouped_moe_ffn = ecmoe.moe_ffn to 1e-12 in float64, value and gradients (x, gates, w_in,
    w_out), for one group and many (and two leading dims), empty slots included."""
    d, f = 6, 10
    gates, token_index = random_slots(int(torch.tensor(lead).prod()), n, e, s, seed=seed)
    gates, token_index = gates.view(*lead, e, s), token_index.view(*lead, e, s)
    x = torch.randn(*lead, n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w_in, w_out = random_weights(e, d, f, seed)
    got = value_and_grads(grouped_moe_ffn, x, gates, w_in, w_out, token_index)
    assert_all_close(got, value_and_grads(ecmoe.moe_ffn, x, gates, w_in, w_out, token_index), **F64)


@pytest.mark.parametrize("G", [1, 4])
def test_grouped_equals_padded_float32(G):
    """In float32 with d, f multiples of 4 (the torch._grouped_mm path where torch has it) the two
    paths agree to float32 tolerances, value and gradients."""
    n, d, f, e, s = 12, 8, 16, 4, 5
    gates, token_index = random_slots(G, n, e, s, dtype=torch.float32)
    x = torch.randn(G, n, d)
    w_in, w_out = random_weights(e, d, f, dtype=torch.float32)
    assert grouped_mm_supported(x[0], w_in) == HAS_GROUPED_MM
    got = value_and_grads(grouped_moe_ffn, x, gates, w_in, w_out, token_index)
    assert_all_close(got, value_and_grads(ecmoe.moe_ffn, x, gates, w_in, w_out, token_index), **F32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_empty_experts_and_all_slots_empty(dtype):
    """An expert with no filled slot gets no rows (zero weight gradient); with every slot empty
    y is 0 and every gradient 0, as in the padded path."""
    G, n, d, f, e, s = 3, 8, 8, 8, 4, 5
    gates, token_index = random_slots(G, n, e, s, dtype=dtype)
    token_index[:, 1] = -1  # expert 1 empty in every group
    token_index[:, 3] = -1
    x = torch.randn(G, n, d, dtype=dtype)
    w_in, w_out = random_weights(e, d, f, dtype=dtype)
    tol = F64 if dtype == torch.float64 else F32
    got = value_and_grads(grouped_moe_ffn, x, gates, w_in, w_out, token_index)
    assert_all_close(got, value_and_grads(ecmoe.moe_ffn, x, gates, w_in, w_out, token_index), **tol)
    assert got[3][1].abs().max() == 0 and got[4][3].abs().max() == 0
    y, dx, dgates, dw_in, dw_out = value_and_grads(grouped_moe_ffn, x, gates, w_in, w_out,
                                                   torch.full_like(token_index, -1))
    assert all(t.abs().max() == 0 for t in (y, dx, dgates, dw_in, dw_out))


def test_rows_given_equals_rows_counted():
    """grouped_moe_ffn(rows=m) with the true count m gives exactly what the counting path gives."""
    gates, token_index = random_slots(3, 9, 4, 6)
    x, (w_in, w_out) = torch.randn(3, 9, 6, dtype=torch.float64), random_weights(4, 6, 10)
    m = int((token_index >= 0).sum())
    assert torch.equal(grouped_moe_ffn(x, gates, token_index, w_in, w_out, rows=m),
                       grouped_moe_ffn(x, gates, token_index, w_in, w_out))


# ----------------------------------------------------------------------------- the layers
@pytest.mark.parametrize("group", ecmoe.GROUPS)
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_grouped_dropless_layer_equals_padded_dropless_layer(group, top_k):
    """GroupedDroplessMoE = TokenChoiceMoE(top_k, dropless=True) with copied weights, float64: y,
    aux and z losses, every routing statistic, and the gradients of x and of every parameter."""
    torch.manual_seed(0)
    padded = TokenChoiceMoE(8, 12, 5, top_k=top_k, dropless=True, group=group).double()
    with torch.no_grad():
        padded.w_router.normal_(0, 1.0)  # decisive routing: uneven loads
    layer = copied(padded, GroupedDroplessMoE, top_k=top_k)
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    outs, grads = [], []
    for module in (padded, layer):
        xx = x.clone().requires_grad_()
        out = module(xx)
        (out.y.square().sum() + out.aux_loss + out.z_loss).backward()
        outs.append(out)
        grads.append([xx.grad] + [p.grad for p in module.parameters()])
    (want, got) = outs
    torch.testing.assert_close(got.y, want.y, **F64)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, **F64)
    torch.testing.assert_close(got.z_loss, want.z_loss, **F64)
    for name, a, b in zip(want.stats._fields, got.stats, want.stats):
        torch.testing.assert_close(a, b, msg=lambda m: f"stats.{name}: {m}")
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **F64)


@pytest.mark.parametrize("group", ecmoe.GROUPS)
def test_grouped_lossfree_layer_equals_padded_lossfree_over_steps(group):
    """GroupedLossFreeMoE = LossFreeMoE with copied weights, float64, three optimizer steps of two
    training forwards (u = 0.05, so the bias soon moves the choices): y, the routing statistics,
    the gradients, the counted loads and the bias after every update_bias; then an eval forward."""
    torch.manual_seed(4)
    padded = LossFreeMoE(8, 12, 5, top_k=2, bias_rate=0.05, group=group).double()
    with torch.no_grad():
        padded.w_router.normal_(0, 1.0)
    layer = copied(padded, GroupedLossFreeMoE, bias_rate=0.05)
    g = torch.Generator().manual_seed(4)
    for step in range(3):
        for _ in range(2):
            x = torch.randn(3, 7, 8, dtype=torch.float64, generator=g)
            outs, grads = [], []
            for module in (padded, layer):
                xx = x.clone().requires_grad_()
                out = module(xx)
                (out.y.square().sum() + out.z_loss).backward()
                outs.append(out)
                grads.append([xx.grad] + [p.grad for p in module.parameters()])
                module.zero_grad()
            torch.testing.assert_close(outs[1].y, outs[0].y, **F64)
            assert outs[1].aux_loss == 0 and outs[0].aux_loss == 0
            for name, a, b in zip(outs[0].stats._fields, outs[1].stats, outs[0].stats):
                torch.testing.assert_close(a, b, msg=lambda m: f"stats.{name}: {m}")
            for a, b in zip(*grads):
                torch.testing.assert_close(b, a, **F64)
        assert torch.equal(layer.expert_load, padded.expert_load)
        padded.update_bias(), layer.update_bias()
        assert torch.equal(layer.expert_bias, padded.expert_bias)
    assert padded.expert_bias.abs().max() > 0
    padded.eval(), layer.eval()
    torch.testing.assert_close(layer(x).y, padded(x).y, **F64)
    assert torch.equal(layer.expert_load, padded.expert_load)  # eval counts nothing


def test_dropless_function_equals_the_padded_layer():
    """dropless_top_k_ffn on the router's probabilities gives the padded dropless layer's y and
    the demand its route reports."""
    torch.manual_seed(1)
    padded = TokenChoiceMoE(8, 12, 4, top_k=2, dropless=True, group="sequence").double()
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    probs = ecmoe.router_probs(x, padded.w_router)  # group "sequence": x is [G, n, d] already
    y, demand = dropless_top_k_ffn(x, probs, 2, padded.w_in, padded.w_out)
    torch.testing.assert_close(y, padded(x).y, **F64)
    torch.testing.assert_close(demand, padded.route(probs).demand, rtol=0, atol=0)


def test_grouped_threshold_eval_equals_padded():
    """GroupedMoE (the GroupedExperts mixin on ecmoe.MoE) with eval_routing="threshold" gives the
    padded layer's y in eval, and in training (expert choice, every slot filled) too."""
    torch.manual_seed(2)
    padded = ecmoe.MoE(8, 12, 4, eval_routing="threshold").double()
    layer = copied(padded, GroupedMoE, eval_routing="threshold")
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x).y, padded(x).y, **F64)  # training: thresholds learn
    torch.testing.assert_close(layer.threshold, padded.threshold, rtol=0, atol=0)
    layer.eval(), padded.eval()
    out, want = layer(x[:1]), padded(x[:1])
    assert want.stats.expert_load.max() > want.stats.expert_load.min()  # the loads vary
    torch.testing.assert_close(out.y, want.y, **F64)


def test_grouped_dropless_layer_rejects_random_second():
    """GroupedDroplessMoE has no random_second argument (its row count would depend on the draws)."""
    with pytest.raises(TypeError):
        GroupedDroplessMoE(8, 12, 4, random_second=True)


def test_bfloat16_autocast_close_to_padded():
    """Under CPU bfloat16 autocast the grouped dropless layer stays within bf16 rounding of the
    padded one (both cast the expert matmuls to bfloat16)."""
    torch.manual_seed(3)
    padded = TokenChoiceMoE(16, 32, 4, top_k=2, dropless=True)
    layer = copied(padded, GroupedDroplessMoE)
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = layer(x).y, padded(x).y
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------- host syncs
class HostReads(TorchDispatchMode):
    """Records every op that reads a tensor's values on the host (.item(), int(), bool()) or
    whose output shape depends on the values (nonzero, bincount, boolean masks): a host sync on
    a GPU."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads(monkeypatch):
    """A context manager recording host reads; Tensor.tolist (which bypasses dispatch) counts too.
    F.one_hot reads its input's min and max on CPU only (CUDA relies on device asserts), so it is
    swapped for a scatter that does not: it is not a sync where a sync costs."""
    def one_hot(t, num_classes):
        return torch.zeros(*t.shape, num_classes, dtype=torch.long).scatter_(-1, t.unsqueeze(-1), 1)
    monkeypatch.setattr(F, "one_hot", one_hot)

    @contextlib.contextmanager
    def record():
        mode, tolist = HostReads(), torch.Tensor.tolist

        def counted_tolist(self):
            mode.ops.append("Tensor.tolist")
            return tolist(self)
        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
        with mode:
            yield mode.ops
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return record


def dropless_step(layer, x):
    out = layer(x)
    (out.y.square().mean() + out.aux_loss + out.z_loss).backward()


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="this torch has no torch._grouped_mm")
def test_dropless_grouped_path_never_reads_the_device(host_reads):
    """dropless_top_k_ffn, and a GroupedDroplessMoE and a GroupedLossFreeMoE training step (forward
    + backward, float32, aligned widths, and the bias update) make no host read; the padded dropless layer makes one (the busiest expert's
    load) and the float64 fallback one (the split sizes): the check can fail."""
    torch.manual_seed(0)
    padded = TokenChoiceMoE(16, 32, 4, top_k=2, dropless=True, check_inputs=False)
    layer = copied(padded, GroupedDroplessMoE, check_inputs=False)
    lossfree = GroupedLossFreeMoE(16, 32, 4, check_inputs=False)
    x, probs = torch.randn(2, 8, 16), torch.randn(2, 8, 4).softmax(-1)
    with host_reads() as ops:
        y, _ = dropless_top_k_ffn(x.requires_grad_(), probs, 2, layer.w_in, layer.w_out)
        y.square().sum().backward()
        dropless_step(layer, x)
        dropless_step(lossfree, x)
        lossfree.update_bias()
    assert ops == []
    with host_reads() as ops:
        dropless_step(padded, x)
    assert ops == ["aten._local_scalar_dense.default"]
    with host_reads() as ops:
        dropless_top_k_ffn(x.double(), probs.double(), 2, layer.w_in.double(), layer.w_out.double())
    assert ops == ["Tensor.tolist"]


def test_threshold_layout_counts_its_rows_once(host_reads):
    """grouped_moe_ffn without rows= reads the device once (torch.nonzero, the row count)."""
    gates, token_index = random_slots(2, 8, 4, 3, dtype=torch.float32)
    x, (w_in, w_out) = torch.randn(2, 8, 8), random_weights(4, 8, 8, dtype=torch.float32)
    with host_reads() as ops:
        grouped_moe_ffn(x, gates, token_index, w_in, w_out)
    assert ops == ["aten.nonzero.default"] + ([] if HAS_GROUPED_MM else ["Tensor.tolist"])


# ----------------------------------------------------------------------------- _grouped_mm detection
@pytest.mark.parametrize("dtype, d, f, ok", [(torch.float32, 8, 16, True), (torch.bfloat16, 8, 16, True),
                                             (torch.float64, 8, 16, False), (torch.float32, 6, 16, False),
                                             (torch.float32, 8, 10, False), (torch.bfloat16, 12, 16, False)])
def test_grouped_mm_support_detection(dtype, d, f, ok):
    """_grouped_mm is used only for float32/bfloat16 with 16-byte row strides (d, f multiples of
    4 in float32, of 8 in bfloat16), and only where torch has it."""
    X, w = torch.zeros(3, d, dtype=dtype), torch.zeros(2, d, f, dtype=dtype)
    assert grouped_mm_supported(X, w) == (ok and HAS_GROUPED_MM)


@pytest.mark.parametrize("d, f", [(8, 16), (6, 10)])
def test_without_grouped_mm_the_loop_gives_the_same(monkeypatch, d, f):
    """With torch._grouped_mm missing (older torch) or unusable (odd widths) the per-expert loop
    runs and gives the same rows and gradients, empty experts included."""
    counts = torch.tensor([3, 0, 5, 1])
    X = torch.randn(int(counts.sum()), d, requires_grad=True)
    w_in, w_out = (w.requires_grad_() for w in random_weights(4, d, f, dtype=torch.float32))
    want = grouped_expert_ffn(X, counts, w_in, w_out)
    want_grads = torch.autograd.grad(want.square().sum(), (X, w_in, w_out))
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    assert not grouped_mm_supported(X, w_in)
    got = grouped_expert_ffn(X, counts, w_in, w_out)
    torch.testing.assert_close(got, want, **F32)
    for a, b in zip(torch.autograd.grad(got.square().sum(), (X, w_in, w_out)), want_grads):
        torch.testing.assert_close(a, b, **F32)


def test_module_uses_grouped_mm_where_supported(monkeypatch):
    """On the float32 path grouped_expert_ffn calls torch._grouped_mm twice (the two FFN matmuls)
    and never splits on the host."""
    if not HAS_GROUPED_MM:
        pytest.skip("this torch has no torch._grouped_mm")
    calls, original = [], torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    grouped_expert_ffn(torch.randn(5, 8), torch.tensor([2, 3]), *random_weights(2, 8, 16, dtype=torch.float32))
    assert len(calls) == 2


# ----------------------------------------------------------------------------- GPU
@requires_cuda
@pytest.mark.gpu
def test_dropless_grouped_step_has_no_host_sync_on_cuda():
    """On a GPU with the fused kernel (SM90+), a bfloat16 GroupedDroplessMoE training step runs
    under torch.cuda.set_sync_debug_mode("error"), and matches the padded layer."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm's fused kernel needs SM90+; elsewhere torch syncs")
    torch.manual_seed(0)
    padded = TokenChoiceMoE(64, 128, 8, top_k=2, dropless=True, check_inputs=False).cuda().bfloat16()
    layer = copied(padded, GroupedDroplessMoE, check_inputs=False).cuda()
    x = torch.randn(4, 32, 64, device="cuda", dtype=torch.bfloat16)
    dropless_step(layer, x)  # warm-up: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dropless_step(layer, x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(layer(x).y, padded(x).y, rtol=0.05, atol=0.05)
