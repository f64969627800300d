"""The CPU's faster layer forms (cpu_kernels.py) compute what the plain layers compute, and are the ones
that actually run: brisk's kernels (cpu_kernels.cpp) through int4, int8 and float layers, eagerly, compiled
and in an AOT package; the fused loops for NF4 layers, and for float layers without the kernels, in a
compiled decode step."""
import platform

import pytest
import torch

import cpu_kernels
from checkpoint import load_model
from conftest import AtenCalls, filled, quantized_copy
from scripts.convert_gguf import convert as convert_gguf
from cpu_kernels import (CPU_HAS_BF16_ARITHMETIC, DecodeAttention, FloatLinear, NF4CPULinear, QuantizedCPULinear,
                         decode_attention, native_kernels)
from generation import decode_one_token, generate
from model import ScaledDotProductAttention
from prepare import prepare
from quantized_layers import Int4Linear, Int8Linear, NF4Linear
from sampling import Sampling
from tokenizer import load_tokenizer


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


KERNELS = {"int4_linear", "int8_linear"}  # torch.ops.brisk, as traced
needs_kernels = pytest.mark.skipif(not native_kernels(), reason="brisk's CPU kernels are unavailable here")


def cpu_layers(smollm2_weight):
    return {"bf16": FloatLinear(bf16_linear(smollm2_weight)),
            "int8": QuantizedCPULinear(filled(Int8Linear(576, 1536), smollm2_weight)),
            "int8-g32": QuantizedCPULinear(filled(Int8Linear(576, 1536, 32), smollm2_weight)),
            "int4-g32": QuantizedCPULinear(filled(Int4Linear(576, 1536, 32), smollm2_weight)),
            "int4-g128": QuantizedCPULinear(filled(Int4Linear(576, 1536, 128), smollm2_weight)),
            "nf4-g64": NF4CPULinear(filled(NF4Linear(576, 1536, 64), smollm2_weight))}


def test_a_compiled_nf4_layer_over_a_few_rows_is_a_multiply_and_sum_not_a_matmul(smollm2_weight):
    layer = cpu_layers(smollm2_weight)["nf4-g64"]
    x = torch.randn(1, 1, 576)
    few = traced_functions(layer, x)
    assert "sum" in few and "linear" not in few
    many = traced_functions(layer, x.expand(1, 32, 576).contiguous())  # past FUSED_MAX_ROWS: the matmul
    assert "linear" in many and "sum" not in many


@needs_kernels
def test_a_float_layer_over_a_few_rows_calls_the_float_kernel_eagerly_and_compiled(smollm2_weight):
    layer = cpu_layers(smollm2_weight)["bf16"]
    x = torch.randn(1, 3, 576, dtype=torch.bfloat16)
    with AtenCalls() as calls:
        layer(x)
    assert "float_linear" in calls.names and "mm" not in calls.names
    assert "float_linear" in traced_functions(layer, x)
    many = traced_functions(layer, torch.randn(1, 32, 576, dtype=torch.bfloat16))  # past FUSED_MAX_ROWS
    assert "linear" in many and "float_linear" not in many


def test_without_the_kernels_a_compiled_float_layer_is_a_multiply_and_sum(smollm2_weight):
    layer = cpu_layers(smollm2_weight)["bf16"]
    layer.kernel = False
    calls = traced_functions(layer, torch.randn(1, 1, 576, dtype=torch.bfloat16))
    assert "sum" in calls and not calls & {"linear", "float_linear"}


@pytest.mark.slow
def test_compiled_bf16_matvec_equals_the_plain_layer(smollm2_weight):
    layer = cpu_layers(smollm2_weight)["bf16"]
    layer.kernel = False
    x = torch.randn(1, 1, 576, dtype=torch.bfloat16)
    expected = x.float() @ layer.layer.weight.float().T
    assert torch.allclose(torch.compile(layer, fullgraph=True)(x).float(), expected, rtol=1e-2, atol=1e-2)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 5])  # tiles of 2 activation rows, and what is left of them
def test_the_float_kernel_equals_the_product_in_float64(dtype, rows):
    # 30 weight rows: 7 groups of 4 and 2 left; 600 columns: 37 steps of 16 and 8 left
    weight, x = torch.randn(30, 600).to(dtype), torch.randn(rows, 600)
    out = torch.ops.brisk.float_linear(x, weight)
    expected = x.double() @ weight.double().T
    magnitude = x.double().abs() @ weight.double().abs().T  # fp32 sums err by a few eps of this at most
    assert out.dtype == torch.float32 and ((out - expected).abs() <= 1e-6 * magnitude).all()


@needs_kernels
def test_a_row_through_the_float_kernel_does_not_depend_on_the_rows_beside_it():
    weight, x = torch.randn(64, 576).bfloat16(), torch.randn(7, 576)
    alone = torch.cat([torch.ops.brisk.float_linear(x[i:i + 1], weight) for i in range(7)])
    assert torch.equal(torch.ops.brisk.float_linear(x, weight), alone)


# brisk's kernels round the activations to int8 per block of 32, x ~ q * max|x| / 127. Where every block's
# values are integers in [-127, 127] times one power of two, with 127 among them, that rounding is exact,
# and the kernel's sums equal the plain layer's up to float rounding.
def exact_activations(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    integers = torch.randint(-127, 128, (rows, columns // 32, 32), generator=generator).float()
    integers[:, :, 5] = 127
    powers = 2.0 ** torch.randint(-9, -2, (rows, columns // 32, 1), generator=generator).float()
    return (integers * powers).reshape(rows, columns)


def fp16_scaled(layer):
    """The layer with scales (and int4 mins) that fp16 holds exactly, as a GGUF file's are: the kernel reads
    them in fp16 (cpu_kernels.kernel_scales)."""
    layer.scales = layer.scales.half().float()
    if isinstance(layer, Int4Linear):
        layer.zeros = (layer.zeros - 8 * layer.scales).half().float() + 8 * layer.scales
    return layer


def int4_layer(weight, groupsize):
    return fp16_scaled(filled(Int4Linear(weight.shape[1], weight.shape[0], groupsize), weight))


def int8_layer(weight, groupsize):
    return fp16_scaled(filled(Int8Linear(weight.shape[1], weight.shape[0], groupsize), weight))


def within_float_rounding(out, expected) -> bool:
    """Equal up to fp32 rounding of sums of a few hundred terms: 1e-6 of the largest output."""
    return (out - expected).abs().max() <= 1e-6 * expected.abs().max()


def plain_product(layer, x):
    """x times the layer's dequantized weight in float64, rounded to fp32."""
    return (x.double() @ layer.dequantized().double()[:, :x.shape[-1]].T).float()


@pytest.fixture(params=["avx2", "best"])
def isa(request):
    """brisk's AVX2 path, and the best the CPU has (AVX-512 VNNI where it has it)."""
    if request.param == "best" and torch.ops.brisk.cpu_isa("best") == "avx2":
        pytest.skip("this CPU has no AVX-512 VNNI: its best path is the AVX2 one")
    yield torch.ops.brisk.cpu_isa(request.param)
    torch.ops.brisk.cpu_isa("best")


@needs_kernels
@pytest.mark.parametrize("groupsize", [32, 64, 128, 256])
@pytest.mark.parametrize("rows", [1, 3, 6, 9])  # tiles of 4 activation rows, and what is left of them
def test_the_int4_kernel_on_exactly_rounded_activations_equals_the_plain_layer(smollm2_weight, isa, groupsize, rows):
    layer = int4_layer(smollm2_weight, groupsize)  # groups of 128 and 256: 576 columns padded to whole groups
    x = exact_activations(rows, 576)
    out = QuantizedCPULinear(layer)(x)
    assert within_float_rounding(out, plain_product(layer, x))


@needs_kernels
@pytest.mark.parametrize("groupsize", [0, 32, 64])
@pytest.mark.parametrize("rows", [1, 6])
def test_the_int8_kernel_on_exactly_rounded_activations_equals_the_plain_layer(smollm2_weight, isa, groupsize, rows):
    layer = int8_layer(smollm2_weight, groupsize)
    x = exact_activations(rows, 576)
    out = QuantizedCPULinear(layer)(x)
    assert within_float_rounding(out, plain_product(layer, x))


@needs_kernels
@pytest.mark.parametrize("kind", ["int4-g32", "int8-g32"])
def test_the_kernel_on_any_activations_is_within_their_int8_rounding(smollm2_weight, isa, kind):
    """Each activation moves by at most half a step of its block's int8 grid, max|x| / 254; the product
    moves by at most that times the block's sum of |w|."""
    layer = int4_layer(smollm2_weight, 32) if kind.startswith("int4") else int8_layer(smollm2_weight, 32)
    x = torch.randn(5, 576) * torch.linspace(0.1, 10, 576)  # blocks of very different ranges
    step = x.reshape(5, 18, 32).abs().amax(-1) / 254  # (rows, blocks)
    weight_sums = layer.dequantized().abs().reshape(1536, 18, 32).sum(-1)  # (out, blocks)
    bound = step @ weight_sums.T.double().float()
    error = (QuantizedCPULinear(layer)(x) - plain_product(layer, x)).abs()
    assert (error <= bound * 1.001 + 1e-5).all() and error.max() > 1e-4  # rounded, and within the bound


@needs_kernels
def test_the_kernel_gives_the_same_outputs_on_one_thread_and_two(smollm2_weight):
    layer = int4_layer(smollm2_weight, 32)
    x, threads = torch.randn(6, 576), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = QuantizedCPULinear(layer)(x)
        torch.set_num_threads(2)
        two = QuantizedCPULinear(layer)(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each output is one thread's sum, in the same order


@needs_kernels
@pytest.mark.parametrize("kind", ["int8", "int8-g32", "int4-g32", "int4-g128"])
def test_a_quantized_layer_over_a_few_rows_calls_the_kernel_eagerly_and_compiled(smollm2_weight, kind):
    layer = cpu_layers(smollm2_weight)[kind]
    x = torch.randn(1, 3, 576)
    with AtenCalls() as calls:
        eager = layer(x)
    assert calls.names & KERNELS and "mm" not in calls.names
    assert traced_functions(layer, x) & KERNELS
    assert eager.shape == (1, 3, 1536)


@needs_kernels
def test_a_bf16_layer_over_a_few_rows_runs_the_kernel_in_fp32(smollm2_weight):
    layer = int4_layer(smollm2_weight, 32)
    x = exact_activations(2, 576).bfloat16()
    out = QuantizedCPULinear(layer)(x)
    expected = plain_product(layer, x.float())  # the exact product, which bf16 then rounds (8 significant bits)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), expected, rtol=2**-8, atol=0)


@needs_kernels
@pytest.mark.parametrize("groupsize", [0, 32])
def test_many_rows_and_a_last_panel_short_of_8_rows_go_through_the_kernel(groupsize):
    layer = fp16_scaled(filled(Int8Linear(64, 2500, groupsize), torch.randn(2500, 64)))  # 312 panels and 4 rows
    x = exact_activations(300, 64)
    with AtenCalls() as calls:
        out = QuantizedCPULinear(layer)(x)
    assert calls.names & KERNELS and "mm" not in calls.names
    assert out.shape == (300, 2500) and within_float_rounding(out, plain_product(layer, x))


def test_layers_the_kernels_cannot_take_stay_plain():
    for layer in (filled(Int8Linear(48, 64), torch.randn(64, 48)),  # 48 columns: not whole blocks of 32
                  filled(Int4Linear(96, 64, 96), torch.randn(64, 96))):  # groups of 96
        assert not cpu_kernels.kernel_takes(layer) and cpu_kernels.cpu_form(layer) is layer


@needs_kernels
def test_the_kernel_refuses_a_mismatched_input_in_one_line(smollm2_weight):
    layer = int8_layer(smollm2_weight, 32)
    with pytest.raises(RuntimeError, match="x has 544 columns, the weight 576"):
        torch.ops.brisk.int8_linear(torch.randn(1, 544), cpu_kernels.kernel_weight(layer),
                                    cpu_kernels.kernel_scales(layer), 32, 1536)


def test_without_the_kernels_one_line_says_so_and_layers_stay_plain(monkeypatch, capsys, smollm2_weight):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert native_kernels.__wrapped__() is False  # the check itself, not the process's cached answer
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not using the CPU kernels (cpu_kernels.cpp): this CPU (aarch64" in lines[0]
    monkeypatch.setattr(cpu_kernels, "native_kernels", lambda: False)
    layer = filled(Int4Linear(576, 1536, 32), smollm2_weight)
    assert cpu_kernels.cpu_form(layer) is layer


def test_brisk_cpu_kernels_off_asks_for_the_plain_layers_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("BRISK_CPU_KERNELS", "off")
    assert native_kernels.__wrapped__() is False
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not using the CPU kernels (cpu_kernels.cpp): BRISK_CPU_KERNELS=off" in lines[0]


@needs_kernels
@pytest.mark.slow
@pytest.fixture(scope="module")
def smollm2_kept(smollm2_gguf, tmp_path_factory):
    """The embedded GGUF with its Q4_1 blocks and Q8_0 embedding kept as int4 / int8 layers (the default
    checkpoint, model_q4_1.safetensors)."""
    return convert_gguf(smollm2_gguf, tmp_path_factory.mktemp("kept") / "SmolLM2-135M-Instruct", keep_quantized=True)


@pytest.mark.parametrize("text", ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small"])
def test_smollm2s_q4_1_file_through_the_kernels_gives_the_exact_greedy_tokens(smollm2_kept, text):
    """32 greedy tokens through the kernels equal those of the plain layers (the dequantized weights in
    fp32), or differ first where the plain layers' two best tokens are a near-tie: logits within 0.5 of each
    other (probabilities within a factor of 1.65), which rounding the activations to int8 can swap."""
    kernel_model, exact_model = prepare(load_model(smollm2_kept), "cpu"), load_model(smollm2_kept)
    prompt = load_tokenizer(smollm2_kept.parent).encode(text)
    kernel_model.setup_caches(1, len(prompt) + 32)
    exact_model.setup_caches(1, len(prompt) + 32)
    (tokens,), _ = generate(kernel_model, [prompt], 32, Sampling(0))
    (exact,), _ = generate(exact_model, [prompt], 32, Sampling(0))
    if tokens != exact:
        first = next(i for i, (a, b) in enumerate(zip(tokens, exact)) if a != b)
        with torch.no_grad():
            logits = exact_model(torch.tensor([prompt + exact[:first]]), torch.arange(len(prompt) + first))
        best, second = logits[0, -1].topk(2).values.tolist()
        assert best - second < 0.5, f"token {first} differs, though the plain layers prefer theirs by {best - second}"


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


@needs_kernels
def test_fp32_layers_take_the_float_kernel(tiny_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    assert isinstance(model.layers[0].attention.wq, FloatLinear) and isinstance(model.output, FloatLinear)


def test_without_the_kernels_fp32_layers_stay_plain(tiny_dir, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "native_kernels", lambda: False)
    model = prepare(load_model(tiny_dir), "cpu")
    assert type(model.layers[0].attention.wq) is torch.nn.Linear and type(model.output) is torch.nn.Linear


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4", "nf4"])
def test_a_loaded_models_compiled_decode_step_runs_no_matmul_and_no_sdpa(tiny_dir, tmp_path, kind):
    if kind == "bf16":
        model = load_model(tiny_dir, "cpu", torch.bfloat16)
    else:
        model = load_model(quantized_copy(tiny_dir, tmp_path / "tiny", "--mode", kind, "--groupsize", 32,
                                          "--quantize_embedding"))
    prepare(model, "cpu", "compiled")
    model.setup_caches(1, 32)
    calls = traced_functions(decode_one_token, model, torch.tensor([[5]]), torch.tensor([3]), None, Sampling(0))
    assert not calls & {"linear", "scaled_dot_product_attention"}
    kernels = {"bf16": {"float_linear"}, "int8": KERNELS, "int4": KERNELS, "nf4": {"sum"}}[kind]  # nf4: fused
    assert calls & kernels if native_kernels() else "sum" in calls


def test_swapping_twice_changes_nothing(tiny_dir):
    model = prepare(load_model(tiny_dir, "cpu", torch.bfloat16), "cpu")
    layers = [module for module in model.modules()]
    cpu_kernels.swap_in(model)
    assert [module for module in model.modules()] == layers
    assert isinstance(model.layers[0].attention.wq, FloatLinear)
