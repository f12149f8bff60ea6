"""Expert parallelism on CPU (gloo): moe.parallel.shard_experts(layer, group) equals the plain layer.

W processes each hold e/W experts and their own batch. For every router and every routing group,
in float64: each rank's output, aux/z losses and the gradients of its x and of w_router equal the
single-process layer (full weights) on that rank's batch; each rank's expert-weight gradients equal
the single-process gradients of its slice summed over all ranks' batches (atol 1e-10).

Process start-up costs seconds, so one spawn per world size runs every case: each rank loops over
the cases and saves its results; the tests below compare them with single-process references.
"""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

import ecmoe
import reference_numpy as ref
from moe import parallel, routers

B, T, D, F_, E = 4, 4, 8, 16, 8  # per-rank batch, positions, d, f, experts (W = 2, 4 divide E)
# the layers (router-table names; capped with b = 3): expert choice, capped, token choice, and
# the two with loads that vary between ranks and state learned across them: expert threshold
# and loss-free top-2
ROUTERS = ("ec2", "cap3", "top1", "top2", "top2_dropless", "top2_gshard", "et2", "top2_lossfree")
CASES = [(router, group) for router in ROUTERS for group in ecmoe.GROUPS]
ATOL = 1e-10


def full_layer(router, group):
    """The single-process layer of a case, float64, with a decisive router (seeded: same everywhere)."""
    torch.manual_seed(0)
    solver = dict(max_iter=20) if router == "cap3" else {}
    layer = routers.make_layer(router, D, F_, E, capacity_factor=2.0, group=group, **solver).double()
    with torch.no_grad():
        layer.w_router.normal_(0, 1.0)
    return layer


def threshold_layer(group, routing="threshold"):
    """An expert-choice layer that routes by learned thresholds in eval mode (once trained:
    eval_routing "threshold" or the default "auto")."""
    layer = full_layer("ec2", group)
    layer.eval_routing = routing
    return layer


def global_inputs(W, case):
    """Every rank's x [W*B, T, D] and loss weights [W*B, T, D]: rank r takes rows r*B .. r*B+B-1."""
    g = torch.Generator().manual_seed(1_000 + case)
    return (torch.randn(W * B, T, D, generator=g, dtype=torch.float64),
            torch.randn(W * B, T, D, generator=g, dtype=torch.float64))


def forward_backward(layer, x, weight, draw_seed):
    """Output, losses and gradients of layer on x, loss = <y, weight> + aux + 0.1 z."""
    x = x.clone().requires_grad_()
    torch.manual_seed(draw_seed)  # top2_gshard's U[0, 1) draws
    out = layer(x)
    loss = (out.y * weight).sum() + out.aux_loss + 0.1 * out.z_loss
    loss.backward()
    return dict(y=out.y.detach(), aux=out.aux_loss.detach(), z=out.z_loss.detach(),
                stats=out.stats.experts_per_token, x=x.grad,
                **{name: p.grad.clone() for name, p in layer.named_parameters()})


def _worker(rank, W, init_file, out_dir):
    """One rank: every case through the sharded layer, plus the checks that need a live group."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    world = dist.group.WORLD
    results = {}
    for case, (router, group) in enumerate(CASES):
        full = full_layer(router, group)
        layer = parallel.shard_experts(copy.deepcopy(full), world)
        x, weight = global_inputs(W, case)
        rows = slice(rank * B, (rank + 1) * B)
        results[router, group] = forward_backward(layer, x[rows], weight[rows], 100 + rank)
        if router == "et2":  # the thresholds its first forward learned
            results[router, group]["threshold"] = layer.threshold.clone()
        if router == "top2_lossfree":  # the bias after one update
            layer.update_bias()
            results[router, group]["expert_bias"] = layer.expert_bias.clone()
    # threshold routing (eval) after one training forward: thresholds averaged over the ranks
    for routing in ("threshold", "auto"):
        for group in ecmoe.GROUPS:
            layer = parallel.shard_experts(threshold_layer(group, routing), world)
            x = global_inputs(W, 99)[0][rank * B:(rank + 1) * B]
            layer(x)  # training mode: learns the thresholds
            layer.eval()
            results[routing, group] = dict(threshold=layer.threshold.clone(), y=layer(x).y.detach())
    # checks that need the group; their outcomes go to the parent as plain values
    checks = {}
    torch.manual_seed(5)
    direct = parallel.shard_experts(ecmoe.MoE(D, F_, E), world)
    torch.manual_seed(5)
    whole = ecmoe.MoE(D, F_, E)
    part = parallel.expert_slice(E, rank, W)
    checks["init_is_slice"] = (direct.w_in.shape == (E // W, D, F_) and
                               torch.equal(direct.w_in, whole.w_in[part]) and
                               torch.equal(direct.w_out, whole.w_out[part]) and
                               torch.equal(direct.w_router, whole.w_router))
    checks["state_keys"] = list(direct.state_dict()) == list(whole.state_dict())
    gathered = parallel.full_state_dict(direct)
    checks["full_state_dict"] = all(torch.equal(gathered[k], v) for k, v in whole.state_dict().items())
    # a model holding MoE layers: every one is sharded, the rest untouched
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(D, D), ecmoe.MoE(D, F_, E), routers.make_layer("top2", D, F_, E))
    full_model = copy.deepcopy(model)
    parallel.shard_experts(model, world)
    checks["model_sharded"] = (all(isinstance(m, parallel.ExpertParallel) for m in model[1:]) and
                               model[2].w_in.shape == (E // W, D, F_) and
                               torch.equal(model[0].weight, full_model[0].weight))
    gathered = parallel.full_state_dict(model)
    checks["model_full_state_dict"] = all(torch.equal(gathered[k], v) for k, v in full_model.state_dict().items())
    reloaded = parallel.shard_experts(ecmoe.MoE(D, F_, E), world)
    parallel.load_full_state_dict(reloaded, whole.state_dict())
    checks["load_full_state_dict"] = torch.equal(reloaded.w_in, direct.w_in)
    checks["repr"] = repr(direct)
    checks["rank_and_size"] = (direct.expert_parallel_rank, direct.expert_parallel_size)
    try:
        parallel.shard_experts(direct, world)
    except ValueError as error:
        checks["twice"] = str(error)
    try:
        parallel.shard_experts(ecmoe.MoE(D, F_, 6 if W == 4 else 3), world)
    except ValueError as error:
        checks["bad_experts"] = str(error)
    try:  # ranks with different batch shapes: a clear error on every rank, not a hang
        direct(torch.randn(B + rank, T, D))
    except ValueError as error:
        checks["bad_shape"] = str(error)
    torch.save(dict(results=results, checks=checks), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda W: f"W{W}")
def spawned(request, tmp_path_factory):
    """Spawn W gloo processes once per world size -> (W, [per-rank results])."""
    W = request.param
    out = tmp_path_factory.mktemp(f"ep{W}")
    tmp.spawn(_worker, args=(W, str(out / "init"), str(out)), nprocs=W, join=True)
    return W, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(W)]


@pytest.mark.parametrize("router, group", CASES)
def test_sharded_layer_equals_single_process(spawned, router, group):
    """Outputs, losses, grads of x and w_router per rank; expert grads summed over all ranks' batches."""
    W, ranks = spawned
    case = CASES.index((router, group))
    x, weight = global_inputs(W, case)
    expected = [forward_backward(full_layer(router, group), x[r * B:(r + 1) * B],
                                 weight[r * B:(r + 1) * B], 100 + r) for r in range(W)]
    for r in range(W):
        got, ref = ranks[r]["results"][router, group], expected[r]
        for key in ("y", "aux", "z", "x", "w_router", "stats"):
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=ATOL, msg=f"rank {r} {key}")
        part = parallel.expert_slice(E, r, W)
        for key in ("w_in", "w_out"):
            summed = sum(e[key] for e in expected)[part]  # every rank's tokens reach these experts
            torch.testing.assert_close(got[key], summed, rtol=0, atol=ATOL, msg=f"rank {r} {key}")


def test_threshold_routing_is_learned_and_applied_as_on_one_process(spawned):
    """Expert-choice thresholds learned on W ranks equal one process's on the global batch (for
    sequence groups: the same groups), and eval routing by thresholds (slots differ between ranks:
    padded), asked for by eval_routing "threshold" or by the default "auto", gives each rank the
    single-process output."""
    W, ranks = spawned
    x = global_inputs(W, 99)[0]
    for routing in ("threshold", "auto"):
        for group in ecmoe.GROUPS:
            if group == "sequence":  # one process on all W*B rows forms exactly the ranks' groups
                whole = threshold_layer(group, routing)
                whole(x)
                for r in range(W):
                    torch.testing.assert_close(ranks[r]["results"][routing, group]["threshold"],
                                               whole.threshold, rtol=0, atol=ATOL)
            for r in range(W):
                got = ranks[r]["results"][routing, group]
                layer = threshold_layer(group, "threshold")
                with torch.no_grad():
                    layer.threshold.copy_(got["threshold"])
                    layer.threshold_updates.fill_(1)
                layer.eval()
                torch.testing.assert_close(got["y"], layer(x[r * B:(r + 1) * B]).y, rtol=0, atol=ATOL)


def test_learned_router_state_is_the_same_on_every_rank(spawned):
    """et2's thresholds are the mean over ranks of each rank's cutoff, and top2_lossfree's bias
    after update_bias is the update of the loads summed over ranks: the same on every rank."""
    W, ranks = spawned
    for group in ecmoe.GROUPS:
        x = global_inputs(W, CASES.index(("et2", group)))[0]
        singles = [full_layer("et2", group) for _ in range(W)]
        for r, layer in enumerate(singles):
            layer(x[r * B:(r + 1) * B])
        expect = torch.stack([layer.threshold for layer in singles]).mean(0)
        x = global_inputs(W, CASES.index(("top2_lossfree", group)))[0]
        loads = 0
        for r in range(W):
            layer = full_layer("top2_lossfree", group)
            layer(x[r * B:(r + 1) * B])
            loads = loads + layer.expert_load.numpy()  # [E] tokens routed to each expert
        bias = torch.from_numpy(ref.lossfree_bias_update(np.zeros(E), loads, 1e-3))
        for r in range(W):
            got = ranks[r]["results"]
            torch.testing.assert_close(got["et2", group]["threshold"], expect, rtol=0, atol=1e-12)
            torch.testing.assert_close(got["top2_lossfree", group]["expert_bias"], bias, rtol=0, atol=1e-15)


def test_dropless_ranks_really_differ_in_slots(spawned):
    """top2_dropless is tested where the ranks' slot counts differ, so the padding path runs."""
    W, _ = spawned
    differ = []
    for group in ecmoe.GROUPS:
        slots = set()
        for r in range(W):
            layer = full_layer("top2_dropless", group)
            x = global_inputs(W, CASES.index(("top2_dropless", group)))[0][r * B:(r + 1) * B]
            probs = ecmoe.router_probs(layer.group_tokens(x), layer.w_router)
            slots.add(layer.route(probs).token_index.shape[-1])
        differ.append(len(slots) > 1)
    assert any(differ), differ


def test_sharded_init_state_and_helpers(spawned):
    """shard_experts keeps slice r of the same init and keys; full/load_full_state_dict invert it."""
    W, ranks = spawned
    for r, rank in enumerate(ranks):
        c = rank["checks"]
        assert c["init_is_slice"] and c["state_keys"] and c["full_state_dict"]
        assert c["load_full_state_dict"] and c["model_sharded"] and c["model_full_state_dict"]
        assert c["rank_and_size"] == (r, W)
        assert c["repr"].startswith("ExpertParallelMoE(")  # the sharded class names itself
        assert "already sharded" in c["twice"]


def test_sharded_repr_names_rank_and_world_size(spawned):
    """print(sharded layer) says which rank of how many it is."""
    W, ranks = spawned
    for r, rank in enumerate(ranks):
        assert f"rank {r} of {W}" in rank["checks"]["repr"], rank["checks"]["repr"]


def test_bad_expert_parallel_input_is_a_clear_error(spawned):
    """W not dividing e, and ranks with different batch shapes: ValueErrors naming the problem."""
    W, ranks = spawned
    for rank in ranks:
        assert f"expert-parallel world size {W} must divide n_experts" in rank["checks"]["bad_experts"]
        assert "same routing shape on every rank" in rank["checks"]["bad_shape"]


def test_no_group_is_the_plain_layer():
    """Without sharding nothing changes: same parameters and keys; sharding needs torch.distributed."""
    layer = ecmoe.MoE(D, F_, E)
    assert not isinstance(layer, parallel.ExpertParallel) and not hasattr(layer, "expert_parallel_group")
    assert layer.w_in.shape == (E, D, F_)
    assert [name for name, _ in layer.named_parameters()] == ["w_router", "w_in", "w_out"]
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="init_process_group"):
            parallel.shard_experts(layer, object())
        assert type(layer) is ecmoe.MoE and layer.w_in.shape == (E, D, F_)  # untouched
    with pytest.raises(ValueError, match="must divide n_experts"):
        parallel.expert_slice(6, 0, 4)
    assert parallel.expert_slice(8, 3, 4) == slice(6, 8)


# ----------------------------------------------------------------------------- training (torchrun)
TRAIN = ["--dry-run", "--routers", "ec2,top2", "--seeds", "0", "--group-size", "2",
         "--steps", "3", "--eval-every", "1"]


def torchrun(argv, cwd):
    """train_tiny.py under `torchrun --standalone --nproc_per_node=2` (gloo, one thread each)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", os.path.join(root, "train_tiny.py"), *argv],
                          cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow  # two torchrun launches: ~25 s of the file's ~40 s
def test_torchrun_two_processes_match_one_and_resume(tmp_path, capsys):
    """2-process training (data + expert parallel, --group-size 2 = B/W, so the routing groups are
    those of one process), interrupted after step 1 and resumed, gives the loss curves of one
    process to float error; the saved model has the full experts; a one-process --resume of the
    2-process run is refused (its routing groups could differ)."""
    import textwrap

    import train_tiny as tt
    data = tmp_path / "corpus.txt"   # a fixed text (not this project's code, which changes)
    data.write_text(open(textwrap.__file__).read() * 2, encoding="utf-8")
    argv = TRAIN + ["--data", str(data)]
    one = tt.main(argv + ["--out", str(tmp_path / "one")])
    torchrun(argv + ["--out", str(tmp_path / "two"), "--stop-after", "1"], tmp_path)
    assert sorted(p.name for p in (tmp_path / "two" / "ckpt").iterdir()) == \
        [f"{r}_s0.rank{k}of2.pt" for r in ("ec2", "top2") for k in (0, 1)]
    torchrun(argv + ["--out", str(tmp_path / "two"), "--resume"], tmp_path)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["command"].startswith("torchrun --nproc_per_node=2") and two["distributed"]["world_size"] == 2
    for a, b in zip(one["runs"], two["runs"]):
        assert a["router"] == b["router"] and a["n_params"] == b["n_params"]
        np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(b["val_loss"], a["val_loss"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(b.get("val_loss_threshold", []), a.get("val_loss_threshold", []),
                                   rtol=0, atol=1e-5)  # expert choice: thresholds learned on 2 ranks
        np.testing.assert_allclose(b["inference"]["group_1"], a["inference"]["group_1"], rtol=0, atol=1e-5)
        w1 = torch.load(tt.model_path(tmp_path / "one", a["router"], 0), weights_only=True)["model"]
        w2 = torch.load(tt.model_path(tmp_path / "two", a["router"], 0), weights_only=True)["model"]
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        tt.main(argv + ["--out", str(tmp_path / "two"), "--resume"])
    assert "world_size" in capsys.readouterr().err
