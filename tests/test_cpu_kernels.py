"""The CPU's faster layer forms (cpu_kernels.py) compute what the plain layers compute, and are the ones
that actually run: PyTorch's int4 kernel for a few rows of bf16 activations (eagerly and compiled, int8
weights included), the fused loops in a compiled decode step otherwise."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cpu_kernels
from checkpoint import load_model
from conftest import filled, quantized_copy
from cpu_kernels import (CPU_HAS_BF16_ARITHMETIC, DecodeAttention, FloatLinear, Int4CPULinear, Int8CPULinear,
                         NF4CPULinear, decode_attention)
from generation import decode_one_token
from model import ScaledDotProductAttention
from quantized_layers import Int4Linear, Int8Linear, NF4Linear
from sampling import Sampling


def bf16_linear(weight) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.to(torch.bfloat16)
    return linear


def traced_functions(fn, *args) -> set:
    """The names of the functions a compiled fn calls, as Dynamo traces them (nested regions included)."""
    names = set()

    def recording_backend(graph_module, example_inputs):
        for module in graph_module.modules():
            if isinstance(module, torch.fx.GraphModule):
                names.update(getattr(node.target, "__name__", str(node.target)) for node in module.graph.nodes
                             if node.op in ("call_function", "call_method"))
        return graph_module.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=recording_backend, fullgraph=True)(*args)
    return names


INT4_KERNEL = "int4mm_packed_weight_cpu"  # cpu_kernels.int4_kernel


class AtenCalls(TorchDispatchMode):
    """The aten operators run eagerly inside the block."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def cpu_layers(smollm2_weight):
    return {"bf16": FloatLinear(bf16_linear(smollm2_weight)),
            "int8": Int8CPULinear(filled(Int8Linear(576, 1536), smollm2_weight)),
            "int8-g32": Int8CPULinear(filled(Int8Linear(576, 1536, 32), smollm2_weight)),
            "int4-g32": Int4CPULinear(filled(Int4Linear(576, 1536, 32), smollm2_weight)),
            "int4-g128": Int4CPULinear(filled(Int4Linear(576, 1536, 128), smollm2_weight)),
            "nf4-g64": NF4CPULinear(filled(NF4Linear(576, 1536, 64), smollm2_weight))}


@pytest.mark.parametrize("kind", ["bf16", "int8", "int8-g32", "int4-g32", "int4-g128", "nf4-g64"])
def test_a_compiled_layer_over_a_few_rows_is_a_multiply_and_sum_not_a_matmul(smollm2_weight, kind):
    layer = cpu_layers(smollm2_weight)[kind]
    x = torch.randn(1, 1, 576, dtype=torch.bfloat16 if kind == "bf16" else torch.float32)
    few = traced_functions(layer, x)
    assert "sum" in few and not few & {"linear", INT4_KERNEL}
    many = traced_functions(layer, x.expand(1, 32, 576).contiguous())  # past FUSED_MAX_ROWS: the matmul
    assert "linear" in many and "sum" not in many


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bf16", "int8", "int8-g32", "int4-g32", "int4-g128"])
def test_compiled_one_row_matvec_equals_the_plain_layer(smollm2_weight, kind):
    layer = cpu_layers(smollm2_weight)[kind]
    x = torch.randn(1, 1, 576, dtype=torch.bfloat16 if kind == "bf16" else torch.float32)
    plain = layer.layer
    expected = (x.float() @ plain.weight.float().T) if kind == "bf16" else plain(x)
    compiled = torch.compile(layer, fullgraph=True)
    tolerance = 1e-2 if kind == "bf16" else 1e-4
    assert torch.allclose(compiled(x).float(), expected.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("groupsize", [0, 32])
def test_an_int8_head_widened_block_by_block_equals_the_plain_layer(groupsize):
    layer = filled(Int8Linear(64, 2500, groupsize), torch.randn(2500, 64))  # three blocks of 1024 rows
    for dtype in (torch.float32, torch.bfloat16):
        layer.scales = layer.scales.to(dtype)
        x = torch.randn(2, 10, 64, dtype=dtype)  # 20 rows: more than the int4 kernel takes
        with AtenCalls() as calls:
            out = Int8CPULinear(layer)(x)
        expected = layer(cpu_kernels.widened(x)).to(dtype)  # fp32 arithmetic on a CPU without bf16's
        assert "cat" in calls.names and torch.allclose(out, expected, rtol=1e-6, atol=1e-6)


def bf16_int8_layer(weight, groupsize: int) -> Int8CPULinear:
    layer = filled(Int8Linear(weight.shape[1], weight.shape[0], groupsize), weight)
    layer.scales = layer.scales.to(torch.bfloat16)  # as loading a bf16 model leaves them
    return Int8CPULinear(layer)


def bf16_int4_layer(weight) -> Int4CPULinear:
    layer = filled(Int4Linear(weight.shape[1], weight.shape[0], 32), weight)
    layer.scales, layer.zeros = layer.scales.to(torch.bfloat16), layer.zeros.to(torch.bfloat16)
    return Int4CPULinear(layer)


def within_bf16_rounding(out, expected) -> bool:
    """Off by no more than bf16's rounding of the outputs (8 significant bits)."""
    return (out.float() - expected).abs().max() < 0.005 * expected.abs().max()


@pytest.mark.parametrize("groupsize", [0, 32])
def test_an_int8_layer_over_a_few_bf16_rows_is_the_int4_kernel_over_its_two_nibble_planes(smollm2_weight, groupsize):
    layer = bf16_int8_layer(smollm2_weight, groupsize)
    x = torch.randn(3, 5, 576, dtype=torch.bfloat16)  # 15 rows
    with AtenCalls() as calls:
        out = layer(x)
    expected = x.float() @ layer.layer.dequantized().float().T
    assert INT4_KERNEL in calls.names and within_bf16_rounding(out, expected)


def test_an_int8_layer_in_an_fp32_model_builds_no_kernel_weight(smollm2_weight):
    layer = Int8CPULinear(filled(Int8Linear(576, 1536, 32), smollm2_weight))
    with AtenCalls() as calls:
        layer(torch.randn(1, 1, 576))
    assert layer.kernel_weight is None and INT4_KERNEL not in calls.names


@pytest.mark.parametrize("groupsize", [32, 64, 128, 256])
def test_int4_kernel_for_two_fp32_rows_equals_the_plain_layer(smollm2_weight, groupsize):
    layer = Int4CPULinear(filled(Int4Linear(576, 1536, groupsize), smollm2_weight))
    x = torch.randn(1, 2, 576)
    with AtenCalls() as calls:
        out = layer(x)
    assert INT4_KERNEL in calls.names
    assert torch.allclose(out, layer.layer(x), rtol=1e-4, atol=2e-4)


def test_int4_kernel_for_64_bf16_rows_equals_the_plain_layer(smollm2_weight):
    layer = bf16_int4_layer(smollm2_weight)
    x = torch.randn(4, 16, 576, dtype=torch.bfloat16)
    with AtenCalls() as calls:
        out = layer(x)
    expected = x.float() @ layer.layer.dequantized().float().T
    assert INT4_KERNEL in calls.names and within_bf16_rounding(out, expected)


@pytest.mark.parametrize("dtype, rows", [(torch.float32, 3), (torch.bfloat16, 65)])
def test_int4_layer_over_more_rows_than_the_kernel_serves_dequantizes(smollm2_weight, dtype, rows):
    layer = bf16_int4_layer(smollm2_weight) if dtype == torch.bfloat16 else Int4CPULinear(
        filled(Int4Linear(576, 1536, 32), smollm2_weight))
    with AtenCalls() as calls:
        layer(torch.randn(1, rows, 576, dtype=dtype))
    assert INT4_KERNEL not in calls.names and "mm" in calls.names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa_with_grouped_heads_and_padding(dtype):
    q = torch.randn(2, 9, 1, 64, dtype=dtype)  # two rows, one query each, 9 heads over 3 K/V heads
    k, v = torch.randn(2, 3, 40, 64, dtype=dtype), torch.randn(2, 3, 40, 64, dtype=dtype)
    slots = torch.arange(40)
    mask = ((slots <= 30) & (slots >= torch.tensor([[0], [7]])))[:, None, None, :]  # row 1: 7 padding slots
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(decode_attention(q, k, v, mask).float(), expected, rtol=tolerance, atol=tolerance)


def test_compiled_attention_over_one_query_is_decode_attention_not_sdpa():
    attention = DecodeAttention(ScaledDotProductAttention())
    q, k, v = torch.randn(1, 9, 1, 64), torch.randn(1, 3, 40, 64), torch.randn(1, 3, 40, 64)
    mask = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    calls = traced_functions(attention, q, k, v, mask)
    assert "softmax" in calls and "scaled_dot_product_attention" not in calls


@pytest.mark.skipif(CPU_HAS_BF16_ARITHMETIC, reason="this CPU computes bf16 natively")
def test_bf16_layer_over_many_rows_computes_in_fp32_on_a_cpu_without_bf16_arithmetic():
    linear = bf16_linear(torch.randn(32, 64))
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    assert torch.equal(FloatLinear(linear)(x), (x.float() @ linear.weight.float().T).to(torch.bfloat16))


@pytest.mark.skipif(CPU_HAS_BF16_ARITHMETIC, reason="this CPU computes bf16 natively")
def test_bf16_attention_computes_in_fp32_eagerly_on_a_cpu_without_bf16_arithmetic():
    q = torch.randn(1, 9, 1, 64, dtype=torch.bfloat16)
    k, v = torch.randn(1, 3, 40, 64, dtype=torch.bfloat16), torch.randn(1, 3, 40, 64, dtype=torch.bfloat16)
    mask = (torch.arange(40) <= 30)[None, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True).to(torch.bfloat16)
    assert torch.equal(DecodeAttention(ScaledDotProductAttention())(q, k, v, mask), expected)


def test_fp32_layers_keep_mkl_where_its_gemv_is_fast(tiny_dir, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "MKL_GEMV_IS_FAST", True)
    model = cpu_kernels.swap_in(load_model(tiny_dir), compiled_decode=True)
    assert type(model.layers[0].attention.wq) is torch.nn.Linear and type(model.output) is torch.nn.Linear


def test_eager_fp32_layers_stay_plain_where_mkls_gemv_is_slow(tiny_dir, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "MKL_GEMV_IS_FAST", False)
    model = load_model(tiny_dir)
    assert type(model.layers[0].attention.wq) is torch.nn.Linear and type(model.output) is torch.nn.Linear


def test_a_compiled_fp32_step_runs_fused_loops_where_mkls_gemv_is_slow(tiny_dir, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "MKL_GEMV_IS_FAST", False)
    model = cpu_kernels.swap_in(load_model(tiny_dir), compiled_decode=True)
    assert isinstance(model.output, FloatLinear)
    model.setup_caches(1, 32)
    calls = traced_functions(decode_one_token, model, torch.tensor([[5]]), torch.tensor([3]), None, Sampling(0))
    assert "sum" in calls and not calls & {"linear", "scaled_dot_product_attention"}


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4", "nf4"])
def test_a_loaded_models_compiled_decode_step_runs_no_matmul_and_no_sdpa(tiny_dir, tmp_path, kind):
    if kind == "bf16":
        model = load_model(tiny_dir, "cpu", torch.bfloat16)
    else:
        model = load_model(quantized_copy(tiny_dir, tmp_path / "tiny", "--mode", kind, "--groupsize", 32,
                                          "--quantize_embedding"))
    model.setup_caches(1, 32)
    calls = traced_functions(decode_one_token, model, torch.tensor([[5]]), torch.tensor([3]), None, Sampling(0))
    assert "sum" in calls and not calls & {"linear", "scaled_dot_product_attention", INT4_KERNEL}


def bf16_kernel_layers(smollm2_weight):
    return {"int8": bf16_int8_layer(smollm2_weight, 0), "int8-g32": bf16_int8_layer(smollm2_weight, 32),
            "int4-g32": bf16_int4_layer(smollm2_weight)}


@pytest.mark.parametrize("kind", ["int8", "int8-g32", "int4-g32"])
def test_a_compiled_quantized_layer_over_a_few_bf16_rows_calls_the_int4_kernel(smollm2_weight, kind):
    layer = bf16_kernel_layers(smollm2_weight)[kind]
    calls = traced_functions(layer, torch.randn(1, 1, 576, dtype=torch.bfloat16))
    assert INT4_KERNEL in calls and "sum" not in calls


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8-g32", "int4-g32"])
def test_a_compiled_int4_kernel_call_equals_the_eager_one(smollm2_weight, kind):
    layer = bf16_kernel_layers(smollm2_weight)[kind]
    x = torch.randn(1, 1, 576, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_a_loaded_bf16_int4_models_compiled_decode_step_calls_the_int4_kernel(tiny_dir, tmp_path):
    model = load_model(quantized_copy(tiny_dir, tmp_path / "tiny", "--mode", "int4", "--groupsize", 32,
                                      "--quantize_embedding"), "cpu", torch.bfloat16)
    model.setup_caches(1, 32)
    calls = traced_functions(decode_one_token, model, torch.tensor([[5]]), torch.tensor([3]), None, Sampling(0))
    assert INT4_KERNEL in calls and not calls & {"linear", "scaled_dot_product_attention"}


def test_swapping_twice_changes_nothing(tiny_dir):
    model = load_model(tiny_dir, "cpu", torch.bfloat16)
    layers = [module for module in model.modules()]
    cpu_kernels.swap_in(model)
    assert [module for module in model.modules()] == layers
    assert isinstance(model.layers[0].attention.wq, FloatLinear)
