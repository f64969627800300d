"""Faster forms of brisk's layers on a CPU, swapped in after loading (`swap_in`) in place of the plain
layers of model.py and quantized_layers.py. Each reproduces the outputs of the plain module it replaces
(tests/test_cpu_kernels.py) and, except the quantized layers below, holds it as `.layer`. The measurements
behind each choice are in docs/cpu_kernels.md.

- int4 and int8 layers call brisk's own kernels, torch.ops.brisk.int4_linear and int8_linear
  (cpu_kernels.cpp): the activations rounded to int8 in blocks of 32 and multiplied in integers, as
  llama.cpp does, eagerly, compiled and in an AOT package alike, for any number of rows. They take fp32
  activations (other dtypes are widened for the call), so a quantized checkpoint runs in fp32 on every CPU
  (prepare.activation_dtype). Their weight is reordered once, at load, into the order the kernel streams it, and the
  plain copy is let go (QuantizedCPULinear). The kernels are built once into torch's extensions cache
  (scripts/setup.sh does it); where they cannot be built or run (no compiler, not an x86 CPU with AVX2),
  one line on stderr says so and the plain layers compute.
- Float layers (fp32, bf16, fp16) over a few rows call brisk's float kernel, torch.ops.brisk.float_linear,
  which reads each weight as stored and widens it to fp32 in registers: a decode step streams the weights
  at memory speed, where MKL's one-row GEMV, on AMD CPUs, falls well short of it (docs/cpu_kernels.md). Over
  many rows (prefill), the library's GEMM. Without the kernels, a compiled step writes a float layer as a
  multiply-and-sum, which Inductor turns into one vectorized loop per layer; attention over the KV cache in
  a compiled step likewise becomes sums of products that Inductor fuses with the rest of the block. Eagerly,
  PyTorch would materialise the whole (rows, out, in) product, so these forms are used only while compiling.
- Eagerly, a decode step's norms, rotary embeddings and attention over a few query rows each call one of
  brisk's ops (torch.ops.brisk.rms_norm, rope, attention) where PyTorch runs several ops apiece, each paying
  a dispatch; a step being compiled keeps the plain forms, which Inductor fuses with their neighbours.
- Layers applied to many rows (prefill) of bf16 activations, on a CPU without bf16 arithmetic, compute in
  fp32 (`widened`), bf16 and quantized weights alike: there oneDNN emulates bf16 and its GEMM runs well
  below fp32 speed. Attention in bf16 runs in fp32 there too, eagerly: PyTorch's fused kernel emulates bf16
  as well.
- NF4 layers (a table lookup, which no int4 kernel takes) dequantize, then multiply; in a compiled step over
  a few rows, a fused loop computes each weight's NF4 value from its code's bits (NF4CPULinear).
- A mixture's experts (model.Experts: each projection one layer holding n experts' rows) multiply by one
  expert's rows at a time: through brisk's kernel over that expert's rows of a quantized projection, or in
  a compiled step through the fused loop over that expert's float weight (CPUExperts).
"""
import functools
import math
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils import cpp_extension

from model import (Experts, RMSNorm, RotaryEmbedding, ScaledDotProductAttention, Transformer, apply_rope,
                   rms_norm, run_experts, swap_layers)
from quantized_layers import NF4_TABLE, Int4Linear, Int8Linear, NF4Linear

# Up to this many rows (batch x new tokens) a layer is decoding: float layers call brisk's float kernel (or,
# without it, a compiled step's fused loops); over more, the library's GEMM (docs/cpu_kernels.md).
FUSED_MAX_ROWS = 16

CPU_HAS_BF16_ARITHMETIC = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
KERNEL_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")


@functools.cache
def native_kernels() -> bool:
    """Whether brisk's kernels (torch.ops.brisk, from cpu_kernels.cpp) are loaded. They are built into torch's
    extensions cache the first time (about half a minute; scripts/setup.sh does it, and a changed source is
    built again) and loaded in milliseconds after that. Where they cannot be, or BRISK_CPU_KERNELS=off asks for
    the plain layers' exact products, one line on stderr says why."""
    if os.environ.get("BRISK_CPU_KERNELS", "").lower() == "off":
        reason = "BRISK_CPU_KERNELS=off"
    elif platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        reason = f"this CPU ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()}) is not x86 with AVX2"
    else:
        try:
            cpp_extension.load(name="brisk_cpu_kernels", sources=[str(KERNEL_SOURCE)], is_python_module=False,
                               extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                               extra_ldflags=["-fopenmp"])
            return True
        except Exception as error:  # no compiler, a failed build: brisk still runs, more slowly
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    print(f"brisk: not using the CPU kernels (cpu_kernels.cpp): {reason}; quantized layers dequantize, then "
          "multiply (slower)", file=sys.stderr)
    return False


def widened(x: Tensor) -> Tensor:
    """x in fp32 on a CPU without bf16 arithmetic, for a layer over many rows or attention: there oneDNN and
    PyTorch's attention kernel emulate bf16, well below fp32 speed (docs/experiments.md). x itself otherwise
    (and wherever it is fp32 already)."""
    return x if CPU_HAS_BF16_ARITHMETIC else x.float()


def rows_of(x: Tensor) -> int:
    return x.numel() // x.shape[-1]


def fused(x: Tensor) -> bool:
    """Whether x (..., features) is a few rows of a step being compiled: then float layers are written as the
    sums Inductor fuses into loops, instead of library calls."""
    return torch.compiler.is_compiling() and rows_of(x) <= FUSED_MAX_ROWS


def matvec(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., in) times weight (out, in), transposed, as a sum of products in fp32: (..., out)."""
    rows = x.reshape(-1, 1, x.shape[-1]).float()
    return (rows * weight).sum(-1).reshape(*x.shape[:-1], weight.shape[0])


class FloatLinear(nn.Module):
    """A float nn.Linear on the CPU (fp32, bf16 or fp16 weights). Over a few rows (decoding), brisk's float
    kernel (torch.ops.brisk.float_linear) reads the weight as stored and widens it in registers, eagerly and
    compiled alike; without the kernels, a compiled step's fused loop does, and eagerly the library's GEMV.
    Over many rows, the library's GEMM, in fp32 where the CPU has no bf16 arithmetic."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.layer = layer
        self.kernel = native_kernels()

    def forward(self, x: Tensor) -> Tensor:
        weight = self.layer.weight
        if rows_of(x) <= FUSED_MAX_ROWS:
            if self.kernel:
                return torch.ops.brisk.float_linear(x.float().contiguous(), weight).to(x.dtype)
            if fused(x):
                return matvec(x, weight).to(x.dtype)
            return F.linear(x, weight)
        wide = widened(x)
        return F.linear(wide, weight.to(wide.dtype)).to(x.dtype)


def kernel_takes(layer: nn.Module) -> bool:
    """Whether brisk's kernels are loaded and take this layer: int4 in groups of 32 or a multiple of 64, int8
    rows and groups in whole blocks of 32."""
    int4 = isinstance(layer, Int4Linear) and (layer.groupsize == 32 or layer.groupsize % 64 == 0)
    int8 = isinstance(layer, Int8Linear) and layer.in_features % 32 == 0 and layer.groupsize % 32 == 0
    return (int4 or int8) and native_kernels()


def in_panels(per_row: Tensor, n_experts: int) -> Tensor:
    """Values per weight row (out, ...) as (panels, 8, ...): rows 8p .. 8p + 7 together, the rows of each of
    n_experts experts (one after another in a mixture's projection) padded with zeros to whole panels."""
    rows = per_row.shape[0] // n_experts
    flat = F.pad(per_row.reshape(n_experts, rows, -1), (0, 0, 0, -rows % 8))
    return flat.reshape(-1, 8, *per_row.shape[1:])


def kernel_weight(layer: nn.Module, n_experts: int = 1) -> Tensor:
    """An int4 or int8 layer's weight bytes in the order brisk's kernel streams them: panels of 8 rows, and
    within a panel, each 16 bytes of a row as 4 pieces of 4 bytes, each beside the same piece of the other 7
    rows (one register, a row a lane: cpu_kernels.cpp, Step 3). (panels, row_bytes / 16, 4, 8, 4)."""
    weight = in_panels(layer.weight, n_experts)  # (panels, 8, row_bytes)
    panels, _, row_bytes = weight.shape
    return weight.reshape(panels, 8, row_bytes // 16, 4, 4).permute(0, 2, 3, 1, 4).contiguous()


def kernel_scales(layer: nn.Module, n_experts: int = 1) -> Tensor:
    """The scales brisk's kernel reads, fp16, the 8 rows of a panel side by side: for int4 (panels, groups,
    2, 8), each group's 8 scales, then its 8 mins (w = q * scale + min, min = zero - 8 * scale); for int8
    (panels, groups, 8), one group per row where it has a scale per output channel. fp16 holds GGUF's Q4_0 /
    Q4_1 / Q8_0 scales exactly, as their blocks store them in fp16."""
    if isinstance(layer, Int4Linear):
        scales, zeros = layer.scales.float(), layer.zeros.float()
        panels = in_panels(torch.stack([scales, zeros - 8 * scales], dim=-1), n_experts)  # (panels, 8, groups, 2)
        return panels.permute(0, 2, 3, 1).half().contiguous()
    panels = in_panels(layer.scales.reshape(layer.out_features, -1).float(), n_experts)  # (panels, 8, groups)
    return panels.transpose(1, 2).half().contiguous()


def expert_share(tensor: Tensor, expert, n_experts: int) -> Tensor:
    """One expert's part of a tensor holding n_experts' parts one after another: a slice for an int expert, a
    gather for a 0-d tensor (the expert a compiled step chose)."""
    size = tensor.shape[0] // n_experts
    if isinstance(expert, int):
        return tensor[expert * size:(expert + 1) * size]
    return tensor[expert * size + torch.arange(size, device=tensor.device)]


class QuantizedCPULinear(nn.Module):
    """An int4 or int8 layer that brisk's kernel takes (kernel_takes), on the CPU: its weight in the kernel's
    order (kernel_weight) and its scales (kernel_scales), buffers that an AOT package (aot_step.py) reads by
    name where they are. The plain layer is not kept, so the weight takes its memory once (a tied output
    head's plain weight stays with the embedding, which looks its rows up). The kernel takes any number of
    rows: over many it still beats dequantizing and multiplying (docs/cpu_kernels.md). With n_experts, the
    layer holds that many experts' rows one after another (model.Experts), multiplied an expert at a time."""

    def __init__(self, layer: nn.Module, n_experts: int = 1):
        super().__init__()
        self.in_features, self.out_features, self.n_experts = layer.in_features, layer.out_features, n_experts
        self.int4 = isinstance(layer, Int4Linear)
        self.groupsize = layer.groupsize if self.int4 else layer.groupsize or layer.in_features
        self.register_buffer("kernel_weight", kernel_weight(layer, n_experts))
        self.register_buffer("kernel_scales", kernel_scales(layer, n_experts))

    def forward(self, x: Tensor, expert=None) -> Tensor:
        """x (..., in) times the weight (with expert, that expert's rows), transposed: computed in fp32, out in
        x's dtype. The kernel pads an int4 layer's inputs to whole groups itself."""
        weight, scales, out_features = self.kernel_weight, self.kernel_scales, self.out_features
        if expert is not None:
            weight, scales = expert_share(weight, expert, self.n_experts), expert_share(scales, expert, self.n_experts)
            out_features //= self.n_experts
        op = torch.ops.brisk.int4_linear if self.int4 else torch.ops.brisk.int8_linear
        return op(x.float().contiguous(), weight, scales, self.groupsize, out_features).to(x.dtype)


# Over many rows, a quantized weight is dequantized this many rows at a time: each block stays in the cache
# between dequantizing and matmul, instead of a whole fp32 weight (113 MB for SmolLM2's output head) going
# out to memory and back.
WIDEN_BLOCK_ROWS = 1024


def blockwise_outputs(layer: nn.Module, x: Tensor) -> Tensor:
    """The plain quantized layer's product (dequantize, then matmul), WIDEN_BLOCK_ROWS weight rows at a time,
    in fp32 where the CPU has no bf16 arithmetic."""
    wide = widened(x)
    if layer.out_features <= WIDEN_BLOCK_ROWS:
        return layer.outputs(wide).to(x.dtype)
    return torch.cat([layer.outputs(wide, slice(start, start + WIDEN_BLOCK_ROWS))
                      for start in range(0, layer.out_features, WIDEN_BLOCK_ROWS)], dim=-1).to(x.dtype)


def multilinear_coefficients(table: Tensor) -> list:
    """The coefficients c_S of f(q) = table[q] as a polynomial in the 4 bits b_i of q, linear in each:
    f = sum over bit sets S of c_S * prod_{i in S} b_i. The Moebius transform of the table over the subsets of
    {0, 1, 2, 3}: c_S = sum over T within S of (-1)^|S - T| table[T] (computed in float64)."""
    coefficients = table.double().clone()
    for bit in range(4):
        for code in range(16):
            if code >> bit & 1:
                coefficients[code] -= coefficients[code ^ (1 << bit)]
    return coefficients.tolist()


def multilinear(coefficients: list, bits: list) -> Tensor:
    """sum_S c_S prod_{i in S} b_i by Horner's rule on the highest bit: f = f_low + b_top * f_high, 15
    multiply-adds."""
    if len(coefficients) == 1:
        return coefficients[0]
    half = len(coefficients) // 2
    return multilinear(coefficients[:half], bits[:-1]) + bits[-1] * multilinear(coefficients[half:], bits[:-1])


NF4_COEFFICIENTS = multilinear_coefficients(NF4_TABLE)


def nf4_values(codes: Tensor) -> Tensor:
    """NF4_TABLE[codes] in fp32, computed from the codes' bits (equal to the table up to fp32 rounding)."""
    return multilinear(NF4_COEFFICIENTS, [((codes >> bit) & 1).float() for bit in range(4)])


class NF4CPULinear(nn.Module):
    """An NF4Linear on the CPU. In a compiled step over a few rows, the fused loop over the packed codes, each
    code's NF4 value computed from its four bits as a polynomial (nf4_values) in vector registers, scaled by
    its group's absmax: arithmetic instead of a gather per weight from the table (docs/quantization.md). No
    int4 kernel takes NF4, whose table no affine grid fits. Otherwise the plain layer
    (dequantize, then matmul), a block of WIDEN_BLOCK_ROWS rows at a time."""

    def __init__(self, layer: NF4Linear):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        if fused(x):
            flat = layer.padded(x.reshape(-1, layer.in_features))
            return self.matvec(flat).to(x.dtype).reshape(*x.shape[:-1], layer.out_features)
        return blockwise_outputs(layer, x)

    def matvec(self, flat: Tensor) -> Tensor:
        """flat (rows, padded_in) times the weight, transposed: w = NF4[q] * absmax, for the low and the high
        nibbles of each byte (group-halves packing: quantized_layers.py)."""
        layer = self.layer
        groups, half = layer.padded_in // layer.groupsize, layer.groupsize // 2
        x = flat.float().reshape(-1, 1, groups, 2, half)
        absmax = layer.group_absmax().unsqueeze(-1)
        planes = layer.weight.reshape(layer.out_features, groups, half)
        low, high = nf4_values(planes & 0xF) * absmax, nf4_values(planes >> 4) * absmax
        return (x[:, :, :, 0] * low + x[:, :, :, 1] * high).sum((-1, -2))


class CPUExperts(nn.Module):
    """A mixture's Experts on the CPU. A projection brisk's kernel takes multiplies a few rows by one expert's
    rows of it (a QuantizedCPULinear over all the experts' rows; a compiled step's chosen expert gathers
    them). Otherwise, in a compiled step, a few rows multiply the expert's weight as a sum of products, which
    Inductor fuses with the reading of its rows; elsewhere the plain experts' product. The plain experts are
    kept only while some projection needs them."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.n_experts = experts.n_experts
        self.kernels = nn.ModuleDict({name: QuantizedCPULinear(getattr(experts, name), experts.n_experts)
                                      for name in ("w1", "w3", "w2") if kernel_takes(getattr(experts, name))})
        self.layer = experts if len(self.kernels) < 3 else None

    def project(self, name: str, x: Tensor, expert) -> Tensor:
        if name in self.kernels:
            return self.kernels[name](x, expert)
        if fused(x):
            return matvec(x, self.layer.weight(name, expert)).to(x.dtype)
        return self.layer.project(name, x, expert)

    def forward(self, tokens: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
        return run_experts(self, tokens, chosen, weights)


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


class DecodeAttention(nn.Module):
    """Attention on the CPU. For a few query rows (PyTorch's CPU kernel is built for long blocks of queries):
    eagerly, brisk's attention op over the cache's rows as they lie (fp32 tensors, a bool mask); in a step
    being compiled, decode_attention, which Inductor fuses with the rest of the block. Otherwise PyTorch's
    fused kernel, in fp32 for bf16 / fp16 tensors on a CPU without bf16 arithmetic, where it emulates bf16
    (docs/experiments.md)."""

    def __init__(self, layer: ScaledDotProductAttention):
        super().__init__()
        self.layer = layer
        self.kernel = native_kernels()

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        if q.shape[0] * q.shape[2] <= FUSED_MAX_ROWS:
            if torch.compiler.is_compiling():
                return decode_attention(q, k, v, mask)
            if self.kernel and q.dtype == k.dtype == torch.float32 and mask.dtype == torch.bool:
                return torch.ops.brisk.attention(q, k, v, mask)
        return self.layer(widened(q), widened(k), widened(v), mask).to(q.dtype)


class FusedRMSNorm(nn.Module):
    """RMSNorm eagerly as brisk's one op, torch.ops.brisk.rms_norm (PyTorch runs it as five: pow, mean, add,
    rsqrt, mul), for fp32 rows; in a step being compiled, the plain norm, which Inductor fuses with its
    neighbours. It keeps the norm's weight under the norm's own name."""

    def __init__(self, layer: RMSNorm):
        super().__init__()
        self.weight, self.eps = layer.weight, layer.eps

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or x.dtype != torch.float32:
            return rms_norm(x, self.weight, self.eps)
        return torch.ops.brisk.rms_norm(x.contiguous(), self.weight, self.eps)


class FusedRotaryEmbedding(nn.Module):
    """The rotary embedding eagerly as brisk's one op, torch.ops.brisk.rope (PyTorch runs apply_rope as ten),
    for fp32 heads; in a step being compiled, apply_rope, which Inductor fuses with its neighbours."""

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or x.dtype != torch.float32:
            return apply_rope(x, rope)
        return torch.ops.brisk.rope(x.contiguous(), rope.contiguous())


def cpu_form(module: nn.Module, compiled_decode: bool = False) -> nn.Module:
    """The CPU's form of one of the model's modules, or the module itself where it has none."""
    if isinstance(module, nn.Linear) and (module.weight.dtype != torch.float32 or native_kernels()):
        return FloatLinear(module)
    if isinstance(module, (Int4Linear, Int8Linear)) and kernel_takes(module):
        return QuantizedCPULinear(module)
    if isinstance(module, NF4Linear):
        return NF4CPULinear(module)
    if isinstance(module, ScaledDotProductAttention):
        return DecodeAttention(module)
    if isinstance(module, RMSNorm) and module.weight.dtype == torch.float32 and native_kernels():
        return FusedRMSNorm(module)
    if isinstance(module, RotaryEmbedding) and native_kernels():
        return FusedRotaryEmbedding()
    if isinstance(module, Experts) and (compiled_decode or not isinstance(module.w1, nn.Linear)):
        return CPUExperts(module)
    return module


def swap_in(model: Transformer, compiled_decode: bool = False) -> Transformer:
    """Give every block's layers, norms, rotation and attention, and the final norm and output head, their CPU
    forms (after loading or quantizing; a layer already swapped is kept). compiled_decode: the decode step will
    be compiled, which gives a mixture's float experts their fused loops too."""
    return swap_layers(model, lambda module: cpu_form(module, compiled_decode))
