"""Faster forms of brisk's layers on a CPU, swapped in after loading (`swap_in`) in place of the plain
layers of model.py and quantized_layers.py. Each form holds the plain module it replaces as `.layer`
and reproduces its outputs (tests/test_cpu_kernels.py). The measurements behind each choice are in the
README (Benchmark).

- Quantized layers applied to a few rows (decoding) with bf16 activations, eagerly or compiled, call
  PyTorch's CPU int4 kernel, which reads the packed nibbles in its own layout: int4 weights directly, int8
  weights as two nibble planes (int8_as_int4_planes). The kernel wants bf16 activations; with fp32 ones it
  is many times slower, so on a CPU `--dtype auto` gives int4 checkpoints bf16, and int8 ones eagerly
  (cli.pick_dtype).
- Decoding under torch.compile otherwise (bf16 float weights; quantized ones with fp32 activations): a
  layer applied to a few rows is written as a multiply-and-sum, which Inductor turns into one vectorized
  loop per layer that reads each weight once in its stored type (bf16, int8, packed int4) and widens it in
  registers; attention over the KV cache likewise becomes sums of products that Inductor fuses with the
  rest of the block. Eagerly, PyTorch would materialise the whole (rows, out, in) product, so these forms
  are used only while compiling.
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
  expert's rows at a time: through the int4 kernel over that expert's slice of its layout, or in a
  compiled step through the fused loop over that expert's weight (CPUExperts).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import Experts, ScaledDotProductAttention, Transformer, run_experts, swap_layers
from quantized_layers import NF4_TABLE, Int4Linear, Int8Linear, NF4Linear, unpack_int4

# Up to this many rows (batch x new tokens) a compiled step keeps the fused loops; from 32 rows the
# matmul is faster again.
FUSED_MAX_ROWS = 16

CPU_HAS_BF16_ARITHMETIC = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cpu_vendor() -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...) on Linux; "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":")[1].strip() for line in cpuinfo if line.startswith("vendor_id")), "")
    except OSError:
        return ""


MKL_GEMV_IS_FAST = cpu_vendor() in ("GenuineIntel", "")


def widened(x: Tensor) -> Tensor:
    """x in fp32 on a CPU without bf16 arithmetic, for a layer over many rows or attention: there oneDNN and
    PyTorch's attention kernel emulate bf16, well below fp32 speed (README, Benchmark). x itself otherwise
    (and wherever it is fp32 already)."""
    return x if CPU_HAS_BF16_ARITHMETIC else x.float()


def few_rows(x: Tensor) -> bool:
    return x.numel() <= FUSED_MAX_ROWS * x.shape[-1]


def fused(x: Tensor) -> bool:
    """Whether x (..., features) is a few rows of a step being compiled: then layers are written as
    the sums Inductor fuses into loops, instead of library calls."""
    return torch.compiler.is_compiling() and few_rows(x)


def matvec(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., in) times weight (out, in), transposed, as a sum of products in fp32: (..., out)."""
    rows = x.reshape(-1, 1, x.shape[-1]).float()
    return (rows * weight).sum(-1).reshape(*x.shape[:-1], weight.shape[0])


class FloatLinear(nn.Module):
    """A float nn.Linear on the CPU: every bf16 / fp16 one, and fp32 ones where MKL's GEMV is slow."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        weight = self.layer.weight
        if fused(x):
            return matvec(x, weight).to(x.dtype)
        if few_rows(x):
            return F.linear(x, weight)
        wide = widened(x)
        return F.linear(wide, weight.to(wide.dtype)).to(x.dtype)


# PyTorch's CPU int4 kernel takes groups of these sizes; its weight layout is built once, after loading,
# from values in [0, 15] (two tiles of 16 input columns).
INT4_KERNEL_GROUPSIZES = (256, 128, 64, 32)


def int4_kernel_takes(out_features: int, in_features: int) -> bool:
    """Whether the kernel's layout can hold a weight of this shape (in_features padded to whole groups)."""
    return out_features % 16 == 0 and in_features % 64 == 0


def int4_kernel_weight(weight: Tensor, values) -> Tensor:
    """A weight in the layout of PyTorch's CPU int4 kernel, from values(rows): its rows as integers in [0, 15].
    Built 1024 rows at a time: the layout keeps rows apart, and the int32 values it is made from take 4 bytes
    a weight (226 MB at once for SmolLM2's output head as nibble planes)."""
    return torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(values(rows).to(torch.int32), 2)
                      for rows in weight.split(1024)])


def int4_kernel(x: Tensor, kernel_weight: Tensor, groupsize: Tensor, scales_and_zeros: Tensor) -> Tensor:
    """x (rows, in) times the int4 weight, transposed. The kernel is `aten._weight_int4pack_mm_for_cpu`,
    called through its wrapper that takes the groupsize as a tensor: Inductor's lowering of the aten form
    makes the integer a constant tensor of the graph, and inside the compiled block (a nested compile
    region) the step then fails with "group size must be a scalar" (torch 2.13)."""
    return torch.ops.quantized.int4mm_packed_weight_cpu(x, kernel_weight, groupsize, scales_and_zeros)


def int8_as_int4_planes(layer: Int8Linear):
    """The int8 layer as one int4 weight over its inputs taken twice, for PyTorch's int4 kernel: (kernel
    weight, groupsize, scales and zeros). An int8 value q is 16 h + l, with l = q & 15 in [0, 15] and
    h = q >> 4 in [-8, 7] (its high nibble, signed), so that with scale s

        x . (q s) = x . (l s) + x . (h 16 s).

    In the kernel's convention w = (n - 8) scale + zero, the low plane is n = l with scale s and zero 8 s,
    the high plane n = h + 8 with scale 16 s and zero 0. Side by side the planes are one weight of twice
    the columns, which [x, x] multiplies in one call. A scale per output channel is repeated per group."""
    groupsize = layer.groupsize or next(size for size in INT4_KERNEL_GROUPSIZES if layer.in_features % size == 0)
    scales = layer.scales if layer.groupsize else layer.scales[:, None].expand(-1, layer.in_features // groupsize)
    plane_scales = torch.cat([scales, 16 * scales], dim=1)
    plane_zeros = torch.cat([8 * scales, torch.zeros_like(scales)], dim=1)
    scales_and_zeros = torch.stack([plane_scales, plane_zeros], dim=-1).transpose(0, 1).contiguous()
    planes = int4_kernel_weight(layer.weight, lambda rows: torch.cat([rows & 15, (rows >> 4) + 8], dim=1))
    return planes, torch.tensor([groupsize]), scales_and_zeros


def register_kernel_buffers(layer: nn.Module, kernel_weight, groupsize, scales_and_zeros):
    """The kernel's tensors as buffers of the layer (None where it has none): not written to checkpoints
    (non-persistent), but named, so that an exported decode step (aot_step.py) reads them where they are
    instead of copying them into its package. The groupsize is a one-element tensor: a 0-d one would become
    an unnamed constant of the package."""
    for name, tensor in (("kernel_weight", kernel_weight), ("groupsize", groupsize),
                         ("scales_and_zeros", scales_and_zeros)):
        layer.register_buffer(name, tensor, persistent=False)


# Eagerly, an int8 weight the kernel cannot take is widened to the activations' dtype before its matmul.
# Widened this many rows at a time, each block stays in the cache between widening and matmul, instead of a
# whole widened weight (113 MB for SmolLM2's fp32-widened output head) going out to memory and back.
WIDEN_BLOCK_ROWS = 1024


class Int8CPULinear(nn.Module):
    """An Int8Linear on the CPU. For a few rows of bf16 activations, eagerly or compiled, PyTorch's int4
    kernel over the weight's two nibble planes (int8_as_int4_planes); for a few rows of fp32 activations in a
    compiled step, the fused loop over the int8 bytes; otherwise the plain layer's arithmetic, a block of
    WIDEN_BLOCK_ROWS weight rows at a time."""

    def __init__(self, layer: Int8Linear):
        super().__init__()
        self.layer = layer
        # built in a bf16 model only: the kernel is 15 to 35 times slower with fp32 activations (README)
        takes_kernel = (layer.groupsize in (0, *INT4_KERNEL_GROUPSIZES)
                        and int4_kernel_takes(layer.out_features, 2 * layer.in_features))
        built = takes_kernel and layer.scales.dtype == torch.bfloat16
        register_kernel_buffers(self, *(int8_as_int4_planes(layer) if built else (None, None, None)))

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        if self.kernel_weight is not None and x.dtype == torch.bfloat16 and few_rows(x):
            flat = x.reshape(-1, layer.in_features)
            out = int4_kernel(torch.cat([flat, flat], dim=-1), self.kernel_weight, self.groupsize,
                              self.scales_and_zeros)
            return out.reshape(*x.shape[:-1], layer.out_features)
        if fused(x):
            out = matvec(x, layer.dequantized()) if layer.groupsize else matvec(x, layer.weight) * layer.scales
            return out.to(x.dtype)
        wide = widened(x)
        if layer.out_features <= WIDEN_BLOCK_ROWS:
            return layer.outputs(wide).to(x.dtype)
        return torch.cat([layer.outputs(wide, slice(start, start + WIDEN_BLOCK_ROWS))
                          for start in range(0, layer.out_features, WIDEN_BLOCK_ROWS)], dim=-1).to(x.dtype)


# Up to this many rows (batch x new tokens) PyTorch's int4 kernel beats dequantizing and multiplying, for a
# 1536 x 576 weight in groups of 32 (2 Xeon cores with AMX, torch 2.13): with bf16 activations 770 against
# 3000 us at 64 rows, 1500 against 2000 at 128; with fp32 ones 1.6 against 3.2 ms at 2 rows, 12.4 against
# 3.4 at 16.
INT4_KERNEL_MAX_ROWS_BF16, INT4_KERNEL_MAX_ROWS_FP32 = 64, 2


class Int4CPULinear(nn.Module):
    """An Int4Linear on the CPU. PyTorch's int4 kernel for up to INT4_KERNEL_MAX_ROWS_* rows, eagerly or
    compiled, except in a compiled step with fp32 activations, where the fused loop over the packed bytes
    is faster (for up to FUSED_MAX_ROWS rows). Otherwise the plain layer: dequantize, then matmul."""

    def __init__(self, layer: Int4Linear):
        super().__init__()
        self.layer = layer
        kernel_tensors = None, None, None
        if int4_kernel_takes(layer.out_features, layer.padded_in):  # the kernel's own layout, built once
            kernel_tensors = (int4_kernel_weight(layer.weight, lambda rows: unpack_int4(rows, layer.groupsize)),
                              torch.tensor([layer.groupsize]), layer.kernel_scales_and_zeros())
        register_kernel_buffers(self, *kernel_tensors)

    def forward(self, x: Tensor) -> Tensor:
        layer, compiling, rows = self.layer, torch.compiler.is_compiling(), x.numel() // x.shape[-1]
        bf16 = x.dtype == torch.bfloat16
        kernel = self.kernel_weight is not None and (
            rows <= INT4_KERNEL_MAX_ROWS_BF16 if bf16 else rows <= INT4_KERNEL_MAX_ROWS_FP32 and not compiling)
        if not kernel and not fused(x):
            return layer.outputs(widened(x)).to(x.dtype)
        flat = layer.padded(x.reshape(-1, layer.in_features))
        if kernel:
            out = int4_kernel(flat, self.kernel_weight, self.groupsize, self.scales_and_zeros)
        else:
            out = self.matvec(flat).to(x.dtype)
        return out.reshape(*x.shape[:-1], layer.out_features)

    def matvec(self, flat: Tensor) -> Tensor:
        """flat (rows, padded_in) times the weight, transposed, unpacked group by group inside the sum:
        w = (q - 8) * scale + zero = q * scale + offset, for the low and the high nibbles of each byte."""
        layer = self.layer
        groups, half = layer.padded_in // layer.groupsize, layer.groupsize // 2
        x = flat.float().reshape(-1, 1, groups, 2, half)
        scales = layer.scales.float().unsqueeze(-1)
        offsets = (layer.zeros.float() - 8 * layer.scales.float()).unsqueeze(-1)
        planes = layer.weight.reshape(layer.out_features, groups, half)
        low, high = (planes & 0xF) * scales + offsets, (planes >> 4) * scales + offsets
        return (x[:, :, :, 0] * low + x[:, :, :, 1] * high).sum((-1, -2))


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
    its group's absmax: 340 us for a 1536 x 576 weight and one row, against 730 us for the same loop looking
    the values up in the table (a gather per weight) and 37 us for the int4 kernel over an int4 weight of the
    same groups, which no exact rewriting of the NF4 table fits. Otherwise the plain layer (dequantize, then
    matmul), a block of WIDEN_BLOCK_ROWS rows at a time."""

    def __init__(self, layer: NF4Linear):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        if fused(x):
            flat = layer.padded(x.reshape(-1, layer.in_features))
            return self.matvec(flat).to(x.dtype).reshape(*x.shape[:-1], layer.out_features)
        wide = widened(x)
        return torch.cat([layer.outputs(wide, slice(start, start + WIDEN_BLOCK_ROWS))
                          for start in range(0, layer.out_features, WIDEN_BLOCK_ROWS)], dim=-1).to(x.dtype)

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
    """A mixture's Experts on the CPU, quantized or in a step being compiled. An expert's product with a few
    rows of bf16 activations goes through PyTorch's int4 kernel over that expert's rows alone, eagerly or
    compiled (int8 as nibble planes over the inputs taken twice, as Int8CPULinear does): the kernel's layout
    keeps rows apart, so an expert's rows are a slice of it (gathered, for a compiled step's chosen expert),
    and scales and zeros are kept expert by expert. Otherwise, in a compiled step, a few rows multiply the
    expert's weight as a sum of products, which Inductor fuses with the reading (and widening) of its rows;
    elsewhere the plain experts' product."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.layer, self.n_experts = experts, experts.n_experts
        for name in ("w1", "w3", "w2"):
            layer = getattr(experts, name)
            rows = layer.out_features // self.n_experts
            weight, groupsize, scales_and_zeros = None, None, None
            if isinstance(layer, (Int4Linear, Int8Linear)):  # the whole layer's kernel tensors, as its form builds them
                form = Int4CPULinear(layer) if isinstance(layer, Int4Linear) else Int8CPULinear(layer)
                if form.kernel_weight is not None and rows % 16 == 0:  # an expert's slice: whole 16-row tiles
                    weight, groupsize = form.kernel_weight, form.groupsize
                    # (groups, n * rows, 2) -> (n, groups, rows, 2): each expert's own, contiguous
                    scales_and_zeros = form.scales_and_zeros.unflatten(1, (self.n_experts, rows)).transpose(0, 1)
                    scales_and_zeros = scales_and_zeros.contiguous()
            for part, tensor in (("kernel_weight", weight), ("groupsize", groupsize),
                                 ("scales_and_zeros", scales_and_zeros)):
                self.register_buffer(f"{name}_{part}", tensor, persistent=False)

    def project(self, name: str, x: Tensor, expert) -> Tensor:
        kernel_weight, layer = getattr(self, f"{name}_kernel_weight"), getattr(self.layer, name)
        if kernel_weight is not None and x.dtype == torch.bfloat16 and x.shape[0] <= INT4_KERNEL_MAX_ROWS_BF16:
            rows = layer.out_features // self.n_experts
            scales_and_zeros = getattr(self, f"{name}_scales_and_zeros")
            if isinstance(expert, int):
                expert_weight = kernel_weight[expert * rows:(expert + 1) * rows]
                scales_and_zeros = scales_and_zeros[expert]
            else:
                expert_weight = kernel_weight[expert * rows + torch.arange(rows, device=x.device)]
                scales_and_zeros = scales_and_zeros[expert.view(1)][0]
            x = torch.cat([x, x], dim=-1) if isinstance(layer, Int8Linear) else layer.padded(x)  # int8: two planes
            return int4_kernel(x, expert_weight, getattr(self, f"{name}_groupsize"), scales_and_zeros)
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
    tensors on a CPU without bf16 arithmetic (2 to 2.7 times faster there: README, Benchmark)."""

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
    if isinstance(module, Int8Linear):
        return Int8CPULinear(module)
    if isinstance(module, Int4Linear):
        return Int4CPULinear(module)
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
