"""Solutions of notebook 08's exercises, and the typical wrong answers the checks must catch."""
import torch
import torch.nn as nn

import ecmoe


# ------------------------------------------------------------------------- 1. the MLP replaced by MoE
class MoEBlock(nn.Module):
    """Pre-norm residual block, its MLP an ecmoe.MoE with default arguments (position groups; eval
    routes by the learned thresholds once trained)."""

    def __init__(self, d_model, n_experts):
        super().__init__()
        self.ln, self.moe = nn.LayerNorm(d_model), ecmoe.MoE(d_model, 2 * d_model, n_experts)

    def forward(self, x):
        out = self.moe(self.ln(x))  # MoEOutput(y, aux_loss, z_loss, stats)
        return x + out.y, out.z_loss


class BlockSequenceGroups(MoEBlock):
    """group="sequence" (one routing group per sequence, as in an encoder): in a decoder a token's
    experts depend on later tokens of its sequence."""

    def __init__(self, d_model, n_experts):
        super().__init__(d_model, n_experts)
        self.moe = ecmoe.MoE(d_model, 2 * d_model, n_experts, group="sequence")


class BlockBatchGroups(MoEBlock):
    """group="batch" (the paper's literal n: every token of the batch in one group): not causal."""

    def __init__(self, d_model, n_experts):
        super().__init__(d_model, n_experts)
        self.moe = ecmoe.MoE(d_model, 2 * d_model, n_experts, group="batch")


class BlockEvalGroupRouting(MoEBlock):
    """eval_routing="group": eval routes like training, so at batch size 1 every expert takes the token."""

    def __init__(self, d_model, n_experts):
        super().__init__(d_model, n_experts)
        self.moe = ecmoe.MoE(d_model, 2 * d_model, n_experts, eval_routing="group")


class BlockNoResidual(MoEBlock):
    """Returns the MoE output alone: the residual path is lost (an unrouted token's output is 0)."""

    def forward(self, x):
        out = self.moe(self.ln(x))
        return out.y, out.z_loss


class BlockAddsMoEOutput(MoEBlock):
    """Adds the MoEOutput named tuple itself instead of its .y."""

    def forward(self, x):
        out = self.moe(self.ln(x))
        return x + out, out.z_loss


# ------------------------------------------------------------------------- 2. generation
@torch.no_grad()
def generate(model, idx, n_new):
    """Greedy decoding, batch size 1, in eval mode (thresholds), context cropped to block_size."""
    model.eval()
    for _ in range(n_new):
        logits, _, _ = model(idx[:, -model.cfg.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@torch.no_grad()
def generate_in_training_mode(model, idx, n_new):
    """Forgets model.eval(): training-mode routing (every expert at batch size 1), thresholds move."""
    for _ in range(n_new):
        logits, _, _ = model(idx[:, -model.cfg.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@torch.no_grad()
def generate_group_routing(model, idx, n_new):
    """Sets eval_routing="group" on the MoE layers: eval routes in groups of one token at batch 1."""
    for m in model.modules():
        if isinstance(m, ecmoe.MoE):
            m.eval_routing = "group"
    return generate(model, idx, n_new)


@torch.no_grad()
def generate_no_crop(model, idx, n_new):
    """Feeds the whole sequence: past block_size the position embedding has no row for it."""
    model.eval()
    for _ in range(n_new):
        logits, _, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@torch.no_grad()
def generate_last_token_only(model, idx, n_new):
    """Feeds only the newest token (as with a KV cache, but this model has none): no context."""
    model.eval()
    for _ in range(n_new):
        logits, _, _ = model(idx[:, -1:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


# ------------------------------------------------------------------------- 3. FLOPs of a routing
def expert_flops(token_index, d_model, d_ff):
    """needed: 4·d·f per filled slot (two matmuls, a multiply-add = 2 FLOPs); executed: ecmoe.MoE's
    bmm runs the experts that have a filled slot, each on as many slots as the busiest has (over all
    groups). In training every slot is filled, so that is all e experts on all G·s slots."""
    G, e, s = token_index.shape
    per_slot = 4 * d_model * d_ff
    count = (token_index >= 0).sum(dim=(0, 2))  # [e] filled slots of each expert
    return per_slot * int(count.sum()), per_slot * int((count > 0).sum()) * int(count.max())


def flops_multiply_adds(token_index, d_model, d_ff):
    """Counts multiply-adds (MACs), not FLOPs: half the count."""
    needed, executed = expert_flops(token_index, d_model, d_ff)
    return needed // 2, executed // 2


def flops_no_padding(token_index, d_model, d_ff):
    """executed = needed: forgets that the batched matmul pads every expert to the busiest one."""
    needed, _ = expert_flops(token_index, d_model, d_ff)
    return needed, needed


def flops_whole_layout(token_index, d_model, d_ff):
    """executed = every expert on all G·s slots, as in training: forgets that threshold routing packs."""
    G, e, s = token_index.shape
    needed, _ = expert_flops(token_index, d_model, d_ff)
    return needed, 4 * d_model * d_ff * G * e * s


def flops_empty_slots_needed(token_index, d_model, d_ff):
    """needed counts the empty slots (-1) as well: every slot of the layout, not the tokens routed."""
    G, e, s = token_index.shape
    _, executed = expert_flops(token_index, d_model, d_ff)
    return 4 * d_model * d_ff * G * e * s, executed


SOLUTIONS = {"check_moe_block": MoEBlock, "check_generate": generate, "check_expert_flops": expert_flops}
WRONG = {
    "check_moe_block": [BlockSequenceGroups, BlockBatchGroups, BlockEvalGroupRouting, BlockNoResidual,
                        BlockAddsMoEOutput],
    "check_generate": [generate_in_training_mode, generate_group_routing, generate_no_crop,
                       generate_last_token_only],
    "check_expert_flops": [flops_multiply_adds, flops_no_padding, flops_whole_layout,
                           flops_empty_slots_needed],
}
