"""Shared fixtures: the embedded SmolLM2 converted once per session, independent references built with
Hugging Face transformers / tokenizers / gguf, and a tiny random Llama saved as a Hugging Face directory."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

import quantize  # noqa: E402
from checkpoint import load_model  # noqa: E402
from scripts.convert_gguf import convert as convert_gguf  # noqa: E402
from scripts.convert_hf_checkpoint import convert as convert_hf  # noqa: E402
from scripts.prepare_default import GGUF_NAME, embedded_gguf  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each test compiles as a fresh process would: Dynamo keeps compiled graphs per function (8 at most,
    then fails under fullgraph), and every model, batch size and attended length of earlier tests is one."""
    torch._dynamo.reset()


def shared_text(name: str) -> str:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not here (../shared/ exists on development machines and CI only)")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return embedded_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    return convert_gguf(smollm2_gguf, tmp_path_factory.mktemp("checkpoints") / "SmolLM2-135M-Instruct").parent


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf):
    """transformers' own reading of the same GGUF: its own dequantization and Q/K un-permutation."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=GGUF_NAME, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_reference_tokenizer(smollm2_gguf):
    """SmolLM2's tokenizer built with the `tokenizers` library from the GGUF's vocabulary and merges, with
    the pre-tokenizer of SmolLM2's published tokenizer.json (digits isolated, then GPT-2 byte-level).
    transformers' GGUF loader would drop the digit step, so it is assembled here explicitly."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    reader = GGUFReader(smollm2_gguf)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(merge.split(" ")) for merge in reader.fields["tokenizer.ggml.merges"].contents()]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([token for token, kind in zip(tokens, types) if kind == 3])
    return tokenizer


TINY_HF_CONFIG = dict(
    hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=320, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    # Llama 3.1 scaling with a short original context, so that it changes most frequencies
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32},
)


def train_byte_level_bpe(vocab_size: int, special_tokens: list):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = "the quick brown fox jumps over the lazy dog; 1234 apples, 56 pears. " * 50
    tokenizer.train_from_iterator([text, "Hello world! How are you? I am fine, thanks."], trainer)
    return tokenizer


def save_random_hf_model(model, directory: Path) -> Path:
    """A transformers model given random weights, saved with a byte-level BPE tokenizer.json and a ChatML
    template: what a Hugging Face model directory looks like."""
    with torch.no_grad():  # larger than the default init, so that logits differ visibly between positions
        for parameter in model.parameters():
            parameter.normal_(0, 0.2) if parameter.dim() > 1 else parameter.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    tokenizer = train_byte_level_bpe(model.config.vocab_size, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}))
    return directory


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A random Llama (GQA, tied embeddings, Llama 3.1 rope scaling) saved by transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_HF_CONFIG))
    return save_random_hf_model(model, tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2_hf_dir(tmp_path_factory) -> Path:
    """A random Qwen2 (GQA, untied embeddings, biases on q/k/v) saved by transformers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = {key: value for key, value in TINY_HF_CONFIG.items() if key != "rope_scaling"}
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{**config, "tie_word_embeddings": False, "rope_theta": 1e6}))
    return save_random_hf_model(model, tmp_path_factory.mktemp("hf") / "tiny-qwen2")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_qwen2_hf_dir, tmp_path_factory) -> Path:
    return convert_hf(tiny_qwen2_hf_dir, tmp_path_factory.mktemp("checkpoints") / "tiny-qwen2").parent


@pytest.fixture(scope="session")
def tiny_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    return convert_hf(tiny_hf_dir, tmp_path_factory.mktemp("checkpoints") / "tiny-llama").parent


@pytest.fixture(scope="session")
def tiny_reference(tiny_hf_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()


def quantized_copy(checkpoint_dir: Path, directory: Path, *argv) -> Path:
    """checkpoint_dir copied to directory and quantized there by quantize.py's command line (argv: its
    flags, --mode included): the written file's path."""
    shutil.copytree(checkpoint_dir, directory)
    output = directory / "quantized.safetensors"
    assert quantize.main(["--checkpoint_path", str(directory), "--output", str(output), *map(str, argv)]) == 0
    return output


@pytest.fixture(scope="session")
def smollm2_weight(smollm2_dir):
    """A real weight: SmolLM2's first feed-forward gate projection, (1536, 576)."""
    return load_model(smollm2_dir).layers[0].feed_forward.w1.weight.detach().clone()


def filled(layer, weight):
    """A quantized layer filled by rounding weight to nearest."""
    quantize.set_rtn(layer, weight)
    return layer


@pytest.fixture(scope="session")
def smollm2_int8(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2 quantized to int8 (one scale per output channel; the tied embedding stays fp32)."""
    return quantized_copy(smollm2_dir, tmp_path_factory.mktemp("int8") / "smollm2", "--mode", "int8")


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None
