"""Shared fixtures: the embedded SmolLM2 converted once per session, independent references built with
Hugging Face transformers / tokenizers / gguf, and a tiny random Llama saved as a Hugging Face directory."""
import http.client
import importlib.util
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

import cpu_kernels  # noqa: E402
import quantize  # noqa: E402
import api  # noqa: E402
from checkpoint import load_model  # noqa: E402
from engine import Engine, ModelRunner  # noqa: E402
from generation import generate  # noqa: E402
from prepare import prepare  # noqa: E402
from sampling import Sampling  # noqa: E402
from scheduler import FirstComeFirstServed  # noqa: E402
from scripts.convert_gguf import convert as convert_gguf  # noqa: E402
from scripts.convert_hf_checkpoint import convert as convert_hf  # noqa: E402
from scripts.prepare_default import GGUF_NAME, embedded_gguf  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each test compiles as a fresh process would: Dynamo keeps compiled graphs per function (8 at most,
    then fails under fullgraph), and every model, batch size and attended length of earlier tests is one."""
    torch._dynamo.reset()


@pytest.fixture(scope="session", autouse=True)
def package_cache(tmp_path_factory):
    """The decode steps built ahead of time (aot_step.py) that tests build and load: in a directory of this
    session's, not the user's cache, whose packages a plain generate.py run would otherwise pick up."""
    directory = tmp_path_factory.mktemp("brisk-cache")
    previous, os.environ["BRISK_CACHE_DIR"] = os.environ.get("BRISK_CACHE_DIR"), str(directory)
    yield directory
    if previous is None:
        del os.environ["BRISK_CACHE_DIR"]
    else:
        os.environ["BRISK_CACHE_DIR"] = previous


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


def split_then_byte_level(pattern: str):
    """The pre-tokenizer of Llama 3 and Qwen2: an isolating regex split, then bytes without a regex."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# Text where pre-tokenizers and normalizers part ways
HARD_CASES = ["cafe\u0301 re\u0301sume\u0301", "\u0301<|im_end|>\u0301e\u0301", "Ａｍｅｌｉｅ ﬁne ½", "12345 1,000.5",
              "北京欢迎你 🙂👍🏽", "a\r\nb \r\n\r\n  c", "it's THEY'RE  \t\tx", "<|im_start|>user\nhi<|im_end|>",
              "camelCaseHTTPServer a/b//c", "カタカナ ひらがな 한국어", "$100 + 2^10 = ~x; «ok»", "trailing   "]


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
def tiny_mixtral_hf_dir(tmp_path_factory) -> Path:
    """A random Mixtral (GQA, 4 experts of which each token takes 2) saved by transformers."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = {key: value for key, value in TINY_HF_CONFIG.items() if key != "rope_scaling"}
    torch.manual_seed(0)
    # experts 128 wide, so that each of two ranks holds whole int4 groups of 32
    model = MixtralForCausalLM(MixtralConfig(**{**config, "tie_word_embeddings": False, "intermediate_size": 128,
                                                "num_local_experts": 4, "num_experts_per_tok": 2}))
    return save_random_hf_model(model, tmp_path_factory.mktemp("hf") / "tiny-mixtral")


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tiny_mixtral_hf_dir, tmp_path_factory) -> Path:
    return convert_hf(tiny_mixtral_hf_dir, tmp_path_factory.mktemp("checkpoints") / "tiny-mixtral").parent


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_qwen2_hf_dir, tmp_path_factory) -> Path:
    return convert_hf(tiny_qwen2_hf_dir, tmp_path_factory.mktemp("checkpoints") / "tiny-qwen2").parent


@pytest.fixture(scope="session")
def qwen2_reference(tiny_qwen2_hf_dir):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(tiny_qwen2_hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def mixtral_reference(tiny_mixtral_hf_dir):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(tiny_mixtral_hf_dir, dtype=torch.float32).eval()


IDS = list(range(3, 200, 3))  # a prompt of the tiny models' vocabulary


def forward_logits(model, ids: list) -> torch.Tensor:
    """One full forward of ids from position 0, on a fresh cache."""
    model.setup_caches(1, 256)
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids)))[0]


@pytest.fixture(scope="session")
def tiny_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    return convert_hf(tiny_hf_dir, tmp_path_factory.mktemp("checkpoints") / "tiny-llama").parent


@pytest.fixture(scope="session")
def tiny_reference(tiny_hf_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()


def dequantized_twin(float_model, quantized):
    """The float model given the quantized model's weights, dequantized (biases kept as they are): what the
    quantized model should compute, whatever kernels it runs. Layers the quantized model keeps in floating
    point (a mixture's router) stay as they are."""
    for name, linear in float_model.named_modules():
        form = quantized
        for part in filter(None, name.split(".")):  # through device forms, which hold the plain module as .layer
            form = getattr(form, part) if hasattr(form, part) else getattr(form.layer, part)
        if isinstance(linear, nn.Linear) and name != "output" and not isinstance(form, nn.Linear):
            layer = getattr(form, "form", form)  # model.BiasAfter holds the form, the form the layer
            layer = getattr(layer, "layer", layer)
            linear.weight.data = layer.dequantized()[:, :linear.in_features].float()
    return float_model


def llama_cpp_permute(weight, n_heads):
    """What llama.cpp's converter does to Q and K rows, weights and biases (Hugging Face rotate-half ->
    interleaved pairs)."""
    rows = weight.shape[0]
    columns = weight.reshape(rows, -1)
    return columns.reshape(n_heads, 2, rows // n_heads // 2, -1).transpose(1, 2).reshape(weight.shape)


# Hugging Face Llama / Qwen2 tensor names -> llama.cpp's
GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "block_sparse_moe.gate": "ffn_gate_inp"}
# Mixtral's experts, which llama.cpp stacks into one tensor per layer and projection
GGUF_EXPERT_NAMES = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def save_hf_model_as_gguf(hf_dir: Path, path: Path, arch: str, pre: str, extra_tensors=None) -> Path:
    """A transformers model directory written as llama.cpp's converter writes it: F32 tensors under GGUF
    names (Q and K rows interleaved for the 'llama' architecture), the shape under `arch`, the byte-level
    vocabulary with its pre-tokenizer's name."""
    from gguf import GGUFWriter
    from safetensors.torch import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    n_heads, n_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = GGUFWriter(path, arch)
    writer.add_block_count(config["num_hidden_layers"]), writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"]), writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_heads), writer.add_head_count_kv(n_kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base((config.get("rope_parameters") or config)["rope_theta"])
    vocab_json = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = vocab_json["model"]["vocab"]
    special = {token["content"] for token in vocab_json["added_tokens"]}
    writer.add_tokenizer_model("gpt2"), writer.add_tokenizer_pre(pre)
    writer.add_token_list(sorted(vocab, key=vocab.get))
    writer.add_token_types([3 if token in special else 1 for token in sorted(vocab, key=vocab.get)])
    writer.add_token_merges([" ".join(merge) for merge in vocab_json["model"]["merges"]])
    if config.get("num_local_experts"):
        writer.add_expert_count(config["num_local_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
    tensors = load_file(hf_dir / "model.safetensors")
    experts = {}
    for name in [name for name in tensors if ".experts." in name]:
        parts = name.split(".")  # model.layers.L.block_sparse_moe.experts.E.wX.weight
        experts.setdefault(f"blk.{parts[2]}.{GGUF_EXPERT_NAMES[parts[6]]}.weight", {})[int(parts[5])] = tensors.pop(name)
    for name, stacked in experts.items():
        writer.add_tensor(name, torch.stack([stacked[i] for i in sorted(stacked)]).float().numpy())
    for name, tensor in sorted(tensors.items()):
        parts = name.split(".")
        if parts[1] == "layers":
            projection = GGUF_NAMES[".".join(parts[3:-1])]
            heads = {"attn_q": n_heads, "attn_k": n_kv_heads}.get(projection) if arch == "llama" else None
            tensor = llama_cpp_permute(tensor, heads) if heads else tensor
            name = f"blk.{parts[2]}.{projection}.{parts[-1]}"
        else:
            name = f"{GGUF_NAMES[name.rsplit('.', 1)[0]]}.{parts[-1]}"
        writer.add_tensor(name, tensor.float().numpy())
    for name, tensor in (extra_tensors or {}).items():
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return path


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


class AtenCalls(TorchDispatchMode):
    """The operators (aten's, and brisk's kernels) run eagerly inside the block: names ("rms_norm"), and
    qualified (aten's "aten::mean", brisk's "brisk::rms_norm")."""

    def __init__(self):
        super().__init__()
        self.names, self.qualified = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        self.names.add(name)
        self.qualified.add(f"{func.namespace}::{name}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def plain_layers(monkeypatch):
    """Quantized layers loaded in this test compute with their plain (dequantized) products, exactly, instead of
    brisk's CPU kernels, which round the activations to int8 (as BRISK_CPU_KERNELS=off does for a process)."""
    monkeypatch.setattr(cpu_kernels, "native_kernels", lambda: False)


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


def greedy_alone(model, prompt: list, max_tokens: int) -> list:
    """What generate.py's loop gives one prompt alone, greedy, the model's stop ids left out (as a server
    decodes past them here: ignore_eos)."""
    model.setup_caches(1, model.args.max_seq_length)
    ids, _ = generate(model, [prompt], max_tokens, Sampling(temperature=0.0))
    return ids[0]


def run_engine(engine: Engine, requests: list, timeout_s: float = 60) -> list:
    """Submit every request, then run the loop on its thread until each has finished, and stop it: each
    request's (token ids, finish reason)."""
    for request in requests:
        engine.submit(request)
    loop = threading.Thread(target=engine.run)
    loop.start()
    results = []
    try:
        for request in requests:
            ids = []
            while not isinstance(event := request.events.get(timeout=timeout_s), str):
                ids.append(event)
            results.append((ids, event))
    finally:
        engine.stop()
        loop.join(timeout_s)
    return results


def running_server(checkpoint_dir, slots: int, max_waiting: int = 8, api_key=None, loop: bool = True,
                   cors_origin=None, limits=api.Limits()):
    """serve.py's server (api.py over an eager engine) on a free port of 127.0.0.1, yielded as (server, engine,
    tokenizer, model) and stopped after. loop: run the engine's loop (a test may drive it by hand instead)."""
    model, tokenizer = prepare(load_model(checkpoint_dir), "cpu"), load_tokenizer(checkpoint_dir)
    http_server = api.Server(("127.0.0.1", 0), api_key, cors_origin, limits)
    engine = Engine(ModelRunner(model, rows=slots, max_seq_length=model.args.max_seq_length), FirstComeFirstServed(),
                    prefill_chunk=64, max_waiting=max_waiting)
    http_server.tokenizer, http_server.model_name, http_server.engine = tokenizer, checkpoint_dir.name, engine
    threads = [threading.Thread(target=http_server.serve_forever)] + ([threading.Thread(target=engine.run)] * loop)
    for thread in threads:
        thread.start()
    try:
        yield http_server, engine, tokenizer, model
    finally:
        http_server.shutdown()
        http_server.server_close()
        engine.stop()
        for thread in threads:
            thread.join(30)


def client(http_server, api_key="unused"):
    """The official openai client of a running_server."""
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{http_server.server_port}/v1", api_key=api_key,
                         max_retries=0, timeout=60)


def raw(http_server, method: str, path: str, body=None, headers=None):
    """(status, parsed JSON body, headers) of one plain HTTP request."""
    connection = http.client.HTTPConnection("127.0.0.1", http_server.server_port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, json.loads(payload) if payload.startswith(b"{") else payload, dict(response.headers)
