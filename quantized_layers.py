"""Quantized layers: how int8, int4 and NF4 weights are stored, and the plain way they compute.

Activations stay in floating point; only the weights of linear layers (and, optionally, the embedding
/ output head) are stored as integers:
- int8: symmetric, one scale per output channel (or per group of columns, GGUF's Q8_0 blocks):
  w = q * scale, q in [-128, 127].
- int4: asymmetric, one scale and zero per group of `groupsize` input columns:
  w = (q - 8) * scale + zero, q in [0, 15] (the convention of PyTorch's int4 kernels).
- NF4 (QLoRA's 4-bit NormalFloat): w = NF4[q] * absmax, q in [0, 15], one absmax per group of `groupsize`
  columns; the absmaxes themselves stored in 8 bits ("double quantization") or as floats.

The layers here compute by dequantizing and calling the float matmul, on any device. A device's faster
forms (brisk's CPU kernels, PyTorch's CUDA int4 kernel, fused decode loops) are swapped in after loading
(cpu_kernels.py, cuda_kernels.py) and checked against these. quantize.py fills these layers; checkpoint.py
reads and writes them.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def quantize_int8(weight: Tensor, groupsize: int = 0):
    """(out, in) float -> int8 values and float32 scales: one per output channel (groupsize 0), or
    one per group of `groupsize` columns (the layout of GGUF's Q8_0 blocks, with groupsize 32)."""
    groups = weight.float().reshape(weight.shape[0], -1, groupsize or weight.shape[1])
    scales = groups.abs().amax(dim=-1).clamp(min=1e-10) / 127
    values = torch.round(groups / scales[..., None]).clamp(-128, 127).to(torch.int8).reshape(weight.shape)
    return values, (scales if groupsize else scales[:, 0])


def int4_group_params(weight: Tensor, groupsize: int):
    """Scale and zero of each group of `groupsize` columns, mapping [min, max] onto q in [0, 15]."""
    groups = weight.float().reshape(weight.shape[0], -1, groupsize)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = (high - low).clamp(min=1e-6) / 15
    return scales, low + 8 * scales  # zero: the value that q = 8 stands for


def int4_values(weight: Tensor, scales: Tensor, zeros: Tensor, groupsize: int) -> Tensor:
    """Round weight to the int4 grid of the given group parameters: q in [0, 15], as uint8."""
    groups = weight.float().reshape(weight.shape[0], -1, groupsize)
    q = torch.round((groups - zeros[..., None]) / scales[..., None]) + 8
    return q.clamp(0, 15).to(torch.uint8).reshape(weight.shape)


def dequantize_int4(values: Tensor, scales: Tensor, zeros: Tensor, groupsize: int) -> Tensor:
    groups = values.float().reshape(values.shape[0], -1, groupsize)
    # scales and zeros widened first, once per group: fp32 groups times bf16 scales would promote the types
    # element by element inside the broadcast, several times slower
    return ((groups - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(values.shape)


# Byte j of a group holds its columns j (low nibble) and j + groupsize / 2 (high nibble), as GGUF's Q4
# blocks do: each nibble plane is a run of columns, unpacked in place by vector shifts and masks
# (cpu_kernels.cpp). Files say so in their metadata; files packed otherwise are refused.
INT4_PACKING = "group-halves"


def pack_int4(values: Tensor, groupsize: int) -> Tensor:
    halves = values.reshape(values.shape[0], -1, 2, groupsize // 2)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(values.shape[0], -1)


def unpack_int4(packed: Tensor, groupsize: int) -> Tensor:
    planes = packed.reshape(packed.shape[0], -1, 1, groupsize // 2)
    return torch.cat([planes & 0xF, planes >> 4], dim=2).reshape(packed.shape[0], -1)


def float_bias(out_features: int, bias: bool):
    """A quantized layer's bias (Qwen2's q/k/v projections have one), kept in floating point; None without."""
    return torch.empty(out_features) if bias else None


class Int8Linear(nn.Module):
    """A linear layer with int8 weights, scaled per output channel (groupsize 0) or per group of
    columns, and a float bias if it has one. Its rows can also be looked up, so one table serves as a
    quantized embedding (and, tied, as both embedding and output head)."""

    def __init__(self, in_features: int, out_features: int, groupsize: int = 0, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, in_features // groupsize) if groupsize
                             else torch.empty(out_features))
        self.register_buffer("bias", float_bias(out_features, bias))

    def forward(self, x: Tensor) -> Tensor:
        out = self.outputs(x)
        return out if self.bias is None else out + self.bias

    def outputs(self, x: Tensor) -> Tensor:
        """x times the weight, transposed (the bias not added)."""
        if self.groupsize:
            return F.linear(x, self.dequantized().to(x.dtype))
        # one scale per output channel: scale the product, not the weight (a multiply per output)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales

    def dequantized(self, ids=slice(None)) -> Tensor:
        """The weight (or the rows ids of it) as floats."""
        values, scales = self.weight[ids], self.scales[ids]
        if not self.groupsize:
            return values.to(scales.dtype) * scales.unsqueeze(-1)
        groups = values.reshape(*values.shape[:-1], -1, self.groupsize).to(scales.dtype) * scales.unsqueeze(-1)
        return groups.reshape(values.shape)

    def rows(self, ids: Tensor) -> Tensor:
        return self.dequantized(ids)


class Int4Linear(nn.Module):
    """A linear layer with group-wise int4 weights: packed uint8 (out, padded_in / 2) plus scales and
    zeros (out, padded_in / groupsize). When groupsize does not divide in_features (SmolLM2's 576 and
    groups of 128), the weight gets zero columns up to a whole number of groups and the input zero
    padding to match: the padding multiplies zeros, and every group, kernels included, stays full. A bias,
    if it has one, is kept in floating point."""

    def __init__(self, in_features: int, out_features: int, groupsize: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.padded_in = -(-in_features // groupsize) * groupsize
        self.register_buffer("weight", torch.empty(out_features, self.padded_in // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, self.padded_in // groupsize))
        self.register_buffer("zeros", torch.empty(out_features, self.padded_in // groupsize))
        self.register_buffer("bias", float_bias(out_features, bias))

    def padded(self, weight: Tensor) -> Tensor:
        # no copy where no padding is needed (a pad of nothing still copies the whole input)
        return F.pad(weight, (0, self.padded_in - self.in_features)) if self.padded_in > self.in_features else weight

    def forward(self, x: Tensor) -> Tensor:
        out = self.outputs(x)
        return out if self.bias is None else out + self.bias

    def outputs(self, x: Tensor) -> Tensor:
        """x times the weight, transposed (the bias not added)."""
        flat = self.padded(x.reshape(-1, self.in_features))
        out = F.linear(flat, self.dequantized().to(x.dtype))
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def kernel_scales_and_zeros(self) -> Tensor:
        """Scales and zeros as PyTorch's CUDA int4 kernel takes them: (groups, out, 2)."""
        return torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1).contiguous()

    def dequantized(self, rows=slice(None)) -> Tensor:
        """The weight (or its rows `rows`) as floats, padding columns included: (rows, padded_in)."""
        values = unpack_int4(self.weight[rows], self.groupsize)
        return dequantize_int4(values, self.scales[rows], self.zeros[rows], self.groupsize).to(self.scales.dtype)

    def rows(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        return self.dequantized(flat)[:, :self.in_features].reshape(*ids.shape, self.in_features)


def quantile_midpoints(table: Tensor) -> Tensor:
    """The points halfway between consecutive values of a sorted table: bucketize against them rounds to the
    nearest value (a tie to the lower one, as bitsandbytes rounds)."""
    return (table[:-1] + table[1:]) / 2


def normal_float_table() -> Tensor:
    """The 16 values of 4-bit NormalFloat (QLoRA, Dettmers et al. 2023, section 3), as bitsandbytes builds
    them: quantiles of N(0, 1) at probabilities evenly spaced from 0.9677083 down to 0.5 (excluded), 8 of them
    positive and 7 negative, and an exact zero, all divided by the largest, so that they span [-1, 1]. The
    quantiles carry equal shares of a normal distribution's mass, which weights roughly follow; an exact
    zero lets padding and zero weights be stored exactly."""
    positive = torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9)[:-1].double()).float()
    negative = -torch.special.ndtri(torch.linspace(0.9677083, 0.5, 8)[:-1].double()).float()
    values = torch.cat([negative, torch.zeros(1), positive]).sort().values
    return values / values.max()


def dynamic_map() -> Tensor:
    """The 256 values of bitsandbytes' signed 8-bit dynamic type (Dettmers 2015, "8-bit approximations for
    parallelism in deep learning"), in which double quantization stores the absmaxes: for e = 0 ... 6, 2^e
    evenly spaced fractions (midpoints of steps from 0.1 to 1) times 10^(e - 6), with both signs; then 0 and 1.
    A float-like code: fine steps near zero, coarse ones near 1."""
    values = [0.0, 1.0]
    for exponent in range(7):
        edges = torch.linspace(0.1, 1, 2**exponent + 1)
        fractions = (10 ** (exponent - 6)) * ((edges[:-1] + edges[1:]) / 2)
        values += fractions.tolist() + (-fractions).tolist()
    return torch.tensor(values).sort().values


NF4_TABLE, DYNAMIC_MAP = normal_float_table(), dynamic_map()
# Double quantization: absmaxes minus their mean, in blocks of this many, each scaled by its largest magnitude
ABSMAX_BLOCK = 256


def quantize_nf4(weight: Tensor, groupsize: int):
    """(out, in) float -> NF4 codes (out, in) as uint8, and the fp32 absmax of each group of `groupsize`
    columns (out, in / groupsize): each weight divided by its group's absmax, rounded to the nearest NF4
    value."""
    groups = weight.float().reshape(weight.shape[0], -1, groupsize)
    absmax = groups.abs().amax(dim=-1)
    scaled = (groups * (1.0 / absmax.clamp(min=1e-38))[..., None]).clamp(-1, 1)  # as bitsandbytes: x * (1/absmax)
    codes = torch.bucketize(scaled, quantile_midpoints(NF4_TABLE)).to(torch.uint8)
    return codes.reshape(weight.shape), absmax


def double_quantize(absmax: Tensor):
    """QLoRA's double quantization (section 3) of a layer's absmaxes (out, groups), fp32: their mean (the
    offset) taken off, the rest in blocks of ABSMAX_BLOCK in row-major order, each block scaled by its largest
    magnitude and rounded to the nearest value of the 8-bit dynamic map. Returns the codes (out, groups) as
    uint8, the blocks' scales (blocks,) and the offset (1,), all fp32. 8 + 32 / 256 bits per absmax instead
    of 32: about 0.37 bits fewer per weight with groups of 64."""
    offset = absmax.mean().reshape(1)
    flat = absmax.reshape(-1) - offset
    blocks = F.pad(flat, (0, -len(flat) % ABSMAX_BLOCK)).reshape(-1, ABSMAX_BLOCK)
    scales = blocks.abs().amax(dim=-1)
    scaled = (blocks * (1.0 / scales.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    codes = torch.bucketize(scaled, quantile_midpoints(DYNAMIC_MAP)).to(torch.uint8)
    return codes.reshape(-1)[:len(flat)].reshape(absmax.shape), scales, offset


class NF4Linear(nn.Module):
    """A linear layer with NF4 weights: packed codes (out, padded_in / 2), in the int4 layers' packing, and one
    absmax per group of `groupsize` columns, w = NF4[q] * absmax. With double_quant the absmaxes are stored as
    double_quantize gives them (absmax_codes, absmax_scales, absmax_offset); without, as floats (absmax).
    Padding columns (as in Int4Linear) hold code 7, NF4's exact zero. The two tables are buffers (not saved),
    so that they follow the layer to its device."""

    def __init__(self, in_features: int, out_features: int, groupsize: int, double_quant: bool = True,
                 bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.double_quant = double_quant
        self.padded_in = -(-in_features // groupsize) * groupsize
        groups = self.padded_in // groupsize
        self.register_buffer("weight", torch.empty(out_features, self.padded_in // 2, dtype=torch.uint8))
        if double_quant:
            self.register_buffer("absmax_codes", torch.empty(out_features, groups, dtype=torch.uint8))
            self.register_buffer("absmax_scales", torch.empty(-(-out_features * groups // ABSMAX_BLOCK)))
            self.register_buffer("absmax_offset", torch.empty(1))
        else:
            self.register_buffer("absmax", torch.empty(out_features, groups))
        self.register_buffer("bias", float_bias(out_features, bias))
        self.register_buffer("nf4_table", NF4_TABLE.clone(), persistent=False)
        self.register_buffer("dynamic_map", DYNAMIC_MAP.clone(), persistent=False)

    padded = Int4Linear.padded

    def forward(self, x: Tensor) -> Tensor:
        out = self.outputs(x)
        return out if self.bias is None else out + self.bias

    def outputs(self, x: Tensor, rows=slice(None)) -> Tensor:
        """x times the weight rows `rows` (all of them by default), transposed (the bias not added)."""
        flat = self.padded(x.reshape(-1, self.in_features))
        out = F.linear(flat, self.dequantized(rows).to(x.dtype))
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def group_absmax(self, rows=slice(None)) -> Tensor:
        """The absmax of every group of the rows `rows` (all by default), (rows, groups), fp32. Double
        quantization undone: the code's dynamic-map value times its block's scale, plus the offset; the
        absmax of row r, group g is number r * groups + g in row-major order, in block (that number) // 256."""
        if not self.double_quant:
            return self.absmax[rows].float()
        if rows == slice(None):  # all of them: the blocks are runs of 256 in row-major order
            flat = self.absmax_codes.reshape(-1)
            blocks = F.pad(flat, (0, -len(flat) % ABSMAX_BLOCK)).reshape(-1, ABSMAX_BLOCK)
            absmax = self.dynamic_map[blocks.long()] * self.absmax_scales.float()[:, None] + self.absmax_offset.float()
            return absmax.reshape(-1)[:len(flat)].reshape(self.absmax_codes.shape)
        groups = self.absmax_codes.shape[1]
        row_ids = torch.arange(self.out_features, device=self.weight.device)[rows]
        blocks = (row_ids[:, None] * groups + torch.arange(groups, device=self.weight.device)) // ABSMAX_BLOCK
        codes = self.absmax_codes[rows].long()
        return self.dynamic_map[codes] * self.absmax_scales.float()[blocks] + self.absmax_offset.float()

    def dequantized(self, rows=slice(None)) -> Tensor:
        """The weight (or its rows `rows`) as floats, padding columns included: (rows, padded_in)."""
        codes = unpack_int4(self.weight[rows], self.groupsize).long()
        values = self.nf4_table[codes].reshape(codes.shape[0], -1, self.groupsize)
        weight = (values * self.group_absmax(rows).unsqueeze(-1)).reshape(codes.shape)
        return weight.to(self.absmax_offset.dtype if self.double_quant else self.absmax.dtype)

    def rows(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        return self.dequantized(flat)[:, :self.in_features].reshape(*ids.shape, self.in_features)


class QuantizedEmbedding(nn.Module):
    """Token embedding read from a quantized table (the output head's, when the two are tied)."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table

    def forward(self, ids: Tensor) -> Tensor:
        return self.table.rows(ids)
