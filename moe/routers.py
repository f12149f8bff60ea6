"""THE router table: every script (trainer, statistics, sweeps, fine-tuning, benchmark) reads it.

A router name says which layer and which defaults; the capacity factor is a separate knob
(train_tiny.py --capacity-factor overrides the table's for every router of a run), so a name
like "ec2" means "expert choice, default c = 2". "dense" is no MoE: one plain GELU FFN of width
2 d_ff in its place (the activated FLOPs of top-2 and EC-CF2). ROUTER + NULL_SUFFIX (e.g.
"top2_aa") is the A/A null control: the same router, the same initial weights, another data order.
"""
from typing import NamedTuple

from ecmoe import MoE
from moe.capped import CappedMoE
from moe.threshold import ExpertThresholdMoE
from moe.token_choice import LossFreeMoE, TokenChoiceMoE


class Router(NamedTuple):
    layer: type  # the MoE class (None for dense)
    capacity_factor: float  # c: expert slots per token
    options: dict  # further arguments of the layer
    about: str  # one line for --help and the docs


ROUTERS = {
    "top1": Router(TokenChoiceMoE, 1.0, dict(top_k=1), "Switch top-1"),
    "top2": Router(TokenChoiceMoE, 2.0, dict(top_k=2), "GShard top-2, gates renormalised, capacity c"),
    "ec1": Router(MoE, 1.0, {}, "expert choice, c = 1 (compute of top-1)"),
    "ec2": Router(MoE, 2.0, {}, "expert choice, c = 2 (compute of top-2)"),
    "top2_dropless": Router(TokenChoiceMoE, 2.0, dict(top_k=2, dropless=True),
                            "top-2 without a capacity limit (nothing dropped)"),
    "top2_gshard": Router(TokenChoiceMoE, 2.0, dict(top_k=2, random_second=True),
                          "top-2, 2nd expert used with probability min(1, g2/0.2) (Mesh-TF)"),
    "cap2": Router(CappedMoE, 2.0, dict(max_experts_per_token=2), "capped expert choice, <= 2 experts a token"),
    "cap3": Router(CappedMoE, 2.0, dict(max_experts_per_token=3), "capped expert choice, <= 3 experts a token"),
    "et1": Router(ExpertThresholdMoE, 1.0, {}, "expert threshold: a token takes expert i iff its "
                  "score passes i's learned cutoff, c = 1 on average (moe/threshold.py)"),
    "et2": Router(ExpertThresholdMoE, 2.0, {}, "expert threshold, c = 2 on average (compute of top-2)"),
    "top2_lossfree": Router(LossFreeMoE, 2.0, dict(top_k=2), "dropless top-2 balanced by a bias on "
                            "the choice, no balance loss (DeepSeek-V3)"),
    "dense": Router(None, None, {}, "no MoE: a dense GELU FFN of width 2 d_ff"),
}
NULL_SUFFIX = "_aa"


def base_router(name):
    """'top2_aa' -> 'top2' (the A/A run trains the same model as its base router)."""
    return name[:-len(NULL_SUFFIX)] if name.endswith(NULL_SUFFIX) else name


def parse_routers(text):
    """'top2,ec2,top2_aa' -> ['top2', 'ec2', 'top2_aa']; ValueError for an empty item, an unknown
    or a repeated name."""
    names = [r.strip() for r in text.split(",")]
    if not text.strip() or "" in names:
        raise ValueError(f"empty router name in {text!r}; give a comma list of {', '.join(ROUTERS)}")
    unknown = [r for r in names if base_router(r) not in ROUTERS]
    if unknown:
        raise ValueError(f"unknown router(s) {unknown}; choose from {', '.join(ROUTERS)} "
                         f"(or ROUTER{NULL_SUFFIX}, the A/A null control)")
    repeated = sorted({r for r in names if names.count(r) > 1})
    if repeated:
        raise ValueError(f"router(s) {repeated} given more than once")
    return names


def is_token_choice(name):
    """Whether each token picks its experts (top1, top2*, including top2_lossfree)."""
    layer = ROUTERS[base_router(name)].layer
    return layer is not None and issubclass(layer, TokenChoiceMoE)


def capacity_factor(name, override=None):
    """c of a run of router `name`: the flag's value if given, else the table's (None: dense)."""
    c = ROUTERS[base_router(name)].capacity_factor
    return c if override is None or c is None else override


def make_layer(name, d_model, d_ff, n_experts, capacity_factor=None, **kwargs):
    """The MoE layer of router `name` (None for "dense"); capacity_factor None = the table's;
    kwargs go to the layer (group, check_inputs, eval_routing for expert choice, ...)."""
    if base_router(name) not in ROUTERS:
        raise ValueError(f"router {name!r} is not in the table; choose from {', '.join(ROUTERS)}")
    spec = ROUTERS[base_router(name)]
    if spec.layer is None:
        return None
    c = spec.capacity_factor if capacity_factor is None else capacity_factor
    return spec.layer(d_model, d_ff, n_experts, capacity_factor=c, **spec.options, **kwargs)
