"""NF4 weights (QLoRA's 4-bit NormalFloat): the table and the codes are bitsandbytes', double quantization
included; files round-trip; the CPU's fused loop computes what the plain layer computes."""
import pytest
import torch

import cpu_kernels
import quantize
from checkpoint import load_model
from conftest import filled, has_module, quantized_copy
from cpu_kernels import NF4CPULinear, nf4_values
from prepare import prepare
from quantized_layers import (ABSMAX_BLOCK, DYNAMIC_MAP, NF4_TABLE, NF4Linear, pack_int4, quantize_nf4,
                              quantile_midpoints)

needs_bitsandbytes = pytest.mark.skipif(not has_module("bitsandbytes"), reason="bitsandbytes is not installed "
                                        "(pip install -r requirements-dev.txt)")

# QLoRA (Dettmers et al. 2023), appendix E: the NF4 data type's exact values
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def bitsandbytes_nf4(weight: torch.Tensor, double_quant: bool):
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    return packed, state, dequantize_4bit(packed, state)


def bitsandbytes_codes(packed: torch.Tensor, shape) -> torch.Tensor:
    """bitsandbytes packs two codes a byte, the first in the high nibble."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=-1).reshape(shape)


def test_the_table_is_qloras_normal_float():
    assert NF4_TABLE.tolist() == QLORA_NF4


@needs_bitsandbytes
def test_the_tables_equal_bitsandbytes():
    from bitsandbytes.functional import create_dynamic_map, get_4bit_type

    assert torch.equal(NF4_TABLE, get_4bit_type("nf4", "cpu"))
    assert torch.equal(DYNAMIC_MAP, create_dynamic_map())


@needs_bitsandbytes
def test_codes_and_absmaxes_equal_bitsandbytes_on_a_real_weight(smollm2_weight):
    packed, state, _ = bitsandbytes_nf4(smollm2_weight, double_quant=False)
    codes, absmax = quantize_nf4(smollm2_weight, 64)
    assert torch.equal(codes, bitsandbytes_codes(packed, smollm2_weight.shape))
    assert torch.equal(absmax.reshape(-1), state.absmax)


@needs_bitsandbytes
def test_double_quantization_equals_bitsandbytes_where_its_search_finds_the_nearest_code(smollm2_weight):
    """bitsandbytes' CPU search of the 8-bit map (BinSearch, csrc/cpu_ops.cpp) lands one value away from the
    nearest for some inputs near a midpoint (about 1 in 600 here); everywhere else the codes are equal, and
    ours are always the nearest."""
    packed, state, _ = bitsandbytes_nf4(smollm2_weight, double_quant=True)
    layer = filled(NF4Linear(576, 1536, 64), smollm2_weight)
    assert torch.equal(layer.absmax_offset, state.offset.reshape(1))
    assert torch.equal(layer.absmax_scales, state.state2.absmax)
    _, absmax = quantize_nf4(smollm2_weight, 64)
    scaled = (absmax.reshape(-1) - layer.absmax_offset) / layer.absmax_scales.repeat_interleave(ABSMAX_BLOCK)
    distance = {name: (scaled - DYNAMIC_MAP[codes.reshape(-1).long()]).abs()
                for name, codes in (("ours", layer.absmax_codes), ("theirs", state.absmax))}
    nearest = torch.bucketize(scaled, quantile_midpoints(DYNAMIC_MAP))
    assert torch.equal(layer.absmax_codes.reshape(-1).long(), nearest)
    differ = layer.absmax_codes.reshape(-1) != state.absmax
    assert differ.float().mean() < 0.005
    assert (distance["ours"][differ] < distance["theirs"][differ]).all()


@needs_bitsandbytes
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantized_weight_equals_bitsandbytes(smollm2_weight, double_quant):
    """The layer given bitsandbytes' own codes and absmaxes dequantizes to bitsandbytes' weight, exactly."""
    packed, state, expected = bitsandbytes_nf4(smollm2_weight, double_quant)
    layer = NF4Linear(576, 1536, 64, double_quant)
    layer.weight = pack_int4(bitsandbytes_codes(packed, smollm2_weight.shape), 64)
    if double_quant:
        layer.absmax_codes = state.absmax.reshape(1536, 9)
        layer.absmax_scales, layer.absmax_offset = state.state2.absmax, state.offset.reshape(1)
    else:
        layer.absmax = state.absmax.reshape(1536, 9)
    assert torch.equal(layer.dequantized(), expected)


def stored_bits_per_weight(layer: NF4Linear) -> float:
    return 8 * sum(tensor.numel() * tensor.element_size() for tensor in layer.state_dict().values()) / (
        layer.out_features * layer.in_features)


def test_double_quantization_saves_0_37_bits_a_weight(smollm2_weight):
    double, single = (filled(NF4Linear(576, 1536, 64, double_quant), smollm2_weight) for double_quant in (True, False))
    assert stored_bits_per_weight(single) == 4.5  # 4-bit codes, an fp32 absmax per 64 weights
    offset = 32 / (1536 * 576)  # one fp32 mean for the layer
    assert stored_bits_per_weight(double) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + offset, abs=1e-9)
    assert stored_bits_per_weight(single) - stored_bits_per_weight(double) == pytest.approx(0.373, abs=0.001)
    # each absmax is off by at most half the 8-bit map's widest step, times its block's scale
    error = (double.group_absmax() - single.absmax).reshape(-1).abs()
    bound = DYNAMIC_MAP.diff().max() / 2 * double.absmax_scales.repeat_interleave(ABSMAX_BLOCK)
    assert (error <= bound + 1e-8).all()


def test_padding_columns_are_nf4_zeros_and_multiply_nothing():
    weight = torch.randn(8, 576)
    layer = filled(NF4Linear(576, 8, 128), weight)  # 576 is 4.5 groups of 128: padded to 640
    assert layer.padded_in == 640 and layer.absmax_codes.shape == (8, 5)
    assert (layer.dequantized()[:, 576:] == 0).all()
    x = torch.randn(2, 576)
    assert torch.allclose(layer(x), x @ layer.dequantized()[:, :576].T, atol=1e-5)


@pytest.mark.parametrize("double_quant", [True, False])
def test_embedding_rows_are_the_dequantized_weight_rows(double_quant):
    table = filled(NF4Linear(576, 40, 64, double_quant), torch.randn(40, 576))
    ids = torch.tensor([[3, 0], [39, 3]])
    assert torch.equal(table.rows(ids), table.dequantized()[ids])


@pytest.mark.parametrize("flag, double_quant", [([], True), (["--no_double_quant"], False)])
def test_saved_file_loads_to_the_same_outputs(tiny_dir, tmp_path, flag, double_quant):
    model = quantize.quantize_rtn(load_model(tiny_dir), "nf4", 32, True, double_quant)
    loaded = prepare(load_model(quantized_copy(tiny_dir, tmp_path / "tiny", "--mode", "nf4", "--groupsize", 32,
                                               "--quantize_embedding", *flag)), "cpu")
    tokens, positions = torch.tensor([[5, 60, 200, 7, 31]]), torch.arange(5)
    model.setup_caches(1, 16), loaded.setup_caches(1, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(tokens, positions), model(tokens, positions), atol=1e-5)
    layer = loaded.layers[1].attention.wk.layer
    assert isinstance(layer, NF4Linear) and layer.double_quant == double_quant and layer.groupsize == 32
    assert loaded.tok_embeddings.table is loaded.output.layer  # tied, and quantized once


def test_default_file_names_say_how_the_absmaxes_are_kept(tmp_path):
    assert quantize.output_path(tmp_path, "nf4", 64).name == "model_nf4.g64.safetensors"
    assert quantize.output_path(tmp_path, "nf4", 64, False).name == "model_nf4_float_absmax.g64.safetensors"


def test_the_bit_polynomial_is_the_table():
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.allclose(nf4_values(codes), NF4_TABLE, rtol=0, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("double_quant", [True, False])
def test_compiled_one_row_fused_loop_equals_the_plain_layer(smollm2_weight, double_quant):
    layer = NF4CPULinear(filled(NF4Linear(576, 1536, 64, double_quant), smollm2_weight))
    x = torch.randn(1, 1, 576)
    with torch.no_grad():
        assert torch.allclose(torch.compile(layer, fullgraph=True)(x), layer.layer(x), rtol=1e-4, atol=1e-4)


def test_loaded_nf4_layers_get_their_cpu_form(tiny_dir, tmp_path):
    model = prepare(load_model(quantized_copy(tiny_dir, tmp_path / "tiny", "--mode", "nf4", "--groupsize", 32)), "cpu")
    assert isinstance(model.layers[0].feed_forward.w2, NF4CPULinear)
    assert cpu_kernels.swap_in(model).layers[0].feed_forward.w2.layer is model.layers[0].feed_forward.w2.layer
