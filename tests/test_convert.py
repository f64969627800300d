"""Conversion writes exactly the source's tensors, in brisk's names and layout."""
import json

import pytest
import torch
from safetensors import safe_open

from scripts.convert_gguf import brisk_name, convert, unpermute


def llama_cpp_permute(weight, n_heads):
    """What llama.cpp's converter does to Q and K rows (Hugging Face rotate-half -> interleaved pairs)."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


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
    with pytest.raises(SystemExit, match="no GGUF file at"):
        convert(tmp_path / "absent.gguf", tmp_path / "out")


def test_file_that_is_not_gguf_is_one_clear_error(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(SystemExit, match="cannot read .* as GGUF"):
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
    from scripts.convert_hf_checkpoint import convert as convert_hf

    out = convert_hf(tiny_hf_dir, tmp_path / "bf16", torch.bfloat16)
    with safe_open(out / "model.safetensors", framework="pt") as converted:
        assert converted.get_tensor("norm.weight").dtype == torch.bfloat16
    assert (out / "chat_template.jinja").read_text().startswith("{% for m in messages %}")


def test_hf_directory_of_another_architecture_is_refused(tmp_path):
    from scripts.convert_hf_checkpoint import convert as convert_hf

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SystemExit, match="model_type 'gpt2' is not Llama-family"):
        convert_hf(tmp_path, tmp_path / "out")


def test_download_offline_is_one_clear_line(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run([sys.executable, "scripts/download.py", "HuggingFaceTB/SmolLM2-135M-Instruct",
                             "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode != 0
    assert result.stderr.startswith("error: cannot download HuggingFaceTB/SmolLM2-135M-Instruct")
    assert result.stderr.count("\n") <= 1 and not (tmp_path / "out").exists()
