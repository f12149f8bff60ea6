"""Expert parallelism: the experts of every MoE layer sharded over W torch.distributed processes
(the paper's setting: experts spread over many devices). Data parallel for everything else.

    shard_experts(model, group)      every MoE keeps experts [r e/W, (r+1) e/W) of rank r
    full_state_dict(model)           the unsharded state dict (a collective)
    load_full_state_dict(model, sd)  each rank takes its slice
A sharded layer routes its own tokens in its own groups, exactly as one process would; two
all-to-alls carry the expert slots to their experts and back. docs/scaling_out.md has the
measurements and when a run equals one process's.

"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ecmoe import MoE, check_int, combine, dispatch, expert_ffn

# Axis letters: W processes in the group, r this process's rank, E = e/W experts per rank,
# m = G*s slots per expert on one rank (G routing groups of this rank, s slots each).
#
#   rank r, own tokens x [G, n, d]             route locally (same groups as one process)
#   dispatch -> X_in [e, m, d]                 rows = experts, i.e. grouped by destination rank:
#            = [W, E, m, d]                    block q holds the slots of rank q's experts
#   all_to_all ->     [W, E, m, d]             block q now holds source rank q's slots
#   -> [E, W*m, d] -> expert_ffn -> [E, W*m, d]    one batched matmul over this rank's experts
#   -> [W, E, m, d] -> all_to_all -> [e, m, d] each source gets its slots back, in its order
#   combine -> y [G, n, d]                     gate-weighted scatter-add, as moe_ffn
#
# Expert choice needs no count exchange and no padding: every expert takes exactly k slots per
# group, so every block has the same, known shape and the all-to-all has equal splits. Token
# choice with a capacity ("top1", "top2", "top2_gshard") has static slots too (empty ones carry
# gate 0). "top2_dropless" sizes its slots by the largest demand, which differs between ranks:
# the ranks agree on the largest with one all-reduce (MAX) per forward and pad with empty slots.
# Volume: each all-to-all sends e*m*d elements per rank, (W-1)/W of them to other ranks; e*m =
# G*e*s = n_rank*c slots for EC (all tokens of the rank times c), whatever e and k are apart.

def expert_slice(n_experts, rank, world_size):
    """The experts rank `rank` of `world_size` holds: slice(rank*e/W, (rank+1)*e/W)."""
    check_int(world_size, "world_size", 1)
    check_int(rank, "rank", 0, world_size - 1)
    if n_experts % world_size:
        raise ValueError(f"the expert-parallel world size {world_size} must divide "
                         f"n_experts={n_experts}")
    per_rank = n_experts // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0; its gradient is the same exchange in reverse."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)  # block q of x -> rank q; block q of out <- rank q
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # out[q] came from rank q's x[r], so grad x[q] is rank q's grad_out[r]: the same exchange
        return _AllToAll.apply(grad_out, ctx.group), None


def all_to_all(x, group):
    """Differentiable equal-split all-to-all: x [W, ...] -> [W, ...]; block q goes to rank q,
    block q of the result came from rank q. Every rank of the group must call it together."""
    W = dist.get_world_size(group)
    if x.shape[0] != W:
        raise ValueError(f"all_to_all: x must have leading dim W={W}; got {tuple(x.shape)}")
    return _AllToAll.apply(x, group)


def _agree_on_slots(G, s, group, pad_slots, device):
    """One all-reduce (MAX) of (G, -G, s, -s) over the group -> the largest s; ValueError (on
    every rank alike) unless all ranks have the same G and, without pad_slots, the same s."""
    t = torch.tensor([G, -G, s, -s], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    G_max, G_min, s_max, s_min = t[0].item(), -t[1].item(), t[2].item(), -t[3].item()  # host sync
    if G_max != G_min or (not pad_slots and s_max != s_min):
        raise ValueError(
            f"expert parallelism needs the same routing shape on every rank: groups G in "
            f"[{G_min}, {G_max}] and slots per expert s in [{s_min}, {s_max}] across ranks "
            f"(give every rank an x of the same shape [B, T, d])")
    return s_max


def moe_ffn_expert_parallel(x, gates, token_index, w_in, w_out, group, pad_slots=False,
                            check_shapes=False):
    """moe_ffn with the experts sharded over the W processes of `group` (see the diagram above).

    x [..., n, d] this rank's tokens, gates/token_index [..., e, s] its routing (all e experts),
    w_in [e/W, d, f], w_out [e/W, f, d] this rank's experts -> y [..., n, d], equal to
    moe_ffn(x, gates, token_index, full w_in, full w_out). Differentiable: the gradients of x
    and gates are this rank's; those of w_in/w_out sum the contributions of every rank's tokens.
    pad_slots: ranks may have different s (top2_dropless): agree on the largest by one all-reduce
    and pad with empty slots. check_shapes: the same all-reduce, to raise a clear ValueError
    when the ranks' routing shapes differ (otherwise the exchange fails or hangs)."""
    W = dist.get_world_size(group)
    E = w_in.shape[0]  # experts on this rank, e / W
    *lead, n, d = x.shape
    e, s = gates.shape[-2:]
    if E * W != e or w_out.shape[0] != E:
        raise ValueError(f"w_in and w_out must hold e/W = {e}/{W} experts; got "
                         f"{tuple(w_in.shape)} and {tuple(w_out.shape)}")
    G = math.prod(lead)
    if pad_slots or check_shapes:
        s_max = _agree_on_slots(G, s, group, pad_slots, x.device)
        if s_max > s:  # empty slots: token -1, gate 0 (they add nothing)
            gates = F.pad(gates, (0, s_max - s))
            token_index = F.pad(token_index, (0, s_max - s), value=-1)
            s = s_max
    m = G * s  # slots per expert on this rank
    X_in, flat_index, gate_per_slot = dispatch(x, gates, token_index)  # [e, m, d]
    # rows r*E .. (r+1)*E-1 are rank r's experts: X_in is already grouped by destination
    X_recv = all_to_all(X_in.view(W, E, m, d), group)  # [W, E, m, d], block q from rank q
    X_local = X_recv.transpose(0, 1).reshape(E, W * m, d)  # this rank's experts, every source
    X_e = expert_ffn(X_local, w_in, w_out)  # [E, W*m, d]: one batched matmul
    X_back = X_e.view(E, W, m, d).transpose(0, 1)  # [W, E, m, d], block q back to rank q
    X_e = all_to_all(X_back, group).view(e, m, d)  # this rank's slots of all e experts
    return combine(x, X_e, flat_index, gate_per_slot)  # (Eq. 4) [..., n, d]


class ExpertParallel:
    """Mixin for a sharded MoE layer: its experts run where they live (moe_ffn_expert_parallel),
    and the thresholds average over every rank's groups (so every rank keeps the same ones)."""

    def experts(self, x_groups, gates, token_index):
        # slot counts differ between ranks for dropless top-2 and threshold routing: agree on them
        pad = getattr(self, "dropless", False) or (not self.training and self.eval_routing != "group")
        return moe_ffn_expert_parallel(x_groups, gates, token_index, self.w_in, self.w_out,
                                       self.expert_parallel_group, pad_slots=pad,
                                       check_shapes=self.checks_values(x_groups))

    def extra_repr(self):
        return super().extra_repr() + f", expert_parallel=rank {self.expert_parallel_rank} of {self.expert_parallel_size}"

    def mean_over_groups(self, v):
        v = v.mean(0)  # [e]; one all-reduce of e values, no host sync
        dist.all_reduce(v, group=self.expert_parallel_group)
        return v / self.expert_parallel_size


_SHARDED_CLASSES = {}


def shard_layer(layer, group):
    """Keep only this rank's experts of `layer` (a MoE holding all of them), in place: w_in
    [e/W, d, f], w_out [e/W, f, d] (the slice of the full init); w_router stays whole."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("expert parallelism needs torch.distributed to be initialised "
                         "(torch.distributed.init_process_group) first")
    if isinstance(layer, ExpertParallel):
        raise ValueError("this MoE layer is already sharded over an expert-parallel group")
    W, r = dist.get_world_size(group), dist.get_rank(group)
    if r < 0:
        raise ValueError("expert parallelism: this process is not a member of the group")
    part = expert_slice(layer.n_experts, r, W)
    with torch.no_grad():
        layer.w_in = nn.Parameter(layer.w_in[part].clone())  # [e/W, d, f]
        layer.w_out = nn.Parameter(layer.w_out[part].clone())  # [e/W, f, d]
    layer.expert_parallel_group, layer.expert_parallel_rank, layer.expert_parallel_size = group, r, W
    cls = type(layer)
    if cls not in _SHARDED_CLASSES:  # e.g. ExpertParallelMoE(ExpertParallel, MoE)
        _SHARDED_CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (ExpertParallel, cls), {})
    layer.__class__ = _SHARDED_CLASSES[cls]
    return layer


def shard_experts(module, group):
    """Shard every MoE layer in `module` (or `module` itself) over the W processes of `group`
    (W must divide n_experts), in place -> module. Each MoE keeps experts [r e/W, (r+1) e/W).
    Build the optimizer afterwards. To start from a full checkpoint: load it into the unsharded
    model, then shard. Every rank must then call forward (and backward) together, same x shape."""
    for layer in [m for m in module.modules() if isinstance(m, MoE)]:
        shard_layer(layer, group)
    return module


def full_state_dict(module):
    """module.state_dict() with the experts of every sharded MoE gathered to their full shapes
    ([e, d, f], [e, f, d]), i.e. the state dict of the unsharded model. A collective
    (all_gather): every rank of each group must call it; every rank gets the full dict."""
    state = module.state_dict()
    for name, layer in module.named_modules():
        if isinstance(layer, ExpertParallel):
            for p in ("w_in", "w_out"):
                key = f"{name}.{p}" if name else p
                parts = [torch.empty_like(state[key]) for _ in range(layer.expert_parallel_size)]
                dist.all_gather(parts, state[key].contiguous(), group=layer.expert_parallel_group)
                state[key] = torch.cat(parts)
    return state


def load_full_state_dict(module, state):
    """Load the state dict of the unsharded model (e.g. full_state_dict's) into `module`, whose
    MoE layers may be sharded: each takes its own slice of the experts. No communication."""
    state = dict(state)
    for name, layer in module.named_modules():
        if isinstance(layer, ExpertParallel):
            part = expert_slice(layer.n_experts, layer.expert_parallel_rank, layer.expert_parallel_size)
            for p in ("w_in", "w_out"):
                key = f"{name}.{p}" if name else p
                state[key] = state[key][part]
    return module.load_state_dict(state)
