"""THE router table and THE resolver: every script (trainer, statistics, sweeps, fine-tuning,
benchmark) turns a router name into its layer here, through resolve().

A router name says which layer and which defaults, e.g. "ec2" = expert choice at the table's
c = 2. A run's name is its LABEL: the name, plus "@c<C>" when the run's capacity factor C differs
from the table's (train_tiny.py --capacity-factor 1 turns "ec2" into the run "ec2@c1"), so a run
name never hides the c it was trained with; "ec2@c1" is itself a valid name. "dense" is no MoE:
one plain GELU FFN of width 2 d_ff in its place (the activated FLOPs of top-2 and EC-CF2), and has
no c. ROUTER + NULL_SUFFIX (e.g. "top2_aa", "top2_aa@c1") is the A/A null control: the same
router, the same initial weights, another data order.

    resolve("ec2")             -> Resolved(label="ec2", base="ec2", layer=MoE, capacity_factor=2.0, ...)
    resolve("ec2", 1)          -> label "ec2@c1", capacity_factor 1.0   (the same as resolve("ec2@c1"))
    resolve("top2_aa@c1")      -> label "top2_aa@c1", base "top2", null_control True
    parse_routers("ec1,ec2", capacity_factor=2)   -> ValueError: ec1@c2 and ec2 are one model
"""
import math
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
C_MARK = "@c"                   # label = NAME[_aa][@cC]


def token_choice(layer):
    """THE answer to "does each token pick its experts?", for a layer class (None: dense): it is
    a TokenChoiceMoE (top1, top2 and its variants, top2_lossfree). Expert choice, capped expert
    choice, expert threshold and dense are not. Token-choice layers get the balance loss."""
    return layer is not None and issubclass(layer, TokenChoiceMoE)


def c_text(c):
    """1.0 -> "1", 1.5 -> "1.5": the C of a label (exact: repr when %g would round)."""
    return f"{c:g}" if float(f"{c:g}") == c else repr(float(c))


class Resolved(NamedTuple):
    """A router name resolved: what the run is called and what it builds."""
    label: str            # what a run is called: the name, + "@c<C>" when C differs from the table's
    base: str             # table key: "top2" for "top2", "top2_aa", "top2_aa@c1"
    layer: type | None    # None for dense
    capacity_factor: float | None
    options: dict
    token_choice: bool    # each token picks its experts (token_choice(layer))
    null_control: bool    # name ends in _aa

    def build(self, d_model, d_ff, n_experts, **kwargs):
        """The MoE layer (None for dense); kwargs go to the layer (group, check_inputs,
        eval_routing, max_iter, bias_rate, ...)."""
        if self.layer is None:
            return None
        return self.layer(d_model, d_ff, n_experts, capacity_factor=self.capacity_factor,
                          **self.options, **kwargs)


def split(name):
    """'top2_aa@c1' -> ('top2_aa', 'top2', '1'): (stem, table key, the C it states or None)."""
    stem, mark, stated = name.partition(C_MARK)
    base = stem[:-len(NULL_SUFFIX)] if stem.endswith(NULL_SUFFIX) else stem
    return stem, base, stated if mark else None


def resolve(name, capacity_factor=None):
    """A router name NAME[_aa][@cC] -> Resolved. capacity_factor: the run's c for every MoE
    router (train_tiny --capacity-factor); None = the one the name states, else the table's.
    ValueError for an unknown name, a C that is not a finite number > 0, a C on "dense", or a
    name whose C differs from capacity_factor."""
    if not isinstance(name, str):
        raise ValueError(f"router name must be a string, got {name!r}")
    stem, base, stated = split(name)
    if base not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose from {', '.join(ROUTERS)} (or "
                         f"ROUTER{NULL_SUFFIX}, the A/A null control; ROUTER{C_MARK}C: at c = C)")
    spec = ROUTERS[base]
    c = None
    if stated is not None:
        try:
            c = float(stated)
        except ValueError:
            c = math.nan
        if not 0 < c < math.inf:
            raise ValueError(f"router {name!r}: the capacity factor after {C_MARK!r} must be a "
                             f"finite number > 0, got {stated!r}")
        if spec.layer is None:
            raise ValueError(f"router {name!r}: {base} has no capacity factor; drop {C_MARK}C")
    if capacity_factor is not None:
        if not 0 < capacity_factor < math.inf:
            raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor}")
        if c is not None and c != capacity_factor:
            raise ValueError(f"router {name!r} states c = {c_text(c)} but the capacity factor "
                             f"given is {c_text(capacity_factor)}; give one of the two")
        c = float(capacity_factor)
    if spec.layer is None:
        c = None
    elif c is None:
        c = spec.capacity_factor
    label = stem + (C_MARK + c_text(c) if c is not None and c != spec.capacity_factor else "")
    return Resolved(label, base, spec.layer, c, dict(spec.options), token_choice(spec.layer),
                    stem.endswith(NULL_SUFFIX))


def parse_routers(text, capacity_factor=None):
    """'top2,ec2,top2_aa' -> their labels ['top2', 'ec2', 'top2_aa'] at capacity_factor (None:
    each name's own). ValueError for an empty item, an unknown name, a repeated label, or two
    labels that would train the same model (same layer, options, c and data order: with
    capacity_factor 2, "ec1,ec2" are "ec1@c2" and "ec2", one model under two names)."""
    names = [r.strip() for r in text.split(",")]
    if not text.strip() or "" in names:
        raise ValueError(f"empty router name in {text!r}; give a comma list of {', '.join(ROUTERS)}")
    unknown = [r for r in names if split(r)[1] not in ROUTERS]
    if unknown:
        raise ValueError(f"unknown router(s) {unknown}; choose from {', '.join(ROUTERS)} (or "
                         f"ROUTER{NULL_SUFFIX}, the A/A null control; ROUTER{C_MARK}C: at c = C)")
    resolved = [resolve(r, capacity_factor) for r in names]
    labels = [r.label for r in resolved]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ValueError(f"router(s) {repeated} given more than once")
    seen = {}
    for r in resolved:
        model = (r.layer, r.capacity_factor, tuple(sorted(r.options.items())), r.null_control)
        if model in seen:
            given = "" if capacity_factor is None else f" at --capacity-factor {c_text(capacity_factor)}"
            raise ValueError(f"{seen[model]} and {r.label} would train the same model (the same "
                             f"layer, options and c = {c_text(r.capacity_factor)}) under two "
                             f"names{given}; give one of them")
        seen[model] = r.label
    return labels


# Shorthands of resolve(), kept for the files that import them (lab/compare, lab/finetune, tests,
# notebooks): each answers from resolve(), never on its own.
def base_router(name):
    """'top2_aa' -> 'top2', 'ec2@c1' -> 'ec2': resolve(name).base."""
    return resolve(name).base


def is_token_choice(name):
    """resolve(name).token_choice: whether each token picks its experts."""
    return resolve(name).token_choice


def capacity_factor(name, override=None):
    """resolve(name, override).capacity_factor: c of a run of `name` (None: dense)."""
    return resolve(name, override).capacity_factor


def make_layer(name, d_model, d_ff, n_experts, capacity_factor=None, **kwargs):
    """The MoE layer of router `name` (None for "dense") at capacity_factor (None: the name's);
    kwargs go to the layer (group, check_inputs, eval_routing for expert choice, ...)."""
    return resolve(name, capacity_factor).build(d_model, d_ff, n_experts, **kwargs)
