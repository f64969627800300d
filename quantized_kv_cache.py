"""KV caches that store keys and values quantized as they are written, and dequantize them for attention
(FlexGen, Sheng et al. 2023, section 5: group-wise quantization of the attention cache). The cache, not the
weights, is what grows with context and batch: SmolLM2-135M's fp32 cache is 94 MB per sequence at 8192
tokens, more than its int4 weights. In the model's dtype, then, per head and slot (head_dim values):

- int8: symmetric, one scale per head and slot: x = q * scale, q in [-127, 127], scale = absmax / 127.
  A little over a quarter of fp32's bytes, half of bf16's.
- int4: asymmetric, one scale and minimum per group of 64 values along the head dimension (the whole head
  when it is not a multiple of 64): x = q * scale + min, q in [0, 15], scale = (max - min) / 15 (FlexGen's
  min/max groups). Two values a byte, packed as the int4 weights are (quantized_layers.py).
- int4-g32, int4-g16: the same in groups of 32 or 16. Keys have a few channels far larger than the rest,
  and a group that holds one rounds the others coarsely, so smaller groups keep more of the model's quality
  (SmolLM2's perplexity by groupsize: docs/quantization.md).

Each is a drop-in for model.KVCache, chosen with `use(model, "int8")` before the caches are set up;
`--kv_cache` on the command lines. Attention then reads the dequantized rows and slots it attends to:
eagerly as one tensor per layer, and in a compiled decode step fused into the attention loop, which reads
the quantized bytes (cpu_kernels.decode_attention).
"""
from functools import partial

import torch
import torch.nn as nn
from torch import Tensor

from model import KVCache, Transformer, write_slots
from quantized_layers import pack_int4, unpack_int4


class Int8KVCache(nn.Module):
    """Keys and values in int8, with a scale per (row, head, slot) in the model's dtype."""

    def __init__(self, max_batch_size, max_seq_length, n_kv_heads, head_dim, dtype):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_length)
        for name in ("k", "v"):
            self.register_buffer(f"{name}_cache", torch.zeros(*shape, head_dim, dtype=torch.int8), persistent=False)
            self.register_buffer(f"{name}_scales", torch.zeros(*shape, 1, dtype=dtype), persistent=False)

    @staticmethod
    def quantize(x: Tensor):
        """x (..., head_dim) -> int8 values and scales (..., 1), the scales rounded to x's dtype first so
        that the values are rounded against the scales that will be read back."""
        scales = (x.float().abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-10).to(x.dtype)
        return torch.round(x.float() / scales.float()).clamp(-127, 127).to(torch.int8), scales

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, cache_row: int = 0, slots=None):
        """As model.KVCache.update: write k, v; return the batch's rows, first `slots` slots, dequantized."""
        rows = slice(cache_row, cache_row + k.shape[0])
        read = []
        for name, x in (("k", k), ("v", v)):
            values, scales = self.quantize(x)
            write_slots(getattr(self, f"{name}_cache"), input_pos, values, cache_row)
            write_slots(getattr(self, f"{name}_scales"), input_pos, scales, cache_row)
            stored, stored_scales = getattr(self, f"{name}_cache")[rows, :, :slots], getattr(self, f"{name}_scales")
            read.append(stored.to(x.dtype) * stored_scales[rows, :, :slots])
        return tuple(read)


class Int4KVCache(nn.Module):
    """Keys and values in int4, packed two a byte, with a scale and a minimum per (row, head, slot, group of
    `groupsize` values along the head dimension; the whole head where it is not a multiple) in the model's
    dtype."""

    def __init__(self, max_batch_size, max_seq_length, n_kv_heads, head_dim, dtype, groupsize: int = 64):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"an int4 KV cache packs two values a byte: head_dim {head_dim} is odd")
        self.head_dim, self.groupsize = head_dim, groupsize if head_dim % groupsize == 0 else head_dim
        shape, groups = (max_batch_size, n_kv_heads, max_seq_length), head_dim // self.groupsize
        for name in ("k", "v"):
            self.register_buffer(f"{name}_cache", torch.zeros(*shape, head_dim // 2, dtype=torch.uint8),
                                 persistent=False)
            self.register_buffer(f"{name}_scales", torch.zeros(*shape, groups, dtype=dtype), persistent=False)
            self.register_buffer(f"{name}_mins", torch.zeros(*shape, groups, dtype=dtype), persistent=False)

    def quantize(self, x: Tensor):
        """x (..., head_dim) -> packed values (..., head_dim / 2), scales and minimums (..., groups), the
        latter two rounded to x's dtype before the values are rounded against them."""
        groups = x.float().unflatten(-1, (-1, self.groupsize))
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scales, mins = ((high - low) / 15).clamp(min=1e-10).to(x.dtype), low.to(x.dtype)
        values = torch.round((groups - mins.float()[..., None]) / scales.float()[..., None]).clamp(0, 15)
        packed = pack_int4(values.to(torch.uint8).reshape(-1, self.head_dim), self.groupsize)
        return packed.reshape(*x.shape[:-1], self.head_dim // 2), scales, mins

    def dequantized(self, packed: Tensor, scales: Tensor, mins: Tensor, dtype: torch.dtype) -> Tensor:
        values = unpack_int4(packed.reshape(-1, self.head_dim // 2), self.groupsize)
        groups = values.reshape(*packed.shape[:-1], -1, self.groupsize).to(dtype)
        return (groups * scales[..., None] + mins[..., None]).flatten(-2)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, cache_row: int = 0, slots=None):
        """As model.KVCache.update: write k, v; return the batch's rows, first `slots` slots, dequantized."""
        rows = slice(cache_row, cache_row + k.shape[0])
        read = []
        for name, x in (("k", k), ("v", v)):
            buffers = [getattr(self, f"{name}_{part}") for part in ("cache", "scales", "mins")]
            for buffer, part in zip(buffers, self.quantize(x)):
                write_slots(buffer, input_pos, part, cache_row)
            read.append(self.dequantized(*(buffer[rows, :, :slots] for buffer in buffers), x.dtype))
        return tuple(read)


KV_CACHE_TYPES = {"float": KVCache, "int8": Int8KVCache, "int4": Int4KVCache,
                  "int4-g32": partial(Int4KVCache, groupsize=32), "int4-g16": partial(Int4KVCache, groupsize=16)}


def use(model: Transformer, kind: str) -> Transformer:
    """Have model's caches store keys and values as `kind` (a name of KV_CACHE_TYPES; "float": the model's
    dtype) from its next setup_caches on."""
    model.kv_cache_type = KV_CACHE_TYPES[kind]
    return model

