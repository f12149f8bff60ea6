"""The tiny transformer train_tiny.py trains: T5.1.1-style blocks (pre-norm RMSNorm, no biases,
T5 bucketed relative position bias, untied output head), as a decoder-only LM or a T5
encoder-decoder. Which FFN sits in each layer (gated GELU, an ecmoe.MoE, a dense FFN) is the
trainer's choice: it builds them and passes them in.

Parameters are created empty (torch.empty): train_tiny.init_weights fills every one by name.
Shape legend: B batch, S encoder length, T decoder / LM length, d model width, f d_ff, V vocab,
H heads, g routing-group size.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ecmoe import MoE


def relative_bucket(rel, bidirectional, num_buckets=32, max_distance=128):
    """T5's bucketing of rel = key_pos - query_pos: exact for small |rel|, log-spaced beyond."""
    n, ret = -rel, torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        ret = (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)                                    # future keys share bucket 0
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(n.clamp(min=max_exact).float() / max_exact)
                         / math.log(max_distance / max_exact) * (num_buckets - max_exact)).long()
    return ret + torch.where(n < max_exact, n, large.clamp(max=num_buckets - 1))


class RelativeBias(nn.Module):
    """T5 relative position bias [1, H, Tq, Tk], causal (future masked) unless bidirectional.
    The bucket index and the mask are built once per (Tq, Tk, device) and kept in `self.cache`
    (not in the state dict): a training run uses one shape, sampling one per generated length."""
    def __init__(self, n_heads, bidirectional):
        super().__init__()
        self.bidirectional = bidirectional
        self.table = nn.Parameter(torch.empty(32, n_heads))  # [buckets, H]
        self.cache = {}                                       # (Tq, Tk, device) -> (bucket, mask)

    def index(self, Tq, Tk):
        """-> (bucket [Tq, Tk], future mask [Tq, Tk] or None), on the table's device."""
        key = (Tq, Tk, self.table.device)
        if key not in self.cache:
            pos_q, pos_k = torch.arange(Tq), torch.arange(Tk)
            bucket = relative_bucket(pos_k[None, :] - pos_q[:, None], self.bidirectional)
            future = None if self.bidirectional else torch.ones(Tq, Tk, dtype=torch.bool).triu(1)
            self.cache[key] = (bucket.to(key[2]), future if future is None else future.to(key[2]))
        return self.cache[key]

    def forward(self, Tq, Tk):
        bucket, future = self.index(Tq, Tk)
        bias = self.table[bucket].permute(2, 0, 1)[None]                   # [1, H, Tq, Tk]
        if future is not None:                                            # causal mask
            # -1e9, not -inf: exp underflows to exactly 0 all the same, and SDPA's CPU path
            # skips its fully-masked-row handling (2x faster steps at this size, measured)
            bias = bias.masked_fill(future, -1e9)
        return bias


class Attention(nn.Module):
    """Multi-head attention without biases. T5 folds 1/sqrt(d_head) into its init; we keep
    the usual scaled dot product (SDPA's default) and add the relative bias as the mask."""
    def __init__(self, d, n_heads):
        super().__init__()
        self.H = n_heads
        self.wq, self.wk, self.wv, self.wo = (nn.Parameter(torch.empty(d, d)) for _ in range(4))

    def forward(self, x, kv, bias):
        B, Tq, d = x.shape
        Tk = kv.shape[1]
        q = (x @ self.wq).view(B, Tq, self.H, d // self.H).transpose(1, 2)   # [B, H, Tq, d/H]
        k = (kv @ self.wk).view(B, Tk, self.H, d // self.H).transpose(1, 2)  # [B, H, Tk, d/H]
        v = (kv @ self.wv).view(B, Tk, self.H, d // self.H).transpose(1, 2)  # [B, H, Tk, d/H]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)          # [B, H, Tq, d/H]
        return o.transpose(1, 2).reshape(B, Tq, d) @ self.wo                 # [B, Tq, d]


class GatedGeluFFN(nn.Module):
    """Non-MoE FFN (T5.1.1 / paper Sec. 3): (gelu(x W0) * x W1) W2."""
    def __init__(self, d, f):
        super().__init__()
        self.w_in0, self.w_in1 = nn.Parameter(torch.empty(d, f)), nn.Parameter(torch.empty(d, f))
        self.w_out = nn.Parameter(torch.empty(f, d))

    def forward(self, x):
        return (F.gelu(x @ self.w_in0, approximate="tanh") * (x @ self.w_in1)) @ self.w_out


class DenseFFN(nn.Module):
    """The `dense` baseline for a MoE layer: one plain GELU FFN (width 2f = EC-CF2's FLOPs)."""
    def __init__(self, d, f):
        super().__init__()
        self.w_in, self.w_out = nn.Parameter(torch.empty(d, f)), nn.Parameter(torch.empty(f, d))

    def forward(self, x):
        return F.gelu(x @ self.w_in, approximate="tanh") @ self.w_out


def to_subgroups(x, g):
    """[B, T, d] -> [g, B/g * T, d]: column m*T + t holds position t of sequences m*g .. m*g+g-1,
    so a MoE with group="position" (groups = columns) routes in groups of g consecutive
    sequences, one position each: still causal, and batch-independent across groups."""
    B, T, d = x.shape
    return x.view(B // g, g, T, d).transpose(0, 1).reshape(g, B // g * T, d)


def from_subgroups(y, B, T):
    """Inverse of to_subgroups: [g, B/g * T, d] -> [B, T, d]."""
    g, _, d = y.shape
    return y.view(g, B // g, T, d).transpose(0, 1).reshape(B, T, d)


class Block(nn.Module):
    """Pre-norm T5 block: self-attention, [cross-attention], FFN (gated, dense or MoE).
    group_size g > 0: a MoE routes in position groups of g sequences (to_subgroups)."""
    def __init__(self, d, n_heads, ffn, cross, group_size=0):
        super().__init__()
        self.norm_sa, self.sa = nn.RMSNorm(d, eps=1e-6), Attention(d, n_heads)
        self.norm_ca = nn.RMSNorm(d, eps=1e-6) if cross else None
        self.ca = Attention(d, n_heads) if cross else None
        self.norm_ff, self.ffn = nn.RMSNorm(d, eps=1e-6), ffn
        self.group_size = group_size if isinstance(ffn, MoE) else 0

    def forward(self, x, bias, enc=None):
        h = self.norm_sa(x)
        x = x + self.sa(h, h, bias)
        if self.ca is not None:
            x = x + self.ca(self.norm_ca(x), enc, None)
        h = self.norm_ff(x)
        if not isinstance(self.ffn, MoE):
            return x + self.ffn(h), None
        B, T, _ = h.shape
        if self.group_size and B > self.group_size:   # position groups of g sequences
            # (B <= g, e.g. batch size 1 at inference: the batch is one group)
            out = self.ffn(to_subgroups(h, self.group_size))
            return x + from_subgroups(out.y, B, T), out
        out = self.ffn(h)                       # MoEOutput(y, aux_loss, z_loss, stats)
        return x + out.y, out


class TinyModel(nn.Module):
    """Shared parts: the list of MoE layers (found once, when the model is built), the stacks."""
    def find_moe_layers(self):
        def short(name):                            # "decoder.1.ffn" -> "dec1"
            return name.rsplit(".ffn", 1)[0].replace("encoder.", "enc").replace("decoder.", "dec")
        self.moe = [(short(n), m) for n, m in self.named_modules() if isinstance(m, MoE)]

    def moe_layers(self):
        """[(name, MoE layer)] in forward order, e.g. [("dec1", ...), ("dec3", ...)]."""
        return self.moe

    def run_stack(self, blocks, x, bias, enc=None):
        moe_outs = []
        for blk in blocks:
            x, o = blk(x, bias, enc)
            moe_outs += [o] if o is not None else []
        return x, moe_outs


class TinyLM(TinyModel):
    """Decoder-only causal byte LM: T5 decoder blocks without cross-attention, one per FFN."""
    def __init__(self, vocab, d, n_heads, ffns, group_size=0):
        super().__init__()
        self.embed = nn.Parameter(torch.empty(vocab, d))
        self.dec_bias = RelativeBias(n_heads, bidirectional=False)
        self.decoder = nn.ModuleList(Block(d, n_heads, f, cross=False, group_size=group_size)
                                     for f in ffns)
        self.dec_norm = nn.RMSNorm(d, eps=1e-6)
        self.lm_head = nn.Parameter(torch.empty(d, vocab))
        self.find_moe_layers()

    def forward(self, ids):
        """ids [B,T] -> logits [B,T,V], list of MoEOutput (one per MoE layer)."""
        x = self.embed[ids]                                             # [B, T, d]
        x, moe_outs = self.run_stack(self.decoder, x, self.dec_bias(ids.shape[1], ids.shape[1]))
        return self.dec_norm(x) @ self.lm_head, moe_outs                # [B, T, V]


class TinyT5(TinyModel):
    """T5 encoder-decoder (the encoder's MoE layers route in their own `group`)."""
    def __init__(self, vocab, d, n_heads, enc_ffns, dec_ffns, group_size=0):
        super().__init__()
        self.embed = nn.Parameter(torch.empty(vocab, d))
        self.enc_bias = RelativeBias(n_heads, bidirectional=True)
        self.dec_bias = RelativeBias(n_heads, bidirectional=False)
        self.encoder = nn.ModuleList(Block(d, n_heads, f, cross=False) for f in enc_ffns)
        self.decoder = nn.ModuleList(Block(d, n_heads, f, cross=True, group_size=group_size)
                                     for f in dec_ffns)
        self.enc_norm, self.dec_norm = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.lm_head = nn.Parameter(torch.empty(d, vocab))
        self.find_moe_layers()

    def forward(self, enc_ids, dec_ids):
        """enc_ids [B,S], dec_ids [B,T] -> logits [B,T,V], list of MoEOutput (one per MoE layer)."""
        S, T = enc_ids.shape[1], dec_ids.shape[1]
        x, enc_outs = self.run_stack(self.encoder, self.embed[enc_ids], self.enc_bias(S, S))
        y, dec_outs = self.run_stack(self.decoder, self.embed[dec_ids], self.dec_bias(T, T),
                                     self.enc_norm(x))
        return self.dec_norm(y) @ self.lm_head, enc_outs + dec_outs     # [B, T, V]
