"""A Llama-family transformer for inference, with a static KV cache.

One forward pass, top to bottom:

    tokens -> embedding -> N x [ x + attention(norm(x)) ; x + feed_forward(norm(x)) ] -> norm -> output head

Everything here follows the Hugging Face `LlamaForCausalLM` layout (rotate-half RoPE, separate
q/k/v projections), so Hugging Face checkpoints load without permuting any weight. Qwen2 is the same
model with a bias on the q/k/v projections (`ModelArgs.qkv_bias`).

This file is the model and nothing else: plain `nn.Linear` layers and PyTorch's own attention. Its shape
(ModelArgs, from a known name or a Hugging Face config) is model_args.py. Faster forms for a device
(cpu_kernels.py, cuda_kernels.py) and quantized layers (quantized_layers.py) are swapped in for these modules
after loading; reading and writing checkpoints is checkpoint.py.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model_args import ModelArgs


def write_slots(buffer: Tensor, input_pos: Tensor, values: Tensor, cache_row: int = 0):
    """values (batch, n_kv_heads, seq, ...) into a cache buffer (max_batch_size, n_kv_heads, max_seq_length,
    ...) at cache slots input_pos: (seq,), the same for every row, or (batch, seq), each row at its own (a
    server's rows, each a sequence of its own). The batch's rows are the cache's rows from cache_row on (a
    server prefills one row at a time). Written by indexing the whole buffer (an index_put_ that
    torch.compile keeps in place; a scatter into a slice of it had the compiled step copy the whole cache
    every step)."""
    batch, seq = values.shape[0], values.shape[2]
    rows = torch.arange(cache_row, cache_row + batch, device=values.device).unsqueeze(1)  # (batch, 1)
    slots = input_pos.view(-1, seq)  # (1 or batch, seq)
    buffer[rows, :, slots] = values.transpose(1, 2)  # indexed: (batch, seq, n_kv_heads, ...)


class KVCache(nn.Module):
    """Keys and values of every position seen so far, pre-allocated so shapes never change
    (which is what lets torch.compile and CUDA graphs capture the decode step once). Every buffer of a
    cache is indexed (row, head, slot, ...), which is how a server moves a row's slots (engine.py); caches
    that store keys and values quantized (quantized_kv_cache.py) keep to that and to `update`."""

    def __init__(self, max_batch_size, max_seq_length, n_kv_heads, head_dim, dtype):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, cache_row: int = 0, slots: Optional[int] = None):
        """Write k, v: (batch, n_kv_heads, seq, head_dim) at cache slots input_pos (write_slots); return the
        keys and values attention reads: the batch's rows, their first `slots` slots (all by default)."""
        write_slots(self.k_cache, input_pos, k, cache_row)
        write_slots(self.v_cache, input_pos, v, cache_row)
        rows = slice(cache_row, cache_row + k.shape[0])
        return self.k_cache[rows, :, :slots], self.v_cache[rows, :, :slots]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # x / sqrt(mean(x^2) + eps), normalised in fp32 for accuracy, then scaled in the model's dtype (as
    # Llama does); F.rms_norm is that division as one op
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang & Sennrich 2019) of each row of x (..., dim), times a learned
    weight (dim,)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_frequencies(args: ModelArgs) -> Tensor:
    """Inverse frequencies theta_i = base^(-2i/d) of rotary embeddings (Su et al. 2021)."""
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim))
    if args.rope_scaling is None:
        return inv_freq
    # Llama 3.1 scaling: wavelengths much longer than the original context are slowed down by
    # `factor`, short ones are kept, and the band between is interpolated smoothly.
    scaling = args.rope_scaling
    factor = scaling["factor"]
    original_length = scaling["original_max_position_embeddings"]
    low_freq_wavelen = original_length / scaling["low_freq_factor"]
    high_freq_wavelen = original_length / scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_length / wavelen - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"])
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > low_freq_wavelen, inv_freq / factor,
                       torch.where(wavelen < high_freq_wavelen, inv_freq, interpolated))


def rope_table(args: ModelArgs, length: int) -> Tensor:
    """cos and sin of every (position, frequency) pair: shape (length, head_dim // 2, 2)."""
    angles = torch.outer(torch.arange(length, dtype=torch.float32), rope_frequencies(args))
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    # x: (batch, seq, heads, head_dim); rope: (batch, seq, 1, head_dim // 2, 2), in x's dtype.
    # The rotate-half convention: dimension i is paired with dimension i + head_dim // 2.
    cos, sin = rope.unbind(-1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RotaryEmbedding(nn.Module):
    """Each head of x (batch, seq, heads, head_dim) rotated by its token's position (apply_rope; the cos/sin
    table is the model's). A module of its own, with no weights, so that a device can swap in another form
    of the same rotation (cpu_kernels.py)."""

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        return apply_rope(x, rope)


class ScaledDotProductAttention(nn.Module):
    """softmax(q k^T / sqrt(head_dim), masked) v, by PyTorch's fused kernel. A module of its own (with no
    weights) so that a device can swap in another form of the same attention (cpu_kernels.py)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        # Grouped-query attention: each K/V head serves n_heads // n_kv_heads query heads.
        # enable_gqa lets SDPA broadcast them instead of materialising repeated copies.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.rotary = RotaryEmbedding()
        self.sdpa = ScaledDotProductAttention()
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor, cache_row: int = 0) -> Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        q, k = self.rotary(q, rope), self.rotary(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        # attend over the cache slots the mask covers (Transformer.forward)
        k, v = self.kv_cache.update(input_pos, k, v, cache_row, slots=mask.shape[-1])
        y = self.sdpa(q, k, v, mask)
        y = y.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoEFeedForward(nn.Module):
    """A sparse mixture of SwiGLU experts (Jiang et al. 2024, "Mixtral of Experts", eq. 1-2): a router
    scores every expert for each token, the top k run, and their outputs are summed, weighted by the
    softmax of the k chosen scores. Each token runs k experts' worth of weights out of n."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = nn.Linear(args.dim, args.n_experts, bias=False)  # the router
        self.experts = Experts(args.n_experts, args.dim, args.intermediate_size)
        self.experts_per_token = args.experts_per_token

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        scores, chosen = self.gate(tokens).topk(self.experts_per_token, dim=-1)  # (tokens, k) each
        weights = scores.float().softmax(dim=-1).to(x.dtype)
        return self.experts(tokens, chosen, weights).reshape(x.shape)


class Experts(nn.Module):
    """n SwiGLU feed-forwards. Each projection of all n is one linear layer of n times the rows: w1 (gate)
    and w3 (up) have n * hidden rows of dim, w2 (down) n * dim rows of hidden, expert e's rows the e-th
    n-th. Being plain layers, they quantize, load and split across ranks as any layer does; run_experts
    multiplies by one expert's rows through `project` (which a device's form, cpu_kernels.CPUExperts, does
    its own way)."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Linear(dim, n_experts * hidden, bias=False)
        self.w3 = nn.Linear(dim, n_experts * hidden, bias=False)
        self.w2 = nn.Linear(hidden, n_experts * dim, bias=False)

    def weight(self, name: str, expert) -> Tensor:
        """Expert `expert`'s (out, in) weight of projection `name`. expert is an int, or a 0-d tensor (a
        compiled step's choice, kept in the graph). An int8 / int4 layer (quantize.py) gives it dequantized."""
        layer = getattr(self, name)
        out = layer.out_features // self.n_experts
        if not isinstance(layer, nn.Linear):
            return layer.rows(expert * out + torch.arange(out, device=layer.weight.device))
        weights = layer.weight.unflatten(0, (self.n_experts, out))
        return weights[expert] if isinstance(expert, int) else weights[expert.view(1)][0]

    def project(self, name: str, x: Tensor, expert) -> Tensor:
        """x (rows, in) times that weight, transposed: (rows, out)."""
        return F.linear(x, self.weight(name, expert).to(x.dtype))

    def forward(self, tokens: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
        return run_experts(self, tokens, chosen, weights)


def run_expert(experts: nn.Module, x: Tensor, expert) -> Tensor:
    """One expert's SwiGLU over the rows x."""
    return experts.project("w2", F.silu(experts.project("w1", x, expert)) * experts.project("w3", x, expert), expert)


def run_experts(experts: nn.Module, tokens: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
    """sum over j of weights[t, j] * expert chosen[t, j] (tokens[t]), for tokens (T, dim) and chosen,
    weights (T, k): each chosen expert runs once, over the tokens routed to it, so a step reads only the
    chosen experts' weights. Which experts were chosen is read on the host (.tolist()), which a compiled graph
    cannot do: a compiled step runs prepare.CompiledExperts instead."""
    out = torch.zeros_like(tokens)
    for expert in chosen.unique().tolist():
        rows, slot = torch.where(chosen == expert)
        out.index_add_(0, rows, run_expert(experts, tokens[rows], expert) * weights[rows, slot, None])
    return out


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoEFeedForward(args) if args.n_experts else FeedForward(args)

    # torch.compile traces and compiles one block and reuses the code for all n_layers, which cuts the
    # compile time several-fold (docs/experiments.md); eagerly it changes nothing.
    @torch.compiler.nested_compile_region
    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor, cache_row: int = 0) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos, cache_row)
        return h + self.feed_forward(self.ffn_norm(h))


@dataclass(frozen=True)
class ForwardOptions:
    """What a forward pass may take besides its tokens and their cache slots; each default is the plain pass
    (the batch in the cache's first rows, unpadded, causal, attending to every slot, every position's logits).
    cache_row: the batch's rows are the cache's rows from this one on (a server prefills one row's prompt while
    the others wait).
    left_pad: (batch,) padding slots at the start of each row, so that prompts of different lengths share a
    batch.
    attended_slots: attention reads only the cache's first attended_slots slots. The causal mask hides every
    slot past a token's own anyway, so any bound above input_pos gives the same logits; a caller that passes one
    makes attention cost follow the sequence, not the cache's size.
    positions (seq,) and mask (seq, max_seq_length), given together, replace the usual RoPE positions and causal
    mask: lookahead decoding (speculative.py) runs several guessed branches in one pass, each token seeing only
    the cache slots of its own branch.
    logits_from: the logits of the positions from this one on; -1 gives the last only, all that sampling the
    next token reads (the output head over every position of a prompt is a large share of its pass:
    docs/experiments.md)."""
    cache_row: int = 0
    left_pad: Optional[Tensor] = None
    attended_slots: Optional[int] = None
    positions: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    logits_from: int = 0


PLAIN = ForwardOptions()


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.kv_cache_type = KVCache  # what setup_caches allocates (quantized_kv_cache.py has others)
        self.allocated_kv_cache_type = None
        self.max_batch_size = self.max_seq_length = -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        """Allocate the KV cache and the RoPE table for batches up to max_batch_size rows and
        sequences (prompt + generated) up to max_seq_length tokens."""
        if (max_batch_size <= self.max_batch_size and max_seq_length == self.max_seq_length
                and self.allocated_kv_cache_type is self.kv_cache_type):
            return
        dtype, device = self.norm.weight.dtype, self.norm.weight.device  # the head may be quantized: ask the norm
        for layer in self.layers:  # a tensor-parallel rank (tp.py) caches only its own share of KV heads
            layer.attention.kv_cache = self.kv_cache_type(
                max_batch_size, max_seq_length, layer.attention.n_kv_heads, self.args.head_dim, dtype).to(device)
        # (length, 1, head_dim // 2, 2) in the model's dtype: indexed by positions, it broadcasts over heads as
        # it is, so a block's RoPE costs no reshaping or casting
        rope = rope_table(self.args, max_seq_length).unsqueeze(1)
        self.register_buffer("rope", rope.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("slots", torch.arange(max_seq_length, device=device), persistent=False)
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        self.allocated_kv_cache_type = self.kv_cache_type

    def forward(self, tokens: Tensor, input_pos: Tensor, options: ForwardOptions = PLAIN) -> Tensor:
        """tokens: (batch, seq) ids written at cache slots input_pos: (seq,), the same slots for every row, or
        (batch, seq), each row at its own (a server's rows, each a sequence of its own length); a token's
        cache slot is its position. Returns (batch, seq, vocab) logits (options.logits_from: fewer)."""
        if options.mask is None:
            rope, mask = self.rope_and_mask(input_pos, options.left_pad)
        else:
            rope, mask = self.rope[options.positions.unsqueeze(0)], options.mask[None, None]
        mask = mask[..., :options.attended_slots]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, rope, mask, input_pos, options.cache_row)
        return self.output(self.norm(x[:, options.logits_from:]))

    def rope_and_mask(self, input_pos: Tensor, left_pad: Optional[Tensor] = None):
        """What every block needs besides its input: the rotary cos/sin of each token's position and
        the attention mask over cache slots (causal, and blind to each row's left padding)."""
        positions = input_pos.view(-1, input_pos.shape[-1])  # (1 or batch, seq): each token's cache slot
        mask = (self.slots <= positions.unsqueeze(-1)).unsqueeze(1)  # causal: (1 or batch, 1, seq, max_seq_length)
        if left_pad is not None:
            real = self.slots.unsqueeze(0) >= left_pad.unsqueeze(1)  # (batch, max_seq_length)
            # a padding token attends to itself only, which keeps its (unused) output finite
            itself = self.slots == positions.unsqueeze(-1)
            mask = mask & (real[:, None, None, :] | itself.unsqueeze(1))
            positions = (positions - left_pad.unsqueeze(1)).clamp(min=0)  # RoPE counts from the first real token
        return self.rope[positions], mask


def block_layers(block: TransformerBlock) -> list:
    """(parent module, attribute name) of each layer of a block: its two norms, its attention's projections,
    rotation and attention itself, its feed-forward's projections. What quantize.py and the device kernel
    files replace."""
    return [(block, "attention_norm"), (block, "ffn_norm")] + [
        (parent, name) for parent in (block.attention, block.feed_forward) for name, _ in parent.named_children()]


class BiasAfter(nn.Module):
    """A layer's swapped-in form (which computes x times the weight only), then the layer's bias added."""

    def __init__(self, form: nn.Module, bias: Tensor):
        super().__init__()
        self.form = form
        self.register_buffer("bias", bias.detach())  # a named buffer, as --aot binds tensors by name

    def forward(self, x: Tensor) -> Tensor:
        return self.form(x) + self.bias


def swap_layers(model: Transformer, form) -> Transformer:
    """Replace every block's layers, and the final norm and output head, by form(layer) (form returns a layer
    as it is where it has nothing to swap in); a layer with a bias (Qwen2's q/k/v) keeps it, added after its
    form."""
    top = [(model, "norm"), (model, "output")]
    for parent, name in [slot for block in model.layers for slot in block_layers(block)] + top:
        layer = getattr(parent, name)
        swapped = form(layer)
        has_bias = swapped is not layer and getattr(layer, "bias", None) is not None
        setattr(parent, name, BiasAfter(swapped, layer.bias) if has_bias else swapped)
    return model
