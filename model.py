"""A Llama-family transformer for inference, with a static KV cache.

One forward pass, top to bottom:

    tokens -> embedding -> N x [ x + attention(norm(x)) ; x + feed_forward(norm(x)) ] -> norm -> output head

Everything here follows the Hugging Face `LlamaForCausalLM` layout (rotate-half RoPE, separate
q/k/v projections), so Hugging Face checkpoints load without permuting any weight.
"""
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # fewer than n_heads: grouped-query attention
    intermediate_size: int = 11008
    vocab_size: int = 32000
    head_dim: Optional[int] = None  # usually dim // n_heads; a few models set it explicitly
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama 3.1 style: factor, low/high_freq_factor, original length
    max_seq_length: int = 4096  # the longest context the model was trained for
    tie_embeddings: bool = False  # output head shares the token embedding (SmolLM2, Llama 3.2)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        by_lower_name = {known.lower(): known for known in KNOWN_MODELS}
        if name.lower() not in by_lower_name:
            raise ValueError(f"unknown model name {name!r}; known names: {', '.join(KNOWN_MODELS)}")
        return cls(**KNOWN_MODELS[by_lower_name[name.lower()]])

    @classmethod
    def from_hf_config(cls, config) -> "ModelArgs":
        """Read a Hugging Face Llama-like config.json (a path or an already-parsed dict)."""
        if not isinstance(config, dict):
            config = json.loads(Path(config).read_text())
        # transformers 5 writes "rope_parameters" (with rope_theta inside); earlier versions "rope_scaling"
        rope_scaling = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_base = rope_scaling.get("rope_theta", config.get("rope_theta", 10000.0))
        kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if kind not in ("llama3", "default"):
            raise ValueError(f"rope scaling type {kind!r} is not supported (only 'llama3')")
        rope_scaling = {key: value for key, value in rope_scaling.items() if key != "rope_theta"}
        return cls(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads"),
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            head_dim=config.get("head_dim"),
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_base=rope_base,
            rope_scaling=rope_scaling if kind == "llama3" else None,
            max_seq_length=config.get("max_position_embeddings", 4096),
            tie_embeddings=config.get("tie_word_embeddings", False),
        )

    def to_hf_config(self) -> dict:
        """The config.json written beside every converted checkpoint, readable by from_hf_config."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_base,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_seq_length,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
        }


_LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
_LLAMA32_ROPE = dict(_LLAMA31_ROPE, factor=32.0)
_LLAMA3 = dict(vocab_size=128256, rope_base=500000.0, max_seq_length=8192)
_LLAMA31 = dict(_LLAMA3, rope_scaling=_LLAMA31_ROPE, max_seq_length=131072)
_SMOLLM2 = dict(vocab_size=49152, rope_base=100000.0, max_seq_length=8192, tie_embeddings=True)

# Shapes of well-known checkpoints, for benchmarks and random-weight runs. Converted checkpoints
# carry their own config.json, which is what loading uses.
KNOWN_MODELS = {
    "Llama-2-7B": dict(dim=4096, n_layers=32, n_heads=32, intermediate_size=11008),
    "Llama-2-13B": dict(dim=5120, n_layers=40, n_heads=40, intermediate_size=13824),
    "Llama-2-70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672),
    "CodeLlama-7B": dict(dim=4096, n_layers=32, n_heads=32, intermediate_size=11008, vocab_size=32016,
                         rope_base=1e6, max_seq_length=16384),
    "CodeLlama-34B": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, intermediate_size=22016,
                          rope_base=1e6, max_seq_length=16384),
    # v0.1; its 4096-token sliding window is not modelled (later versions come with their config.json)
    "Mistral-7B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                       max_seq_length=32768),
    "TinyLlama-1.1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, intermediate_size=5632,
                           max_seq_length=2048),
    "Llama-3-8B": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336),
    "Llama-3-70B": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672),
    "Llama-3.1-8B": dict(_LLAMA31, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336),
    "Llama-3.1-70B": dict(_LLAMA31, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672),
    "Llama-3.1-405B": dict(_LLAMA31, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                           intermediate_size=53248),
    "Llama-3.2-1B": dict(_LLAMA31, rope_scaling=_LLAMA32_ROPE, tie_embeddings=True, dim=2048, n_layers=16,
                         n_heads=32, n_kv_heads=8, intermediate_size=8192),
    "Llama-3.2-3B": dict(_LLAMA31, rope_scaling=_LLAMA32_ROPE, tie_embeddings=True, dim=3072, n_layers=28,
                         n_heads=24, n_kv_heads=8, intermediate_size=8192),
    "SmolLM2-135M": dict(_SMOLLM2, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536),
    "SmolLM2-360M": dict(_SMOLLM2, dim=960, n_layers=32, n_heads=15, n_kv_heads=5, intermediate_size=2560),
    "SmolLM2-1.7B": dict(_SMOLLM2, rope_base=130000.0, dim=2048, n_layers=24, n_heads=32,
                         intermediate_size=8192),
    "stories15M": dict(dim=288, n_layers=6, n_heads=6, intermediate_size=768, max_seq_length=256),
    "stories42M": dict(dim=512, n_layers=8, n_heads=8, intermediate_size=1376, max_seq_length=1024),
    "stories110M": dict(dim=768, n_layers=12, n_heads=12, intermediate_size=2048, max_seq_length=1024),
}


class KVCache(nn.Module):
    """Keys and values of every position seen so far, pre-allocated so shapes never change
    (which is what lets torch.compile and CUDA graphs capture the decode step once)."""

    def __init__(self, max_batch_size, max_seq_length, n_kv_heads, head_dim, dtype):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor):
        # k, v: (batch, n_kv_heads, seq, head_dim), written at cache slots input_pos
        batch = k.shape[0]
        self.k_cache[:batch].index_copy_(2, input_pos, k)
        self.v_cache[:batch].index_copy_(2, input_pos, v)
        return self.k_cache[:batch], self.v_cache[:batch]


# Decoding reads every weight once per token. On the CPU, PyTorch's matmuls for one row first convert a
# bf16 weight to fp32 (without AVX512-BF16) and run int8 / int4 kernels tuned for other shapes. Written as
# a multiply-and-sum instead, under torch.compile, each layer becomes one vectorized Inductor loop that
# reads the weight once in its stored type and widens it in registers. Measured on 2 Xeon cores (torch
# 2.13, SmolLM2-135M, compiled decode): bf16 21 -> 28 tokens/s, int8 9.5 -> 45, int4 3.6 -> 30; batch 8:
# bf16 40 -> 64, int8 53 -> 94; batch 16: bf16 49 -> 81, int8 63 -> 95; from 32 rows the matmul wins. Eager
# PyTorch would materialise the whole (rows, out, in) product; fp32 is left to MKL's GEMV (twice as fast).
FUSED_DECODE_MAX_ROWS = 16


def few_rows(x: Tensor) -> bool:
    return x.numel() <= FUSED_DECODE_MAX_ROWS * x.shape[-1]


def fused_cpu_decode(x: Tensor) -> bool:
    """Whether x (..., features) is a few rows of a compiled CPU step, which layers compute as fused
    loops (matvec(), decode_attention()) instead of library calls."""
    return torch.compiler.is_compiling() and x.device.type == "cpu" and few_rows(x)


def matvec(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., in) times weight (out, in), transposed, as a sum of products in fp32: (..., out)."""
    rows = x.reshape(-1, 1, x.shape[-1]).float()
    return (rows * weight).sum(-1).reshape(*x.shape[:-1], weight.shape[0])


# Without AVX512-BF16 or AMX, oneDNN emulates bf16 arithmetic: its bf16 GEMM over many rows (prefill) runs
# at well under half the speed of fp32. Widening the weight first costs one pass over it, shared by every
# row: SmolLM2 bf16 prefill of 512 tokens, 150 -> 350 tokens/s on 2 Xeon cores.
CPU_HAS_BF16_ARITHMETIC = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


class Linear(nn.Linear):
    """nn.Linear (no bias); for half-precision weights on the CPU, the fused decode matvec (see above), and
    fp32 arithmetic for many rows where the CPU has no bf16 arithmetic."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.dtype == torch.float32 or x.device.type != "cpu":
            return F.linear(x, self.weight)
        if fused_cpu_decode(x):
            return matvec(x, self.weight).to(x.dtype)
        if not CPU_HAS_BF16_ARITHMETIC and not few_rows(x):
            return F.linear(x.float(), self.weight.float()).to(x.dtype)
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32 for accuracy, then scale in the model's dtype (as Llama does)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(x)


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
    # x: (batch, seq, heads, head_dim); rope: (batch, seq, head_dim // 2, 2).
    # The rotate-half convention: dimension i is paired with dimension i + head_dim // 2.
    cos = rope[..., 0].unsqueeze(2).to(x.dtype)
    sin = rope[..., 1].unsqueeze(2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# PyTorch's CPU attention kernel is built for long query blocks: for one query row it reads a bf16 KV
# cache at under 1 GB/s (fp32 at about 3). As sums of products, under torch.compile, the same attention
# becomes a few fused loops over the cache. Measured on 2 Xeon cores (torch 2.13, SmolLM2-135M, compiled
# bf16 decode): 31 -> 42 tokens/s with 300 cache slots, 2.9 -> 6.7 tokens/s with 8192.
def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(head_dim), masked) v in fp32, for a few query rows. q: (batch, heads, seq,
    head_dim); k, v: (batch, kv heads, cache slots, head_dim); mask: (batch or 1, 1, seq, cache slots)."""
    batch, n_heads, seq, head_dim = q.shape
    n_kv_heads = k.shape[1]
    # each K/V head serves a group of query heads: q (batch, kv heads, group, seq, 1, head_dim)
    q = q.view(batch, n_kv_heads, n_heads // n_kv_heads, seq, 1, head_dim).float()
    k = k.view(batch, n_kv_heads, 1, 1, -1, head_dim)
    v = v.view(batch, n_kv_heads, 1, 1, -1, head_dim)
    scores = (q * k).sum(-1) / math.sqrt(head_dim)  # (batch, kv heads, group, seq, cache slots)
    weights = torch.softmax(scores.masked_fill(~mask.unsqueeze(2), -float("inf")), dim=-1)
    y = (weights.unsqueeze(-1) * v).sum(-2)  # (batch, kv heads, group, seq, head_dim)
    return y.view(batch, n_heads, seq, head_dim).to(v.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        k, v = self.kv_cache.update(input_pos, k, v)
        if fused_cpu_decode(x):
            y = decode_attention(q, k, v, mask)
        else:
            # Grouped-query attention: each K/V head serves n_heads // n_kv_heads query heads.
            # enable_gqa lets SDPA broadcast them instead of materialising repeated copies.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads)
        y = y.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.intermediate_size)  # gate
        self.w3 = Linear(args.dim, args.intermediate_size)  # up
        self.w2 = Linear(args.intermediate_size, args.dim)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    # torch.compile traces and compiles one block and reuses the code for all n_layers (eagerly, a no-op).
    # SmolLM2-135M on 2 Xeon cores, compiled decode: cold compile 161 -> 30 s, from the cache 16 -> 8 s;
    # decode speed within 10% (bf16 5-10% slower, int8 the same).
    @torch.compiler.nested_compile_region
    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = self.max_seq_length = -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        """Allocate the KV cache and the RoPE table for batches up to max_batch_size rows and
        sequences (prompt + generated) up to max_seq_length tokens."""
        if max_batch_size <= self.max_batch_size and max_seq_length == self.max_seq_length:
            return
        dtype, device = self.norm.weight.dtype, self.norm.weight.device  # the head may be quantized: ask the norm
        for layer in self.layers:  # a tensor-parallel rank (tp.py) caches only its own share of KV heads
            layer.attention.kv_cache = KVCache(
                max_batch_size, max_seq_length, layer.attention.n_kv_heads, self.args.head_dim, dtype).to(device)
        self.register_buffer("rope", rope_table(self.args, max_seq_length).to(device), persistent=False)
        self.register_buffer("slots", torch.arange(max_seq_length, device=device), persistent=False)
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length

    def forward(self, tokens: Tensor, input_pos: Tensor, left_pad: Optional[Tensor] = None,
                positions: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        """tokens: (batch, seq) ids written at cache slots input_pos (seq,).
        left_pad: (batch,) count of padding slots at the start of each row, so that prompts of
        different lengths share one batch; None when no row is padded. Returns (batch, seq, vocab) logits.
        positions (seq,) and mask (seq, max_seq_length), given together, replace the usual RoPE positions
        and causal mask: lookahead decoding (speculative.py) runs several guessed branches in one pass,
        each token seeing only the cache slots of its own branch."""
        if mask is None:
            rope, mask = self.rope_and_mask(input_pos, left_pad)
        else:
            rope, mask = self.rope[positions.unsqueeze(0)], mask[None, None]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, rope, mask, input_pos)
        return self.output(self.norm(x))

    def rope_and_mask(self, input_pos: Tensor, left_pad: Optional[Tensor] = None):
        """What every block needs besides its input: the rotary cos/sin of each token's position and
        the attention mask over cache slots (causal, and blind to each row's left padding)."""
        causal = self.slots.unsqueeze(0) <= input_pos.unsqueeze(1)  # (seq, max_seq_length)
        mask = causal[None, None]
        positions = input_pos.unsqueeze(0)  # (1, seq): RoPE position of each token
        if left_pad is not None:
            positions = (positions - left_pad.unsqueeze(1)).clamp(min=0)
            real = self.slots.unsqueeze(0) >= left_pad.unsqueeze(1)  # (batch, max_seq_length)
            # a padding token attends to itself only, which keeps its (unused) output finite
            itself = self.slots.unsqueeze(0) == input_pos.unsqueeze(1)  # (seq, max_seq_length)
            mask = mask & (real[:, None, None, :] | itself[None, None])
        return self.rope[positions], mask


def unique_state_dict(model: nn.Module) -> dict:
    """The model's weights, each shared tensor (tied embedding and output head) once, under its first name."""
    seen, unique = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique[name] = tensor
    return unique


def checkpoint_files(checkpoint_path):
    """The weights file and the model shape of a converted checkpoint: checkpoint_path is a checkpoint
    directory or a .safetensors file inside one, with the config.json beside it."""
    path = Path(checkpoint_path)
    weights_file = path / "model.safetensors" if path.is_dir() else path
    config_file = weights_file.parent / "config.json"
    if not weights_file.is_file():
        raise FileNotFoundError(f"no checkpoint at {weights_file}: convert one first (see README, scripts/)")
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json beside {weights_file}: convert the checkpoint with scripts/")
    return weights_file, ModelArgs.from_hf_config(config_file)


def empty_model(args: ModelArgs, tensors: dict, metadata: dict, weights_file) -> Transformer:
    """The model on the meta device (no memory, no random init), with the layer types of the file's
    tensors (int8 / int4 layers where quantize.py wrote them), checked against the file's tensor names."""
    with torch.device("meta"):
        model = Transformer(args)
        if "quantization" in metadata:
            from quantize import match_checkpoint

            match_checkpoint(model, tensors, metadata, weights_file)
    names = set(tensors) - ({"output.weight"} if args.tie_embeddings else set())
    expected = set(unique_state_dict(model))
    if names != expected:
        missing, unexpected = sorted(expected - names), sorted(names - expected)
        raise ValueError(f"{weights_file} does not match its config.json (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}): re-convert the checkpoint")
    return model


def load_model(checkpoint_path, device="cpu", dtype=torch.float32, shard=None) -> Transformer:
    """Build the model on the meta device and assign the tensors of a memory-mapped safetensors file
    into it, so the weights are held in RAM only once. shard(model, tensors) -> tensors, given by tp.py,
    resizes the empty model to one rank's share and slices the tensors to match, before any byte of the
    file is read (the mapped pages of the other ranks' shares are never touched)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights_file, args = checkpoint_files(checkpoint_path)
    try:
        with safe_open(weights_file, framework="pt") as file:
            metadata = file.metadata() or {}
        state_dict = load_file(weights_file, device="cpu")
    except Exception as error:
        raise ValueError(f"cannot read {weights_file} as safetensors ({error}): re-convert the checkpoint") from None
    model = empty_model(args, state_dict, metadata, weights_file)
    if args.tie_embeddings:
        state_dict.pop("output.weight", None)
    if shard is not None:
        state_dict = shard(model, state_dict)
    # integer weights keep their type; floating ones (scales included) take the compute dtype
    state_dict = {name: tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
                  for name, tensor in state_dict.items()}
    model.load_state_dict(state_dict, assign=True, strict=False)
    if args.tie_embeddings and isinstance(model.output, nn.Linear):
        model.output.weight = model.tok_embeddings.weight
    if "quantization" in metadata:
        from quantize import prepare_kernels

        prepare_kernels(model)
    return model.eval()


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}


def save_safetensors(path, shapes: dict, tensors, metadata: Optional[dict] = None):
    """Write a safetensors file one tensor at a time, so a checkpoint larger than RAM can be written.
    shapes: name -> (shape, dtype), in file order; tensors: yields (name, tensor) in that same order.
    The file appears under its final name only once complete."""
    header, offset = {}, 0
    for name, (shape, dtype) in shapes.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {key: str(value) for key, value in metadata.items()}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep tensor data 8-byte aligned
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(len(header_bytes).to_bytes(8, "little"))
        file.write(header_bytes)
        for name, tensor in tensors:
            shape, dtype = shapes[name]
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(shape)} {dtype}")
            file.write(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    os.replace(temporary, path)


def save_config(args: ModelArgs, directory):
    temporary = Path(directory) / "config.json.tmp"
    temporary.write_text(json.dumps(args.to_hf_config(), indent=2))
    os.replace(temporary, Path(directory) / "config.json")
