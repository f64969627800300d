"""Conversion writes exactly the source's tensors, in brisk's names and layout."""
import json
import math

import pytest
import torch
from safetensors import safe_open

from checkpoint import load_model
from cli import UsageError
from conftest import ROOT, TINY_HF_CONFIG, llama_cpp_permute, save_hf_model_as_gguf, save_random_hf_model, shared_text
from quantized_layers import Int4Linear, Int8Linear
from scripts.convert_gguf import brisk_name, convert, unpermute
from scripts.convert_hf_checkpoint import convert as convert_hf
from tokenizer import load_tokenizer


def test_unpermute_inverts_llama_cpp_permutation():
    weight = torch.arange(12 * 5, dtype=torch.float32).reshape(12, 5)
    assert torch.equal(unpermute(llama_cpp_permute(weight, 3), 3), weight)


def test_gguf_tensors_equal_the_gguf_package_dequantization(smollm2_gguf, smollm2_dir):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(smollm2_gguf)
    n_heads, n_kv_heads = 9, 3
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as converted:
        assert len(converted.keys()) == len(reader.tensors) == 272
        for tensor in reader.tensors:
            ours = converted.get_tensor(brisk_name(tensor.name))
            if tensor.name.endswith("attn_q.weight"):
                ours = llama_cpp_permute(ours, n_heads)
            elif tensor.name.endswith("attn_k.weight"):
                ours = llama_cpp_permute(ours, n_kv_heads)
            expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
            assert torch.equal(ours, expected), tensor.name


def test_gguf_config_comes_from_the_metadata(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 100000.0


def test_converted_directory_holds_the_expected_files_and_nothing_half_written(smollm2_dir):
    names = sorted(path.name for path in smollm2_dir.iterdir())
    assert names == ["chat_template.jinja", "config.json", "model.safetensors", "tokenizer.tiktoken",
                     "tokenizer_config.json"]


def test_missing_gguf_is_one_clear_error(tmp_path):
    with pytest.raises(UsageError, match="no GGUF file at"):
        convert(tmp_path / "absent.gguf", tmp_path / "out")


def test_gguf_without_the_model_shape_is_one_clear_error(tmp_path):
    from gguf import GGUFWriter

    writer = GGUFWriter(tmp_path / "bare.gguf", "llama")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UsageError, match="the GGUF has no 'llama.attention.head_count' metadata"):
        convert(tmp_path / "bare.gguf", tmp_path / "out")


LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def llama_cpp_rope_factors(base: float, head_dim: int, scaling: dict) -> torch.Tensor:
    """What llama.cpp's converter stores as rope_freqs.weight for Llama 3.1: the number each rotary
    frequency is divided by (long wavelengths by `factor`, short ones by 1, a smooth band between)."""
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * base ** (i / head_dim)
        if wavelength < scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]:
            factors.append(1.0)
        elif wavelength > scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]:
            factors.append(scaling["factor"])
        else:
            smooth = ((scaling["original_max_position_embeddings"] / wavelength - scaling["low_freq_factor"])
                      / (scaling["high_freq_factor"] - scaling["low_freq_factor"]))
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return torch.tensor(factors)


@pytest.fixture(scope="module")
def llama31_hf_dir(tmp_path_factory):
    """A random Llama with Llama 3.1's rope scaling and base, so that head_dim 16 has frequencies kept,
    slowed eightfold and interpolated."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_HF_CONFIG, "rope_theta": 500000.0, "rope_scaling": dict(LLAMA31_SCALING)})
    return save_random_hf_model(LlamaForCausalLM(config), tmp_path_factory.mktemp("hf") / "llama31")


def test_llama31_gguf_rope_factors_convert_to_its_rope_scaling(llama31_hf_dir, tmp_path):
    from transformers import LlamaForCausalLM

    factors = llama_cpp_rope_factors(500000.0, 16, LLAMA31_SCALING)
    assert 1.0 in factors.tolist() and 8.0 in factors.tolist() and len(set(factors.tolist())) == 3
    gguf_path = save_hf_model_as_gguf(llama31_hf_dir, tmp_path / "l31.gguf", "llama", "llama-bpe",
                                      {"rope_freqs.weight": factors})
    out = convert(gguf_path, tmp_path / "out").parent
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == LLAMA31_SCALING
    ids = list(range(3, 250, 3))
    with torch.no_grad():
        expected = LlamaForCausalLM.from_pretrained(llama31_hf_dir, dtype=torch.float32)(torch.tensor([ids])).logits
        model = load_model(out)
        model.setup_caches(1, 256)
        ours = model(torch.tensor([ids]), torch.arange(len(ids)))
    assert (ours - expected).abs().max().item() <= 1e-4


def test_rope_factors_of_an_unknown_scaling_are_refused_in_one_line(llama31_hf_dir, tmp_path):
    gguf_path = save_hf_model_as_gguf(llama31_hf_dir, tmp_path / "odd.gguf", "llama", "llama-bpe",
                                      {"rope_freqs.weight": torch.full((8,), 2.0)})
    with pytest.raises(UsageError, match="match neither Llama 3.1's nor Llama 3.2's rope scaling"):
        convert(gguf_path, tmp_path / "out")


def test_file_that_is_not_gguf_is_one_clear_error(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UsageError, match="cannot read .* as GGUF"):
        convert(tmp_path / "fake.gguf", tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_hf_conversion_renames_without_changing_values(tiny_hf_dir, tiny_dir):
    with safe_open(tiny_hf_dir / "model.safetensors", framework="pt") as source, \
            safe_open(tiny_dir / "model.safetensors", framework="pt") as converted:
        assert torch.equal(converted.get_tensor("layers.1.attention.wk.weight"),
                           source.get_tensor("model.layers.1.self_attn.k_proj.weight"))
        assert torch.equal(converted.get_tensor("layers.0.feed_forward.w1.weight"),
                           source.get_tensor("model.layers.0.mlp.gate_proj.weight"))
        assert "output.weight" not in converted.keys()  # tied to the embedding


def test_hf_conversion_to_bfloat16(tiny_hf_dir, tmp_path):
    out = convert_hf(tiny_hf_dir, tmp_path / "bf16", torch.bfloat16).parent
    with safe_open(out / "model.safetensors", framework="pt") as converted:
        assert converted.get_tensor("norm.weight").dtype == torch.bfloat16
    assert (out / "chat_template.jinja").read_text().startswith("{% for m in messages %}")


def test_hf_directory_of_another_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UsageError, match="model_type 'gpt2' is not Llama-family"):
        convert_hf(tmp_path, tmp_path / "out")


def test_download_offline_is_one_clear_line(tmp_path):
    import os
    import subprocess
    import sys


    result = subprocess.run([sys.executable, "scripts/download.py", "HuggingFaceTB/SmolLM2-135M-Instruct",
                             "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot download HuggingFaceTB/SmolLM2-135M-Instruct")
    assert result.stderr.count("\n") <= 1 and not (tmp_path / "out").exists()


# A tensor type for each kind of GGUF block; K-quants need rows of 256 values.
MIXED_TYPES = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q8_0",
               "ffn_gate": "Q4_0", "ffn_up": "Q4_1", "ffn_down": "F16", "token_embd": "BF16"}
# where each K-quant block (of 256 values) keeps its fp16 scales: (block bytes, byte offsets of the fp16s)
K_QUANT_SCALES = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def gguf_block(weight, kind):
    """weight (rows, cols) as a GGUF tensor of this type. gguf cannot quantize K-quants in Python, so
    their blocks are random bytes with small, finite fp16 scales: any such block is a valid one."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if kind not in K_QUANT_SCALES:
        return quantize(weight.numpy(), GGMLQuantizationType[kind])
    block_bytes, scale_offsets = K_QUANT_SCALES[kind]
    blocks = np.random.default_rng(0).integers(0, 256, (weight.numel() // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        blocks[:, offset:offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    return blocks.reshape(weight.shape[0], -1)


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    """A small Llama with a sentencepiece vocabulary, one GGUF block type per tensor, Q/K rows in
    llama.cpp's order: what `convert_hf_to_gguf.py` would write for a Llama 2 style model."""
    import sentencepiece
    from gguf import GGMLQuantizationType, GGUFWriter

    directory = tmp_path_factory.mktemp("gguf")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["the quick brown fox jumps over the lazy dog", "hello world, how are you"] * 20),
        model_prefix=str(directory / "spm"), vocab_size=300, model_type="bpe", byte_fallback=True)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "spm.model"))
    dim, n_heads, n_kv_heads, hidden, vocab = 256, 4, 2, 512, processor.get_piece_size()
    writer = GGUFWriter(directory / "mixed.gguf", "llama")
    writer.add_block_count(1), writer.add_context_length(128), writer.add_embedding_length(dim)
    writer.add_feed_forward_length(hidden), writer.add_head_count(n_heads), writer.add_head_count_kv(n_kv_heads)
    writer.add_layer_norm_rms_eps(1e-5), writer.add_rope_freq_base(10000.0), writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([processor.id_to_piece(i) for i in range(vocab)])
    writer.add_token_scores([processor.get_score(i) for i in range(vocab)])
    writer.add_token_types([1 + processor.is_unknown(i) + 2 * processor.is_control(i) + 5 * processor.is_byte(i)
                            for i in range(vocab)])
    writer.add_bos_token_id(processor.bos_id()), writer.add_eos_token_id(processor.eos_id())
    writer.add_unk_token_id(processor.unk_id())
    torch.manual_seed(0)
    shapes = {"attn_q": (dim, dim), "attn_k": (dim // 2, dim), "attn_v": (dim // 2, dim), "attn_output": (dim, dim),
              "ffn_gate": (hidden, dim), "ffn_up": (hidden, dim), "ffn_down": (dim, hidden)}
    for name, shape in shapes.items():
        weight = torch.randn(shape) * 0.05
        if name in ("attn_q", "attn_k"):
            weight = llama_cpp_permute(weight, n_heads if name == "attn_q" else n_kv_heads)
        writer.add_tensor(f"blk.0.{name}.weight", gguf_block(weight, MIXED_TYPES[name]),
                          raw_dtype=GGMLQuantizationType[MIXED_TYPES[name]])
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        writer.add_tensor(name, torch.ones(dim).numpy())
    writer.add_tensor("token_embd.weight", gguf_block(torch.randn(vocab, dim), "BF16"),
                      raw_dtype=GGMLQuantizationType.BF16)
    writer.add_tensor("output.weight", torch.randn(vocab, dim).numpy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return directory / "mixed.gguf", processor


def test_every_block_type_converts_to_the_gguf_package_dequantization(sentencepiece_gguf, tmp_path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    gguf_path, _ = sentencepiece_gguf
    out = convert(gguf_path, tmp_path / "mixed").parent
    with safe_open(out / "model.safetensors", framework="pt") as converted:
        for tensor in GGUFReader(gguf_path).tensors:
            ours = converted.get_tensor(brisk_name(tensor.name))
            if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
                ours = llama_cpp_permute(ours, 4 if "attn_q" in tensor.name else 2)
            expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
            assert torch.equal(ours, expected), (tensor.name, tensor.tensor_type.name)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_sentencepiece_vocabulary_from_gguf_encodes_like_the_original(sentencepiece_gguf, tmp_path):
    gguf_path, processor = sentencepiece_gguf
    tokenizer = load_tokenizer(convert(gguf_path, tmp_path / "mixed"))
    lines = shared_text("tinyshakespeare.txt").split("\n")[:2000]
    assert [tokenizer.encode(line, bos=False) for line in lines] == [processor.encode(line) for line in lines]
    assert tokenizer.encode("hello")[0] == tokenizer.bos_id == processor.bos_id()


@pytest.fixture(scope="module")
def smollm2_kept(smollm2_gguf, smollm2_dir):
    """The embedded GGUF with its Q4_1 blocks and Q8_0 embedding kept as int4 / int8 layers."""
    return convert(smollm2_gguf, smollm2_dir, keep_quantized=True)


def test_kept_blocks_are_the_gguf_values(smollm2_gguf, smollm2_kept):
    from gguf import GGUFReader
    from gguf.quants import dequantize


    assert smollm2_kept.name == "model_q4_1.safetensors"
    model = load_model(smollm2_kept)
    tensors = {tensor.name: tensor for tensor in GGUFReader(smollm2_gguf).tensors}
    # the loaded layers, plain (prepare would give them brisk's kernels, which keep the weights in their own order)
    for gguf_name, layer, heads in [("blk.7.attn_q.weight", model.layers[7].attention.wq, 9),
                                    ("blk.7.attn_k.weight", model.layers[7].attention.wk, 3),
                                    ("blk.29.ffn_down.weight", model.layers[29].feed_forward.w2, None),
                                    ("token_embd.weight", model.output, None)]:
        tensor = tensors[gguf_name]
        expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
        ours = layer.dequantized()[:, :expected.shape[1]]
        ours = llama_cpp_permute(ours, heads) if heads else ours
        assert isinstance(layer, Int8Linear if gguf_name == "token_embd.weight" else Int4Linear)
        assert torch.allclose(ours, expected, rtol=0, atol=1e-6), gguf_name
    assert model.tok_embeddings.table is model.output


def test_kept_model_computes_the_float_model_logits(smollm2_dir, smollm2_kept):
    tokens, positions = torch.tensor([[504, 3575, 282, 4649, 314]]), torch.arange(5)
    logits = []
    for path in (smollm2_dir / "model.safetensors", smollm2_kept):
        model = load_model(path)
        model.setup_caches(1, 8)
        with torch.no_grad():
            logits.append(model(tokens, positions))
    assert (logits[0] - logits[1]).abs().max().item() < 1e-3


def test_keep_quantized_without_keepable_blocks_is_refused(tiny_hf_dir, tmp_path):
    from gguf import GGUFWriter

    writer = GGUFWriter(tmp_path / "f32.gguf", "llama")
    writer.add_block_count(1), writer.add_embedding_length(8), writer.add_head_count(2)
    writer.add_feed_forward_length(16), writer.add_vocab_size(4), writer.add_tokenizer_model("gpt2")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UsageError, match="has no Q8_0, Q4_0 or Q4_1 tensors to keep"):
        convert(tmp_path / "f32.gguf", tmp_path / "out", keep_quantized=True)
