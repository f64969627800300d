"""Quantized layers compute what their dequantized weights compute; files round-trip; GPTQ beats rounding."""
import re
import shutil

import pytest
import torch

import quantize
import quantized_layers
from checkpoint import load_model
from conftest import filled, quantized_copy, shared_text
from cpu_kernels import QuantizedCPULinear
from generate import main
from generation import compile_steps, generate
from prepare import prepare
from quantize import HessianAccumulator, gptq_layer
from quantized_layers import Int4Linear, Int8Linear, dequantize_int4, int4_group_params, int4_values, quantize_int8
from sampling import Sampling
from tokenizer import load_tokenizer


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return (10 * torch.log10(reference.pow(2).sum() / (reference - approximation).pow(2).sum())).item()


def test_int8_reconstruction_of_a_real_layer(smollm2_weight):
    values, scales = quantize_int8(smollm2_weight)
    assert sqnr_db(smollm2_weight, values.float() * scales[:, None]) > 38


@pytest.mark.parametrize("groupsize, bound", [(32, 22), (64, 20), (128, 19), (256, 18)])
def test_int4_reconstruction_of_a_real_layer(smollm2_weight, groupsize, bound):
    # fresh random weights, since SmolLM2's own already lie on a Q4_1 grid of 32 columns
    weight = torch.randn(256, 1536, generator=torch.Generator().manual_seed(0))
    scales, zeros = int4_group_params(weight, groupsize)
    restored = dequantize_int4(int4_values(weight, scales, zeros, groupsize), scales, zeros, groupsize)
    assert sqnr_db(weight, restored) > bound - 6  # Gaussian weights have heavier tails than trained ones
    layer = filled(Int4Linear(576, 1536, groupsize), smollm2_weight)
    assert sqnr_db(smollm2_weight, layer.dequantized()[:, :576]) > bound


def test_int4_packing_holds_each_half_group_in_one_nibble_plane():
    values = torch.arange(64).remainder(16).to(torch.uint8).reshape(1, 64)  # two groups of 32
    packed = quantized_layers.pack_int4(values, 32)
    assert packed.shape == (1, 32)
    assert packed[0, 0].item() == values[0, 0] | values[0, 16] << 4
    assert packed[0, 16].item() == values[0, 32] | values[0, 48] << 4
    assert torch.equal(quantized_layers.unpack_int4(packed, 32), values)


def test_padded_groups_multiply_only_real_columns():
    weight = torch.randn(8, 576)
    layer = filled(Int4Linear(576, 8, 256), weight)  # 576 is 2.25 groups of 256: padded to 768
    assert layer.padded_in == 768 and layer.scales.shape == (8, 3)
    x = torch.randn(2, 576)
    assert torch.allclose(layer(x), x @ layer.dequantized()[:, :576].T, atol=1e-5)


@pytest.mark.parametrize("table", [Int8Linear(576, 40), Int4Linear(576, 40, 64)])
def test_embedding_rows_are_the_dequantized_weight_rows(table):
    filled(table, torch.randn(40, 576))
    ids = torch.tensor([[3, 0], [39, 3]])
    weight = (table.weight.float() * table.scales[:, None] if isinstance(table, Int8Linear)
              else table.dequantized()[:, :576])
    assert torch.equal(table.rows(ids), weight[ids])


def test_int4_file_of_an_older_packing_is_refused(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "tiny"
    shutil.copytree(tiny_dir, directory)
    quantize.main(["--checkpoint_path", str(directory), "--mode", "int4", "--groupsize", "32"])
    path = quantize.output_path(directory, "int4", 32)
    save_file(load_file(path), path, metadata={"format": "pt", "quantization": "int4", "groupsize": "32"})
    with pytest.raises(ValueError, match="packs its int4 weights in an older layout: quantize"):
        load_model(path)


@pytest.mark.parametrize("mode, groupsize", [("int8", 0), ("int4", 32), ("int4", 128), ("int4-gptq", 32)])
def test_saved_file_loads_to_the_same_outputs(tiny_dir, tmp_path, mode, groupsize):
    directory = tmp_path / "tiny"
    shutil.copytree(tiny_dir, directory)
    argv = ["--checkpoint_path", str(directory), "--mode", mode, "--quantize_embedding",
            "--calibration_samples", "4", "--calibration_seq_length", "32"] + (
        ["--groupsize", str(groupsize)] if groupsize else [])
    model = load_model(directory)
    if mode == "int4-gptq":
        calibration = quantize.calibration_tokens(model, load_tokenizer(directory), None, 4, 32)
        quantize.quantize_gptq(model, calibration, groupsize, True)
    else:
        quantize.quantize_rtn(model, mode, groupsize, True)
    assert quantize.main(argv) == 0
    written = quantize.output_path(directory, mode, groupsize)
    renamed = directory / "anything.safetensors"  # loading reads the metadata, not the file name
    written.rename(renamed)
    loaded = prepare(load_model(renamed), "cpu")
    tokens, positions = torch.tensor([[5, 60, 200, 7, 31]]), torch.arange(5)
    model.setup_caches(1, 16), loaded.setup_caches(1, 16)
    prepare(model, "cpu")  # the same kernels on both sides
    with torch.no_grad():
        assert torch.allclose(loaded(tokens, positions), model(tokens, positions), atol=1e-5)
    layer = loaded.layers[1].attention.wk  # the plain layer, or brisk's kernel form of it
    int4 = mode != "int8"
    assert isinstance(layer, Int4Linear if int4 else Int8Linear) or (type(layer) is QuantizedCPULinear
                                                                      and layer.int4 == int4)
    # tied and quantized once: the embedding looks up the head's plain rows (which a kernel form copied)
    table, head = loaded.tok_embeddings.table, loaded.output
    assert table is head or (type(head) is QuantizedCPULinear and head.int4 == isinstance(table, Int4Linear))


def test_gptq_output_error_is_below_rounding_on_real_activations(smollm2_dir):
    """SmolLM2's first attention block's q projection, its inputs from Shakespeare through the real model."""
    model, tokenizer = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    ids = torch.tensor(tokenizer.encode(shared_text("tinyshakespeare.txt")[:40000])[:2048]).view(8, 256)
    block, accumulator = model.layers[3], HessianAccumulator(576)
    hook = block.attention.wq.register_forward_hook(accumulator.add)
    inputs = []
    capture = block.attention.wq.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    model.setup_caches(8, 256)
    with torch.no_grad():
        model(ids, torch.arange(256))
    hook.remove(), capture.remove()
    X = inputs[0].reshape(-1, 576)
    W = block.attention.wq.weight.detach()
    for groupsize in (64, 128):
        rtn = filled(Int4Linear(576, 576, groupsize), W).dequantized()[:, :576]
        gptq = gptq_layer(W, accumulator.hessian, groupsize).dequantized()[:, :576]
        rtn_error, gptq_error = [(X @ (W - Q).T).pow(2).mean().item() for Q in (rtn, gptq)]
        assert gptq_error < 0.8 * rtn_error, (groupsize, gptq_error, rtn_error)


def test_calibration_without_a_file_uses_text_the_model_writes(tiny_dir):
    model, tokenizer = load_model(tiny_dir), load_tokenizer(tiny_dir)
    first = quantize.calibration_tokens(model, tokenizer, None, samples=3, length=20, seed=1)
    again = quantize.calibration_tokens(model, tokenizer, None, samples=3, length=20, seed=1)
    assert first.shape == (3, 20) and torch.equal(first, again)
    assert first[0, 0].item() == tokenizer.encode("The")[0]


@pytest.mark.parametrize("argv, message", [
    (["--calibration_samples", "0"], "--calibration_samples must be >= 1"),
    (["--blocksize", "0"], "--blocksize must be >= 1"),
    (["--output", "no/such/dir/q.safetensors"], "--output no/such/dir/q.safetensors: there is no directory"),
])
def test_bad_arguments_are_one_line_and_status_2(tiny_dir, capsys, argv, message):
    status = quantize.main(["--checkpoint_path", str(tiny_dir), "--mode", "int4-gptq", *argv])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_calibration_file_that_is_not_utf8_is_one_line(tiny_dir, capsys, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("\xe9t\xe9".encode("latin-1"))
    status = quantize.main(["--checkpoint_path", str(tiny_dir), "--mode", "int4-gptq",
                            "--calibration_file", str(tmp_path / "latin1.txt")])
    err = capsys.readouterr().err
    assert status == 2 and "is not UTF-8 text" in err and err.count("\n") == 1


def test_missing_calibration_file_is_one_clear_line(tiny_dir, capsys, tmp_path):
    status = quantize.main(["--checkpoint_path", str(tiny_dir), "--mode", "int4-gptq",
                            "--calibration_file", str(tmp_path / "absent.txt")])
    assert status == 2 and capsys.readouterr().err.startswith("error: --calibration_file")


def reported_weights_mb(capsys, checkpoint, *flags) -> int:
    capsys.readouterr()
    assert main(["--checkpoint_path", str(checkpoint), "--max_new_tokens", "2", "--temperature", "0", *flags]) == 0
    return int(re.search(r"\(weights (\d+) MB", capsys.readouterr().err).group(1))


def test_generate_reports_the_bytes_the_quantized_file_holds(smollm2_dir, smollm2_int8, capsys):
    from safetensors.torch import load_file

    file_bytes = sum(t.numel() * t.element_size() for t in load_file(smollm2_int8).values())  # tied: head once
    # fp32, as the file stores its floats (auto would run int8 with bf16 activations, norms and embedding)
    assert reported_weights_mb(capsys, smollm2_int8, "--dtype", "fp32") == round(file_bytes / 1e6)
    assert reported_weights_mb(capsys, smollm2_dir) == round(134_515_008 * 4 / 1e6)  # fp32: 4 bytes a weight


def quantized_tiny(tiny_dir, tmp_path, mode: str, groupsize: int):
    return load_model(quantized_copy(tiny_dir, tmp_path / "tiny", "--mode", mode, "--groupsize", groupsize or 32,
                                     "--quantize_embedding"))


@pytest.mark.slow
@pytest.mark.parametrize("mode, groupsize", [("int8", 0), ("int4", 32)])
def test_compiled_quantized_decode_equals_eager(tiny_dir, tmp_path, mode, groupsize):
    model = quantized_tiny(tiny_dir, tmp_path, mode, groupsize)
    model.setup_caches(1, 64)
    eager, _ = generate(model, [[5, 17, 29]], 12, Sampling(0))
    compiled, _ = generate(model, [[5, 17, 29]], 12, Sampling(0), steps=compile_steps("cpu"))
    assert compiled == eager


@pytest.mark.slow
def test_compiled_int4_decode_of_a_padded_batch_equals_eager(tiny_dir, tmp_path):
    """8 prompts of 1 to 3 tokens, left-padded into one batch: more rows than one, fewer than the matmul's."""
    model = quantized_tiny(tiny_dir, tmp_path, "int4", 32)
    prompts = [[5 + row, 17, 29][:1 + row % 3] for row in range(8)]
    model.setup_caches(len(prompts), 64)
    eager, _ = generate(model, prompts, 12, Sampling(0))
    compiled, _ = generate(model, prompts, 12, Sampling(0), steps=compile_steps("cpu"))
    assert compiled == eager
