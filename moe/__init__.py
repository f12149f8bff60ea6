"""Extensions of ecmoe.MoE: the routers expert choice is compared with, and scale-out.

Each file imports ecmoe (and moe/ files above it in this list) and nothing else of this
project; ecmoe never imports them.
    token_choice.py   Switch top-1, GShard top-2 (also dropless, and GShard's random 2nd expert),
                      and dropless top-2 with auxiliary-loss-free bias balancing (LossFreeMoE)
    capped.py         EC-CAP (paper Sec. 3.3): expert choice with at most b experts per token
    grouped.py        one grouped matmul over the filled slots, sorted by expert, for variable
                      loads (no padding to the busiest expert); sync-free dropless top-k and
                      loss-free layouts
    threshold.py      Expert Threshold routing: expert choice's cutoff, learned, applied per token
    parallel.py       expert parallelism: the experts sharded over torch.distributed processes
    routers.py        THE router table: name -> layer, capacity factor, cap (every script reads it)
"""
