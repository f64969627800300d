"""Faster forms of brisk's layers on CUDA, swapped in after loading (`swap_in`): int4 layers call
PyTorch's tinygemm int4 kernel (the kernel of gpt-fast's int4 path) instead of dequantizing the weight
at every step. The other layers run as they are: under torch.compile, Inductor fuses the int8 layer's
widening and scaling into its matmul, and decode steps are captured as CUDA graphs (generation.py)."""
import torch
import torch.nn as nn
from torch import Tensor

from model import Transformer, swap_layers
from quantized_layers import Int4Linear, unpack_int4


class Int4TinyGemmLinear(nn.Module):
    """An Int4Linear through tinygemm (`_weight_int4pack_mm`), bf16 activations, any number of rows."""

    def __init__(self, layer: Int4Linear):
        super().__init__()
        self.layer = layer
        values = unpack_int4(layer.weight, layer.groupsize).to(torch.int32)
        # the kernel takes its weights two values per byte, high nibble first, and builds its own tiles
        packed = (values[:, 0::2] << 4 | values[:, 1::2]).to(torch.uint8)
        self.kernel_weight = torch.ops.aten._convert_weight_to_int4pack(packed, 8)  # plain attributes
        self.scales_and_zeros = layer.kernel_scales_and_zeros()

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        flat = layer.padded(x.reshape(-1, layer.in_features))
        out = torch.ops.aten._weight_int4pack_mm(flat, self.kernel_weight, layer.groupsize, self.scales_and_zeros)
        return out.reshape(*x.shape[:-1], layer.out_features)


def cuda_form(module: nn.Module) -> nn.Module:
    """tinygemm for an int4 layer whose padded width it takes (a multiple of 128); others as they are."""
    if isinstance(module, Int4Linear) and module.padded_in % 128 == 0:
        return Int4TinyGemmLinear(module)
    return module


def swap_in(model: Transformer) -> Transformer:
    return swap_layers(model, cuda_form)
