"""The notebooks' one shared helper: path setup and the few pictures every notebook draws.

`import nbhelp` as the first import of a notebook puts the repository root on `sys.path` (so
`import ecmoe`, `reference_numpy`, `moe`, `lab` work from notebooks/ and from the root); that is its
only side effect. Everything else is called explicitly:

    style()                          small figures (80 dpi, 8 pt), for notebooks committed with outputs
    heatmap(ax, M, title, ...)       annotated heatmap of a 2-D array (scores, gates, token ids, P)
    assignment(gates, token_index, n)  a routing's slots [.., e, s] -> token x expert matrix [.., n, e]
    experts_per_token(token_index, n)  how many experts hold each token
    token_expert_graph(ax, gates, token_index, n)  who picks whom: tokens left, experts right,
                                     one edge per (token, expert) assignment, width = gate
    show_routing(ax, A, title, ...)  a token x expert matrix as a picture, loads and counts labelled

Shapes: n tokens of a group, e experts, s slots per expert (k for expert choice); -1 in a
token_index marks an empty slot (token choice's unfilled buffer).
"""
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def style():
    """Small figures for notebooks committed with their outputs (80 dpi, 8 pt)."""
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 80, "savefig.dpi": 80, "font.size": 8})


def heatmap(ax, M, title, rows=None, cols=None, fmt="{:.2f}", cmap="Blues", boxes=()):
    """Small annotated heatmap of a 2-D array M [r, c] on ax.

    - rows, cols: tick labels (default: indices)
    - fmt: format string or function of the value
    - cmap: a matplotlib colormap name; "RdBu_r" is centred on 0; None = a plain table
    - boxes: (row, col) cells to outline in red
    """
    from matplotlib.patches import Rectangle
    M = np.asarray(M, dtype=float)
    if cmap is None:
        ax.imshow(np.zeros_like(M), cmap="Greys", vmin=0, vmax=1, aspect="auto")
        shade = np.zeros_like(M)
    elif cmap == "RdBu_r":
        vmax = max(np.abs(M).max(), 1e-12)
        ax.imshow(M, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
        shade = np.abs(M) / vmax
    else:
        lo, hi = M.min(), M.max()
        ax.imshow(M, cmap=cmap, aspect="auto")
        shade = (M - lo) / (hi - lo) if hi > lo else np.zeros_like(M)
    for (r, c), v in np.ndenumerate(M):
        ax.text(c, r, fmt(v) if callable(fmt) else fmt.format(v), ha="center", va="center", fontsize=7,
                color="white" if shade[r, c] > 0.6 else "black")
    for r, c in boxes:
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.6))
    ax.set_title(title)
    ax.set_xticks(range(M.shape[1]), cols if cols is not None else range(M.shape[1]))
    ax.set_yticks(range(M.shape[0]), rows if rows is not None else range(M.shape[0]))
    ax.tick_params(length=0)


def assignment(gates, token_index, n):
    """A routing's slots -> its token x expert matrix: the gate where token t went to expert i, else 0.

    gates, token_index [e, s] (one group) or [G, e, s] (G groups of n tokens; -1 = empty slot)
    -> A [n, e], or [G * n, e] with the groups stacked (G groups of one token give [G, e]).
    A token held twice by one expert (never, for the routers here) keeps the last gate.
    """
    gates, token_index = np.asarray(gates, dtype=float), np.asarray(token_index)
    one_group = gates.ndim == 2
    if one_group:
        gates, token_index = gates[None], token_index[None]
    G, e = gates.shape[:2]
    A = np.zeros((G, n, e))
    g, i, s = np.nonzero(token_index >= 0)
    A[g, token_index[g, i, s], i] = gates[g, i, s]
    return A[0] if one_group else A.reshape(G * n, e)


def experts_per_token(token_index, n):
    """How many experts hold each token: token_index [..., e, s] of one group (-1 = empty) -> [n]."""
    token_index = np.asarray(token_index)
    return np.bincount(token_index[token_index >= 0], minlength=n)


def token_expert_graph(ax, gates, token_index, n, tokens=None, experts=None, title=None,
                       max_width=8.0, highlight=()):
    """Who picks whom, as a two-sided graph: tokens on the left, experts on the right, one edge per
    assignment (a filled slot), its width proportional to the gate.

    - gates, token_index [e, s]: one group's routing (expert choice's G, I; -1 = empty slot)
    - n: tokens in the group; tokens, experts: node labels (default t0.., E0..)
    - max_width: line width of a gate of 1; highlight: token ids whose node is drawn red
    Returns the edges drawn, an int array [m, 2] of (token, expert), and their gates [m], in slot
    order (expert by expert, slot by slot), so a notebook can assert them against the library.
    Each token's label carries its number of experts, each expert's its load.
    """
    gates, token_index = np.asarray(gates, dtype=float), np.asarray(token_index)
    e = gates.shape[0]
    tokens = list(tokens) if tokens is not None else [f"t{t}" for t in range(n)]
    experts = list(experts) if experts is not None else [f"E{i}" for i in range(e)]
    y_tok = np.linspace(1, 0, n)                                  # tokens top to bottom
    y_exp = np.linspace(1, 0, e + 2)[1:-1] if e < n else np.linspace(1, 0, e)
    i, s = np.nonzero(token_index >= 0)                           # filled slots, expert-major
    edges = np.stack([token_index[i, s], i], axis=1).astype(int)   # [m, 2] (token, expert)
    weights = gates[i, s]                                         # [m]
    colors = [f"C{x % 10}" for x in range(e)]
    for (t, x), g in zip(edges, weights):
        ax.plot([0, 1], [y_tok[t], y_exp[x]], color=colors[x], lw=max(max_width * g, 0.3),
                alpha=0.75, solid_capstyle="round")
    count, load = np.bincount(edges[:, 0], minlength=n), np.bincount(edges[:, 1], minlength=e)
    for t in range(n):
        red = t in set(highlight)
        ax.plot(0, y_tok[t], "o", ms=7, color="tab:red" if red else ("lightgrey" if count[t] == 0 else "k"))
        ax.text(-0.06, y_tok[t], f"{tokens[t]} ({count[t]})", ha="right", va="center", fontsize=7,
                color="tab:red" if red else "black")
    for x in range(e):
        ax.plot(1, y_exp[x], "s", ms=9, color=colors[x])
        ax.text(1.06, y_exp[x], f"{experts[x]} ({load[x]})", ha="left", va="center", fontsize=7)
    ax.set_xlim(-0.45, 1.4)
    ax.set_ylim(-0.08, 1.08)
    ax.axis("off")
    if title:
        ax.set_title(title)
    return edges, weights


def show_routing(ax, A, title, boxes=(), counts=True, gates=True):
    """A token x expert matrix A [n, e] (gate, or 0 = not routed) as a picture: chosen cells coloured
    (and, with gates, labelled) by their gate; with counts, each expert's load under its name and
    each token's number of experts in brackets. boxes: (token, expert) cells outlined in red."""
    from matplotlib.patches import Rectangle
    A = np.asarray(A, dtype=float)
    n, e = A.shape
    ax.imshow(np.where(A > 0, A, np.nan), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for (t, i), v in np.ndenumerate(A):
        if v > 0 and gates:
            ax.text(i, t, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v > 0.6 else "black")
    for t, i in boxes:
        ax.add_patch(Rectangle((i - 0.5, t - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.4))
    load, per_token = (A > 0).sum(0), (A > 0).sum(1)
    ax.set_xticks(range(e), [f"E{i}\n{load[i]}" if counts else f"E{i}" for i in range(e)])
    ax.set_yticks(range(n), [f"t{t} ({m})" if counts else f"t{t}" for t, m in enumerate(per_token)])
    ax.set_title(title)
    ax.tick_params(length=0)
