"""torchrun plumbing: `torchrun --nproc_per_node=W train_tiny.py ...` trains each run on W
processes, data parallel for the dense weights and expert parallel for the experts
(moe/parallel.py): gloo on CPU, NCCL on GPU (one GPU per process). `join()` returns the World the
trainer passes to every helper below; without torchrun (or with W = 1) it is World(), whose
helpers are no-ops, and a run is exactly the single-process one.

- Data: every rank builds the same global batch and takes rows r*B/W .. (r+1)*B/W - 1
  (World.rows); validation batches likewise. The trainer's --batch-size is the global batch.
- Routing: each rank routes its own rows. With --group-size g dividing B/W the routing groups
  are those of one process, so the loss curve is the same up to float error (tested). With
  --group-size 0 each rank routes over its B/W sequences instead of all B: another k, other
  routing, another curve. top2_gshard's draws also differ (each rank draws for its own tokens).
- Gradients: the loss is the global mean (1/W) sum_r L_r. Dense and router gradients are
  all-reduced and averaged; expert gradients already hold sum_r dL_r/dw (the all-to-all's
  backward brings every rank's contribution), so they are divided by W. Clipping uses the global
  norm (the expert slices' squared norms all-reduced).
- Files: rank 0 alone writes results and the final model (experts gathered by full_state: the
  file one process writes). Checkpoints are one file per rank (World.suffix in the name: the
  rank's expert slice and optimizer state), so a resume needs the same W.
- Evaluation: World.average gives every rank the whole batch's loss; expert-choice thresholds
  are averaged over ranks as they are learned (moe.parallel), so they agree on every rank.
- Output: ranks other than 0 print nothing (stdout to /dev/null); errors still reach stderr.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe.parallel import ExpertParallel, full_state_dict, shard_experts


@dataclass(frozen=True)
class World:
    size: int = 1                  # W processes
    rank: int = 0                  # this process
    backend: str | None = None     # "gloo" | "nccl" under torchrun

    @property
    def suffix(self):
        """'' on one process, '.rank{r}of{W}' under torchrun (per-rank checkpoint names)."""
        return f".rank{self.rank}of{self.size}" if self.size > 1 else ""

    def rows(self, batch):
        """This rank's rows r*B/W .. (r+1)*B/W - 1 of every tensor of a global batch."""
        if self.size == 1:
            return batch
        W, r = self.size, self.rank
        return [t[r * len(t) // W:(r + 1) * len(t) // W] for t in batch]

    def shard(self, model):
        """Keep this rank's experts of every MoE layer (after init, before the optimizer)."""
        if self.size > 1:
            shard_experts(model, dist.group.WORLD)
        return model

    def reduce_and_clip(self, model, max_norm):
        """Gradients of the global mean loss, clipped on their global norm (torch's
        clip_grad_norm_ on one process). Dense: all-reduce and average; experts: divide by W."""
        if self.size == 1:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            return
        W = self.size
        experts = {id(p) for p in expert_params(model)}
        dense = [p for p in model.parameters() if id(p) not in experts]
        for p in dense:
            if p.grad is None:                            # every rank must send the same layout
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in dense])  # one all-reduce for all of them
        dist.all_reduce(flat)
        flat /= W
        for p, g in zip(dense, flat.split([p.numel() for p in dense])):
            p.grad.copy_(g.view_as(p))
        expert_sq = torch.zeros((), dtype=torch.float64, device=flat.device)
        for p in expert_params(model):
            if p.grad is not None:
                p.grad /= W
                expert_sq += p.grad.double().square().sum()
        dist.all_reduce(expert_sq)                        # the slices' squared norms, summed
        total = (flat.double().square().sum() + expert_sq).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))

    def average(self, values):
        """Floats (per-rank means over equal-sized slices) -> their mean over ranks."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64,
                         device="cuda" if self.backend == "nccl" else "cpu")
        dist.all_reduce(t)
        return (t / self.size).tolist()

    def average_window(self, win_loss, win):
        """In place: the training-loss window (0-d tensors) and the routing-stat window, averaged
        over ranks, so the logged train loss and stats are those of the global batch."""
        if self.size == 1 or not win_loss:
            return
        losses = torch.stack(win_loss)
        dist.all_reduce(losses)
        for t, v in zip(win_loss, losses / self.size):
            t.copy_(v)
        dist.all_reduce(win)
        win /= self.size

    def count_parameters(self, model):
        """Parameters of the whole model: a sharded MoE counts all its experts, not its slice."""
        n = sum(p.numel() for p in model.parameters())
        return n + sum((self.size - 1) * p.numel() for p in expert_params(model))

    def full_state(self, model):
        """The model's state_dict, every sharded MoE's experts gathered (a collective)."""
        return full_state_dict(model)

    def gather(self, obj):
        """[obj of rank 0, ..., obj of rank W-1] on every rank (a collective)."""
        if self.size == 1:
            return [obj]
        every = [None] * self.size
        dist.all_gather_object(every, obj)
        return every

    def describe(self):
        """What a results file records of a torchrun run (None on one process)."""
        if self.size == 1:
            return None
        return dict(world_size=self.size, backend=self.backend,
                    note="data parallel dense weights, experts sharded (expert parallel); "
                         "routing groups are per process")


def expert_params(model):
    """The expert weights of the model's sharded MoE layers (each rank holds its slice)."""
    return [p for m in model.modules() if isinstance(m, ExpertParallel) for p in (m.w_in, m.w_out)]


def world_size():
    """W of this launch (torchrun sets WORLD_SIZE), before joining anything."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL for device "cuda", one GPU
    per LOCAL_RANK; gloo otherwise) and silence stdout on ranks > 0. -> World."""
    if world_size() == 1:
        return World()
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    world = World(dist.get_world_size(), dist.get_rank(), backend)
    if world.rank:
        sys.stdout = open(os.devnull, "w")
    return world


def leave(world):
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
