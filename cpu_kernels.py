"""Faster forms of brisk's layers on a CPU, swapped in after loading (`swap_in`) in place of the plain
layers of model.py and quantized_layers.py. Each form holds the plain module it replaces as `.layer`
and reproduces its outputs (tests/test_cpu_kernels.py). The measurements behind each choice are in
docs/cpu_kernels.md.

- int4 and int8 layers over a few rows (decoding) call brisk's own kernels, torch.ops.brisk.int4_linear and
  int8_linear (cpu_kernels.cpp): the activations rounded to int8 in blocks of 32 and multiplied in integers,
  as llama.cpp does, eagerly, compiled and in an AOT package alike. They take fp32 activations (other
  dtypes are widened for the call), so a quantized checkpoint runs in fp32 on every CPU (cli.pick_dtype).
  Over more rows (prefill) the plain layer dequantizes and multiplies: BLAS's GEMM is faster there. The
  kernels are built once into torch's extensions cache (scripts/setup.sh does it); where they cannot be
  built or run (no compiler, not an x86 CPU with AVX2), one line on stderr says so and the plain layers
  compute.
- Float layers over a few rows in a step being compiled are written as a multiply-and-sum, which Inductor
  turns into one vectorized loop per layer that reads each weight once in its stored type (bf16) and widens
  it in registers; attention over the KV cache likewise becomes sums of products that Inductor fuses with
  the rest of the block. Eagerly, PyTorch would materialise the whole (rows, out, in) product, so these
  forms are used only while compiling.
- Layers applied to many rows (prefill) of bf16 activations, on a CPU without bf16 arithmetic, compute in
  fp32 (`widened`), bf16 and quantized weights alike: there oneDNN emulates bf16 and its GEMM runs well
  below fp32 speed. Attention in bf16 runs in fp32 there too, eagerly: PyTorch's fused kernel emulates bf16
  as well.
- fp32 layers are left to MKL on Intel CPUs, whose one-row GEMV beats the fused loop there. MKL chooses its
  code by the CPU's vendor, and on AMD CPUs its GEMV reads half the bytes per second that Inductor's fused
  loop reads, so there fp32 layers take the fused loops in a compiled step too: the code that compiles the
  decode step swaps them in (swap_in(model, compiled_decode=True)); eagerly they stay plain nn.Linear.
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
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils import cpp_extension

from model import Experts, ScaledDotProductAttention, Transformer, run_experts, swap_layers
from quantized_layers import NF4_TABLE, Int4Linear, Int8Linear, NF4Linear

# Up to this many rows (batch x new tokens) a compiled step keeps the fused loops; from 32 rows the
# matmul is faster again.
FUSED_MAX_ROWS = 16
# Up to this many rows quantized layers call brisk's kernels; over more, dequantizing and multiplying is faster.
KERNEL_MAX_ROWS = 256

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


def cpu_vendor() -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...) on Linux; "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":")[1].strip() for line in cpuinfo if line.startswith("vendor_id")), "")
    except OSError:
        return ""


MKL_GEMV_IS_FAST = cpu_vendor() in ("GenuineIntel", "")


class FloatLinear(nn.Module):
    """A float nn.Linear on the CPU: every bf16 / fp16 one, and fp32 ones where MKL's GEMV is slow."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        weight = self.layer.weight
        if fused(x):
            return matvec(x, weight).to(x.dtype)
        if rows_of(x) <= FUSED_MAX_ROWS:
            return F.linear(x, weight)
        wide = widened(x)
        return F.linear(wide, weight.to(wide.dtype)).to(x.dtype)


def kernel_scales(layer: nn.Module) -> Optional[Tensor]:
    """The scales brisk's kernel reads for an int4 or int8 layer, fp16: for int4 (out, groups, 2), each
    group's scale and min (w = q * scale + min, min = zero - 8 * scale); for int8 (out, groups), one group
    per row where it has a scale per output channel. fp16 holds GGUF's Q4_0 / Q4_1 / Q8_0 scales exactly,
    as their blocks store them in fp16. None where the kernels are not loaded or cannot take the layer: int4
    groups of 32 or a multiple of 64, int8 rows and groups in whole blocks of 32."""
    int4 = isinstance(layer, Int4Linear) and (layer.groupsize == 32 or layer.groupsize % 64 == 0)
    int8 = isinstance(layer, Int8Linear) and layer.in_features % 32 == 0 and layer.groupsize % 32 == 0
    if int4 and native_kernels():
        scales, zeros = layer.scales.float(), layer.zeros.float()
        return torch.stack([scales, zeros - 8 * scales], dim=-1).half()
    if int8 and native_kernels():
        return layer.scales.reshape(layer.out_features, -1).half()
    return None


def kernel_product(layer: nn.Module, scales: Tensor, x: Tensor, rows=None) -> Tensor:
    """x (..., in) times the weight rows `rows` (all of them by default; a slice or an index tensor) of an
    int4 or int8 layer, transposed, by brisk's kernel with its kernel_scales: in fp32, out in x's dtype.
    The kernel pads an int4 layer's inputs to whole groups itself."""
    weight = layer.weight if rows is None else layer.weight[rows]
    scales = scales if rows is None else scales[rows]
    wide = x.float().contiguous()
    if isinstance(layer, Int4Linear):
        out = torch.ops.brisk.int4_linear(wide, weight, scales, layer.groupsize)
    else:
        out = torch.ops.brisk.int8_linear(wide, weight, scales, layer.groupsize or layer.in_features)
    return out.to(x.dtype)


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


class QuantizedCPULinear(nn.Module):
    """An Int4Linear or Int8Linear on the CPU: brisk's kernel over up to KERNEL_MAX_ROWS rows, the plain
    layer (blockwise_outputs) over more, or wherever the kernel cannot take the layer. The kernel's scales
    are a buffer (not saved), so that an AOT package (aot_step.py) reads them by name where they are."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.register_buffer("kernel_scales", kernel_scales(layer), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel_scales is not None and rows_of(x) <= KERNEL_MAX_ROWS:
            return kernel_product(self.layer, self.kernel_scales, x)
        return blockwise_outputs(self.layer, x)


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
    """A mixture's Experts on the CPU. A quantized projection multiplies a few rows by one expert's rows of
    its weight through brisk's kernel (an expert's rows are a slice of the layer's; a compiled step's chosen
    expert gathers them). Otherwise, in a compiled step, a few rows multiply the expert's weight as a sum of
    products, which Inductor fuses with the reading of its rows; elsewhere the plain experts' product."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.layer, self.n_experts = experts, experts.n_experts
        for name in ("w1", "w3", "w2"):
            self.register_buffer(f"{name}_kernel_scales", kernel_scales(getattr(experts, name)), persistent=False)

    def project(self, name: str, x: Tensor, expert) -> Tensor:
        layer, scales = getattr(self.layer, name), getattr(self, f"{name}_kernel_scales")
        if scales is not None and rows_of(x) <= KERNEL_MAX_ROWS:
            out = layer.out_features // self.n_experts
            rows = (slice(expert * out, (expert + 1) * out) if isinstance(expert, int)
                    else expert * out + torch.arange(out, device=x.device))
            return kernel_product(layer, scales, x, rows)
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
    """Attention on the CPU: decode_attention for the few query rows of a step being compiled (PyTorch's
    CPU kernel is built for long blocks of queries), the fused kernel otherwise, in fp32 for bf16 / fp16
    tensors on a CPU without bf16 arithmetic, where PyTorch's kernel emulates bf16 (docs/experiments.md)."""

    def __init__(self, layer: ScaledDotProductAttention):
        super().__init__()
        self.layer = layer

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        if torch.compiler.is_compiling() and q.shape[0] * q.shape[2] <= FUSED_MAX_ROWS:
            return decode_attention(q, k, v, mask)
        return self.layer(widened(q), widened(k), widened(v), mask).to(q.dtype)


def cpu_form(module: nn.Module, compiled_decode: bool = False) -> nn.Module:
    """The CPU's form of one of the model's modules, or the module itself where it has none."""
    fp32_loops = compiled_decode and not MKL_GEMV_IS_FAST
    if isinstance(module, nn.Linear) and (module.weight.dtype != torch.float32 or fp32_loops):
        return FloatLinear(module)
    if isinstance(module, (Int4Linear, Int8Linear)):
        return QuantizedCPULinear(module)
    if isinstance(module, NF4Linear):
        return NF4CPULinear(module)
    if isinstance(module, ScaledDotProductAttention):
        return DecodeAttention(module)
    if isinstance(module, Experts) and (compiled_decode or not isinstance(module.w1, nn.Linear)):
        return CPUExperts(module)
    return module


def swap_in(model: Transformer, compiled_decode: bool = False) -> Transformer:
    """Give every block's layers and attention, and the output head, their CPU forms (after loading or
    quantizing; a layer already swapped is kept). compiled_decode: the decode step will be compiled, which on
    a CPU whose MKL GEMV is slow gives fp32 layers the fused loops too."""
    return swap_layers(model, lambda module: cpu_form(module, compiled_decode))
