"""The routers since the paper: Expert Threshold routing (moe/threshold.py, "et1"/"et2") and
top-2 with auxiliary-loss-free bias balancing (moe/token_choice.LossFreeMoE, "top2_lossfree").

Properties, one per test: hand-checkable reference cases; module == reference_numpy in float64
(routing exactly, over several forwards / optimizer steps); ET's first forward, causality and
batch independence on the whole train_tiny model, in training mode; the bias update's rules
(once per step, mean-centred, the same under gradient accumulation and under activation
recomputation); state_dict round trips; the trainer and lab/evaluation wiring; clear errors.
"""
import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import ecmoe
import reference_numpy as ref
import train_tiny as tt
from lab.distributed import World
from lab.evaluation import evaluate, expert_choice_layers, inference_eval
from moe import routers
from moe.threshold import ExpertThresholdMoE
from moe.token_choice import LossFreeMoE, TokenChoiceMoE, token_choice


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors on a shared machine: one torch thread."""


def layer_of(router, group="sequence", d=8, f=16, e=4, seed=0, **kw):
    """The router table's layer in float64, with a router spread enough to make choices."""
    torch.manual_seed(seed)
    layer = routers.make_layer(router, d, f, e, group=group, **kw).double()
    with torch.no_grad():
        layer.w_router.normal_(0, 1.0)
    return layer


def probs_of(layer, x):
    """The router probabilities the layer's forward routes: [G, n, e]."""
    return ecmoe.router_probs(layer.group_tokens(x), layer.w_router)


def padded(gates, index, s):
    """A reference routing [e, s_g] padded with empty slots (gate 0, index -1) to [e, s]."""
    pad = s - index.shape[1]
    return (np.pad(gates, ((0, 0), (0, pad))), np.pad(index, ((0, 0), (0, pad)), constant_values=-1))


# ----------------------------------------------------------------------------- reference, by hand
P_HAND = np.array([[0.6, 0.4],
                   [0.3, 0.7],
                   [0.5, 0.5],
                   [0.9, 0.1]])


def test_reference_cutoff_and_ema_by_hand():
    """Cutoff = each expert's k-th best score over all tokens (k = ceil(4 * 1 / 2) = 2); the EMA
    starts at the first cutoff, then tau <- 0.9 tau + 0.1 cutoff."""
    cutoff = ref.expert_threshold_cutoff(P_HAND, 1.0)
    np.testing.assert_array_equal(cutoff, [0.6, 0.5])      # 2nd best of (.6 .3 .5 .9), (.4 .7 .5 .1)
    tau = ref.expert_threshold_update(None, cutoff, 0.9)
    np.testing.assert_array_equal(tau, cutoff)
    np.testing.assert_allclose(ref.expert_threshold_update(tau, np.array([0.1, 1.0]), 0.9),
                               [0.9 * 0.6 + 0.01, 0.9 * 0.5 + 0.1])
    # routing with tau = cutoff: expert 0 takes tokens 3, 0; expert 1 takes 1, 2 (best first)
    _, index = ref.threshold_choice(P_HAND, cutoff)
    assert index.tolist() == [[3, 0], [1, 2]]


def test_reference_lossfree_by_hand():
    """A bias changes which experts a token takes, never its gates: token 0 of (.5 .3 .2) takes
    experts 0 and 1 without a bias, 0 and 2 with b = (0, 0, .2), gated .5/.7 and .2/.7."""
    probs = np.array([[0.5, 0.3, 0.2]])
    g0, i0, load0 = ref.lossfree_choice(probs, np.zeros(3))
    assert i0.tolist() == [[0], [0], [-1]] and load0.tolist() == [1, 1, 0]
    g, i, load = ref.lossfree_choice(probs, np.array([0.0, 0.0, 0.2]))
    assert i.tolist() == [[0], [-1], [0]] and load.tolist() == [1, 0, 1]
    np.testing.assert_allclose(g, [[0.5 / 0.7], [0.0], [0.2 / 0.7]])


def test_reference_bias_update_by_hand():
    """b_i += u sign(mean load - load_i), minus the update's mean: loads (3, 1, 2), u = 0.1 ->
    (-0.1, +0.1, 0); loads (4, 1, 1) -> (-0.1, 0.1, 0.1) - 1/30; doubled loads: the same."""
    np.testing.assert_allclose(ref.lossfree_bias_update(np.zeros(3), np.array([3, 1, 2]), 0.1),
                               [-0.1, 0.1, 0.0], atol=1e-17)
    b = ref.lossfree_bias_update(np.zeros(3), np.array([4, 1, 1]), 0.1)
    np.testing.assert_allclose(b, np.array([-0.1, 0.1, 0.1]) - 0.1 / 3, atol=1e-17)
    assert abs(b.mean()) < 1e-17
    np.testing.assert_array_equal(ref.lossfree_bias_update(b, 2 * np.array([4, 1, 1]), 0.1),
                                  ref.lossfree_bias_update(b, np.array([4, 1, 1]), 0.1))


# ----------------------------------------------------------------------------- ET: module == reference
@pytest.mark.parametrize("group", ["position", "sequence", "batch"])
@pytest.mark.parametrize("c", [1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_expert_threshold_equals_reference_over_forwards(group, c, seed):
    """float64, five training forwards: every forward routes each group exactly as the reference's
    threshold_choice with the reference's tau (the first: its own cutoff over ALL tokens), y to
    1e-12, and tau after each forward is the reference's EMA of the cutoffs, exactly."""
    layer = layer_of("et1" if c == 1.0 else "et2", group, seed=seed, threshold_decay=0.8)
    e = layer.n_experts
    g = torch.Generator().manual_seed(seed)
    tau = None
    for forward in range(5):
        x = torch.randn(3, 5, 8, dtype=torch.float64, generator=g)
        probs = probs_of(layer, x)  # [G, n, e]
        P = probs.detach().numpy()
        cutoff = ref.expert_threshold_cutoff(P.reshape(-1, e), c)   # over all G*n tokens
        used = cutoff if tau is None else tau                        # earlier forwards only
        r = layer.route(probs)
        s = r.token_index.shape[-1]
        y = layer.experts(layer.group_tokens(x), r.gates, r.token_index)
        for gi in range(P.shape[0]):
            gates, index = padded(*ref.threshold_choice(P[gi], used), s)
            np.testing.assert_array_equal(r.token_index[gi].numpy(), index)
            np.testing.assert_array_equal(r.gates[gi].detach().numpy(), gates)
            x_g = layer.group_tokens(x)[gi].numpy()
            y_ref = ref.moe_ffn(x_g, *ref.threshold_choice(P[gi], used), layer.w_in.detach().numpy(),
                                layer.w_out.detach().numpy())
            np.testing.assert_allclose(y[gi].detach().numpy(), y_ref, rtol=1e-12, atol=1e-12)
            np.testing.assert_array_equal(r.demand[gi].numpy(), (index >= 0).sum(1))   # (d) loads
        tau = ref.expert_threshold_update(tau, cutoff, 0.8)
        np.testing.assert_array_equal(layer.threshold.numpy(), tau)
        assert int(layer.threshold_updates) == forward + 1


def test_first_forward_is_expert_choice_over_the_whole_forward():
    """With no thresholds yet, a training forward routes with its own cutoff: (no ties) each
    expert takes exactly k_all = expert_capacity(G*n, e, c) tokens of the forward, its best ones,
    and tau becomes that cutoff."""
    layer = layer_of("et2", "position")
    x = torch.randn(6, 4, 8, dtype=torch.float64)
    probs = probs_of(layer, x)  # [4, 6, 4]
    r = layer.route(probs)
    k_all = ecmoe.expert_capacity(24, 4, 2.0)
    assert r.demand.sum(0).tolist() == [k_all] * 4 and int(layer.threshold_updates) == 1
    flat = probs.reshape(-1, 4).T  # [e, 24]
    np.testing.assert_array_equal(layer.threshold.numpy(), flat.topk(k_all).values[:, -1].detach().numpy())
    # the same tokens as expert choice over the whole forward as ONE group
    _, ec_index = ecmoe.expert_choice(probs.reshape(1, 24, 4), k_all)
    taken = r.token_index + torch.arange(4).view(4, 1, 1) * 6  # flat token ids of the groups
    for i in range(4):
        assert sorted(taken[:, i][r.token_index[:, i] >= 0].tolist()) == sorted(ec_index[0, i].tolist())


def test_training_forward_routes_with_earlier_thresholds_only():
    """After the first forward, a training forward's routing is threshold_choice with the tau it
    found, not with its own cutoff; only then tau moves (and eval moves nothing)."""
    layer = layer_of("et2", "batch")
    layer(torch.randn(4, 6, 8, dtype=torch.float64))  # warm-up
    x = 3 * torch.randn(4, 6, 8, dtype=torch.float64)  # a shifted batch: its own cutoff differs
    probs = probs_of(layer, x)
    before = layer.threshold.clone()
    r = layer.route(probs)
    expect = ecmoe.threshold_choice(probs, before)
    assert torch.equal(r.token_index, expect[1]) and not torch.equal(layer.threshold, before)
    own = ecmoe.threshold_choice(probs, layer.forward_cutoff(probs))[1]
    assert not torch.equal(own, r.token_index)  # the forward's own cutoff would route otherwise
    after = layer.threshold.clone()
    layer.eval()(x)
    assert torch.equal(layer.threshold, after) and int(layer.threshold_updates) == 2


def test_expert_threshold_loads_vary_and_nothing_is_dropped():
    """demand = tokens each expert took: loads vary around the bucket, none dropped, aux_loss 0."""
    layer = layer_of("et2", "batch", e=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        out = layer(torch.randn(8, 8, 8, dtype=torch.float64, generator=g))
    assert out.stats.dropped_fraction == 0 and out.aux_loss == 0
    assert out.stats.load_max_over_mean > 1.0  # not a fixed bucket any more
    assert 0 < out.stats.expert_load.sum() < 4  # experts per token: about c = 2


# ----------------------------------------------------------------------------- ET: whole model
def tiny_lm(router, group="batch", **kw):
    """train_tiny's LM at dry-run size in float64: 4 layers (2 MoE), 4 experts."""
    cfg, _ = tt.parse_config(["--dry-run", "--device", "cpu"])
    cfg = dataclasses.replace(cfg, chunk_bytes=12, dec_layers=4, decoder_group=group, **kw)
    torch.manual_seed(0)
    model = tt.build_model(cfg, router)
    tt.init_weights(model, 0)
    return model.double(), tt.vocab_size(cfg)


def ids_of(V, B=32, T=12, seed=0):
    return torch.randint(2, V, (B, T), generator=torch.Generator().manual_seed(seed))


def leaks(model, V, training):
    """Whether changing the tokens after t ever changes the logits at <= t (t = 0, 5, 10), every
    forward from the same state (a copy: training forwards move thresholds)."""
    ids = ids_of(V)
    run = (lambda x: copy.deepcopy(model).train()(x)[0]) if training else (lambda x: model.eval()(x)[0])
    with torch.no_grad():
        base = run(ids)
        for t in (0, 5, 10):
            x = ids.clone()
            x[:, t + 1:] = ids_of(V, T=11 - t, seed=t + 1)
            out = run(x)
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])  # the change bites
            if not torch.allclose(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-10):
                return True
    return False


def test_expert_threshold_model_is_causal_in_training():
    """TinyLM with et2 and decoder group "batch" (where EC leaks the future), in TRAINING mode
    after a first forward: changing future tokens never changes earlier logits; ec2 in the same
    setting does (the test can see a leak); et2 in eval is causal too."""
    model, V = tiny_lm("et2")
    model.train()(ids_of(V, seed=99))  # the first forward: thresholds from now on
    assert not leaks(model, V, training=True)
    assert not leaks(model, V, training=False)
    ec, V = tiny_lm("ec2")
    assert leaks(ec, V, training=True)


@pytest.mark.parametrize("training", [True, False])
def test_expert_threshold_model_is_batch_independent(training):
    """Each sequence's logits alone (batch size 1) equal its logits in a batch of 32, in training
    mode after warm-up (every forward from the same state) and in eval."""
    model, V = tiny_lm("et2")
    for s in range(3):
        model.train()(ids_of(V, seed=100 + s))  # warm-up
    model.train(training)
    ids = ids_of(V)

    def run(x):
        return (copy.deepcopy(model) if training else model)(x)[0]
    with torch.no_grad():
        together = run(ids)
        alone = torch.cat([run(ids[i:i + 1]) for i in range(32)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-10)


def test_evaluation_treats_expert_threshold_as_deployed():
    """lab/evaluation: ET layers are not switched like EC (their training routing is the
    deployed one); the loss at batch size 1 (group_1) equals the loss at the training batch
    size up to float error: the train/inference gap is ~0 by construction."""
    model, V = tiny_lm("et2", group="position")
    model = model.float()
    for s in range(3):
        model.train()(ids_of(V, B=8, seed=s))
    assert expert_choice_layers(model) == [] and len(model.moe_layers()) == 2
    vals = [(ids_of(V, B=8, seed=10), ids_of(V, B=8, seed=11)) for _ in range(2)]
    trained = float(np.mean(evaluate(model, vals, torch.device("cpu"))))
    inf = inference_eval(model, vals, torch.device("cpu"))
    assert "threshold_1" not in inf and abs(inf["group_1"] - trained) < 1e-5
    assert all(m.eval_routing == "threshold" for _, m in model.moe_layers())


def test_evaluate_restores_each_layers_routing_and_inference_eval_is_quiet():
    """evaluate(routing=...) routes the expert-choice layers as asked, then gives each layer back
    its own eval_routing (the default "auto", or what was set); inference_eval's group routing
    at batch size 1 does not warn about its degenerate buckets, which an explicit group
    evaluation at batch size 1 does, once per layer."""
    def recorded(call):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = call()
        return result, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]

    models = []
    for _ in range(2):
        model, V = tiny_lm("ec2", group="position")
        for s in range(3):
            model.train()(ids_of(V, B=8, seed=s))
        models.append(model)
    layers = expert_choice_layers(models[0])
    assert [m.eval_routing for m in layers] == ["auto", "auto"]
    layers[0].eval_routing = "group"
    vals = [(ids_of(V, B=8, seed=10), ids_of(V, B=8, seed=11))]
    cpu = torch.device("cpu")
    for routing in ("group", "threshold"):
        _, messages = recorded(lambda: evaluate(models[0], vals, cpu, routing))
        assert messages == [] and [m.eval_routing for m in layers] == ["group", "auto"]
    inference, messages = recorded(lambda: inference_eval(models[0], vals, cpu))
    assert messages == [] and {"group_1", "threshold_1"} <= set(inference)
    assert [m.eval_routing for m in layers] == ["group", "auto"]
    rows = [(ids[:1], tgt[:1]) for ids, tgt in vals * 2]
    _, messages = recorded(lambda: evaluate(models[1], rows, cpu, "group"))
    assert len(messages) == 2 and all("e*k/n = 4" in m for m in messages), messages


# ----------------------------------------------------------------------------- loss-free: module == reference
@pytest.mark.parametrize("group", ["position", "sequence", "batch"])
@pytest.mark.parametrize("seed", [0, 1])
def test_lossfree_equals_reference_over_steps(group, seed):
    """float64, four optimizer steps of two forwards each (u = 0.05, so the bias soon changes
    choices): every group routes exactly as reference lossfree_choice with the same bias, the
    counted loads are the reference's summed over the step, and update_bias is
    lossfree_bias_update (to 1e-15: the two sum the update's mean in different orders)."""
    layer = layer_of("top2_lossfree", group, seed=seed, bias_rate=0.05)
    e = layer.n_experts
    g = torch.Generator().manual_seed(seed)
    bias = np.zeros(e)
    changed_a_choice = False
    for step in range(4):
        loads = np.zeros(e, dtype=np.int64)
        for _ in range(2):
            x = torch.randn(3, 5, 8, dtype=torch.float64, generator=g)
            probs = probs_of(layer, x)
            P = probs.detach().numpy()
            r = layer.route(probs)
            s = r.token_index.shape[-1]
            for gi in range(P.shape[0]):
                gates, index, load = ref.lossfree_choice(P[gi], bias)
                gates, index = padded(gates, index, s)
                np.testing.assert_array_equal(r.token_index[gi].numpy(), index)
                np.testing.assert_allclose(r.gates[gi].detach().numpy(), gates, rtol=1e-15, atol=0)
                np.testing.assert_array_equal(r.demand[gi].numpy(), load)
                loads += load
                top2 = [np.sort(np.argsort(-p, axis=1, kind="stable")[:, :2], 1)
                        for p in (P[gi] + bias, P[gi])]  # the experts chosen with, without b
                changed_a_choice |= bool((top2[0] != top2[1]).any())
            assert r.aux_loss == 0
        np.testing.assert_array_equal(layer.expert_load.numpy(), loads)
        layer.update_bias()
        bias = ref.lossfree_bias_update(bias, loads, 0.05)
        np.testing.assert_allclose(layer.expert_bias.numpy(), bias, rtol=0, atol=1e-15)
        assert layer.expert_load.sum() == 0
    assert changed_a_choice  # the bias did its job at least once


def test_bias_changes_the_choice_not_the_gates():
    """A large bias on expert 3 puts it in every token's top 2; the gates stay the raw
    probabilities of the two chosen experts, renormalised (the bias never enters a gate)."""
    layer = layer_of("top2_lossfree", "batch")
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    probs = probs_of(layer, x)
    layer.expert_bias[3] = 10.0
    r = layer.route(probs)
    assert r.demand[0, 3] == 10 and (r.token_index[0, 3] >= 0).all()
    expect = ref.lossfree_choice(probs[0].detach().numpy(), layer.expert_bias.numpy())
    np.testing.assert_allclose(r.gates[0, 3].detach().numpy(), expect[0][3], rtol=1e-15)
    other = probs[0].clone()
    other[:, 3] = -1  # the best expert besides 3, per token
    second = other.argmax(-1)
    g3 = probs[0, :, 3] / (probs[0, :, 3] + probs[0].gather(1, second[:, None])[:, 0])
    np.testing.assert_allclose(np.sort(r.gates[0, 3].detach().numpy()), np.sort(g3.detach().numpy()),
                               rtol=1e-14)


# ----------------------------------------------------------------------------- loss-free: the update rules
def test_loads_count_training_forwards_only_and_bias_is_no_parameter():
    """expert_load grows in training forwards only (eval adds nothing); b is a buffer the
    optimizer never sees, saved in the state_dict with the loads; it stays float32 in bf16."""
    layer = routers.make_layer("top2_lossfree", 8, 16, 4)
    x = torch.randn(3, 5, 8)
    layer(x)
    assert layer.expert_load.sum() == 3 * 5 * 2  # every token, two experts, nothing dropped
    layer.eval()(x)
    assert layer.expert_load.sum() == 30
    assert "expert_bias" not in dict(layer.named_parameters())
    assert {"expert_bias", "expert_load"} <= set(layer.state_dict())
    assert layer.to(torch.bfloat16).expert_bias.dtype == torch.float32


def test_gradient_accumulation_moves_the_bias_as_one_batch():
    """Two micro-batches counted, one update: the same bias as one forward over the whole batch
    (the bias is fixed within a step and each token chooses alone)."""
    whole, micro = (layer_of("top2_lossfree", "sequence", bias_rate=0.01) for _ in range(2))
    x = torch.randn(6, 5, 8, dtype=torch.float64)
    for step in range(3):
        whole(x + step)
        micro(x[:2] + step)
        micro(x[2:] + step)
        assert torch.equal(whole.expert_load, micro.expert_load)
        whole.update_bias()
        micro.update_bias()
        assert torch.equal(whole.expert_bias, micro.expert_bias)
    assert whole.expert_bias.abs().max() > 0


def test_activation_recomputation_counts_twice_and_changes_nothing():
    """Under torch.utils.checkpoint the forward runs again in backward, so every load is counted
    twice; the update (sign of a mean-centred difference) is the same, and so are the gradients."""
    plain, ckpt = (layer_of("top2_lossfree", "sequence", bias_rate=0.01) for _ in range(2))
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(4, 5, 8, dtype=torch.float64, generator=g)
        plain(x).y.square().sum().backward()
        checkpoint(lambda x: ckpt(x).y, x, use_reentrant=False).square().sum().backward()
        assert torch.equal(ckpt.expert_load, 2 * plain.expert_load)
        for name, p in plain.named_parameters():
            torch.testing.assert_close(dict(ckpt.named_parameters())[name].grad, p.grad,
                                       rtol=1e-12, atol=1e-14)
        plain.update_bias()
        ckpt.update_bias()
        assert torch.equal(plain.expert_bias, ckpt.expert_bias)
    assert plain.expert_bias.abs().max() > 0


def test_trainer_updates_the_bias_once_per_optimizer_step(monkeypatch):
    """train_step calls update_bias once per step for every LossFreeMoE layer, after the
    optimizer step, with the step's loads; b is then the reference's update of them."""
    cfg, _ = tt.parse_config(["--dry-run", "--device", "cpu", "--bias-rate", "0.01"])
    cfg = dataclasses.replace(cfg, chunk_bytes=12, dec_layers=4)
    torch.manual_seed(0)
    model = tt.build_model(cfg, "top2_lossfree")
    tt.init_weights(model, 0)
    layers = [m for _, m in model.moe_layers()]
    assert len(layers) == 2 and all(type(m) is LossFreeMoE and m.bias_rate == 0.01 for m in layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen = []
    original = LossFreeMoE.update_bias

    def spy(self):
        seen.append((self, self.expert_load.clone(), self.expert_bias.clone()))
        original(self)
    monkeypatch.setattr(LossFreeMoE, "update_bias", spy)
    V = tt.vocab_size(cfg)
    for step in range(2):
        ids = ids_of(V, B=4, seed=step)
        tt.train_step(model, opt, (ids, ids), step, cfg, World())
        assert [s[0] for s in seen[-2:]] == layers and len(seen) == 2 * (step + 1)
        for m, load, bias in seen[-2:]:
            assert load.sum() == 4 * 12 * 2 and m.expert_load.sum() == 0
            np.testing.assert_allclose(m.expert_bias.numpy(), ref.lossfree_bias_update(
                bias.double().numpy(), load.numpy(), 0.01), rtol=0, atol=1e-7)
    assert any(m.expert_bias.abs().max() > 0 for m in layers)


# ----------------------------------------------------------------------------- state, table, errors
@pytest.mark.parametrize("router", ["et2", "top2_lossfree"])
def test_state_dict_round_trip(router):
    """Thresholds (and their update count) or bias (and the loads) survive state_dict -> a fresh
    layer, which then routes and computes exactly as the original."""
    layer = layer_of(router, "batch")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        layer(torch.randn(2, 5, 8, dtype=torch.float64, generator=g))
        if router == "top2_lossfree":
            layer.update_bias()
    layer(torch.randn(2, 5, 8, dtype=torch.float64, generator=g))  # loads pending
    fresh = layer_of(router, "batch", seed=7)
    fresh.load_state_dict(layer.state_dict())
    for name, buf in layer.named_buffers():
        assert torch.equal(dict(fresh.named_buffers())[name], buf), name
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=g)
    assert torch.equal(fresh.eval()(x).y, layer.eval()(x).y)


def test_router_table_and_decoder_token_choice():
    """et1/et2/top2_lossfree are in the table with their c; top2_lossfree counts as token choice
    (--decoder-router token keeps it), ET does not; make_ffn passes --bias-rate."""
    assert routers.ROUTERS["et1"].layer is ExpertThresholdMoE and routers.capacity_factor("et1") == 1.0
    assert routers.ROUTERS["et2"].capacity_factor == 2.0
    assert routers.is_token_choice("top2_lossfree") and not routers.is_token_choice("et2")
    assert issubclass(LossFreeMoE, TokenChoiceMoE) and routers.make_layer("top2_lossfree", 8, 16, 4).dropless
    cfg, _ = tt.parse_config(["--dry-run", "--device", "cpu", "--arch", "t5", "--decoder-router",
                              "token", "--bias-rate", "0.002"])
    assert type(tt.make_ffn(cfg, "top2_lossfree", "dec", 1)) is LossFreeMoE
    assert tt.make_ffn(cfg, "top2_lossfree", "dec", 1).bias_rate == 0.002
    assert type(tt.make_ffn(cfg, "et2", "dec", 1)) is TokenChoiceMoE  # flaxformer's top-2 decoder
    assert type(tt.make_ffn(cfg, "et2", "enc", 1)) is ExpertThresholdMoE


def test_bad_arguments_raise_clear_errors():
    """Bad bias rates, decays, biases and eval use before training name the problem."""
    for rate in (-1e-3, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="bias_rate"):
            LossFreeMoE(8, 16, 4, bias_rate=rate)
        with pytest.raises(ValueError, match="rate"):
            ref.lossfree_bias_update(np.zeros(3), np.ones(3), rate)
    with pytest.raises(ValueError, match="top_k"):
        LossFreeMoE(8, 16, 4, top_k=5)
    with pytest.raises(ValueError, match="threshold_decay"):
        ExpertThresholdMoE(8, 16, 4, threshold_decay=1.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertThresholdMoE(8, 16, 4, capacity_factor=0)
    with pytest.raises(TypeError, match="eval_routing"):
        ExpertThresholdMoE(8, 16, 4, eval_routing="group")
    with pytest.raises(ValueError, match="decay"):
        ref.expert_threshold_update(None, np.zeros(2), 1.0)
    probs = torch.softmax(torch.randn(5, 3), -1)
    with pytest.raises(ValueError, match=r"bias must have shape \[e=3\]"):
        token_choice(probs, 2, 5, bias=torch.zeros(4))
    with pytest.raises(ValueError, match="bias must be finite"):
        token_choice(probs, 2, 5, bias=torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="bias"):
        ref.lossfree_choice(probs.numpy(), np.zeros(4))
    layer = ExpertThresholdMoE(8, 16, 4).eval()
    with pytest.raises(ValueError, match="never run a training-mode forward"):
        layer(torch.randn(2, 3, 8))
    layer.train()(torch.randn(2, 3, 8))
    layer.eval_routing = "group"
    with pytest.raises(ValueError, match="eval_routing must stay 'threshold'"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(SystemExit):
        tt.parse_config(["--dry-run", "--bias-rate", "-1"])


def test_expert_threshold_does_not_depend_on_the_routing_group():
    """ET's outputs and learned thresholds are the same for group "position", "sequence" and
    "batch" over several training forwards (float64): the group only lays tokens out in slots,
    so a routing-group-size sweep cannot change ET (it does change expert choice)."""
    layers = {g: layer_of("et2", group=g) for g in ("position", "sequence", "batch")}
    for g in layers:  # the same weights in every layer
        layers[g].load_state_dict(layers["position"].state_dict())
    torch.manual_seed(5)
    for step in range(4):
        x = torch.randn(6, 5, 8, dtype=torch.float64)
        outs = {g: layer.train()(x) for g, layer in layers.items()}
        for g in ("sequence", "batch"):
            torch.testing.assert_close(outs[g].y, outs["position"].y, rtol=0, atol=1e-12)
            torch.testing.assert_close(layers[g].threshold, layers["position"].threshold, rtol=0, atol=1e-12)
    ec = {g: layer_of("ec2", group=g) for g in ("position", "batch")}
    ec["batch"].load_state_dict(ec["position"].state_dict())
    assert not torch.allclose(ec["position"].train()(x).y, ec["batch"].train()(x).y)  # EC does move
