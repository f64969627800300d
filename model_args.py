"""The shape of a Llama-family model (ModelArgs): from the name of a well-known checkpoint (KNOWN_MODELS, at
the bottom), from a Hugging Face config.json, and back to one (the config.json written beside every
converted checkpoint). model.py builds the transformer of a shape."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # fewer than n_heads: grouped-query attention
    intermediate_size: int = 11008
    vocab_size: int = 32000
    head_dim: Optional[int] = None  # usually dim // n_heads; a few models set it explicitly
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama 3.1 style: factor, low/high_freq_factor, original length
    max_seq_length: int = 4096  # the longest context the model was trained for
    tie_embeddings: bool = False  # output head shares the token embedding (SmolLM2, Llama 3.2)
    qkv_bias: bool = False  # the query, key and value projections add a learned bias (Qwen2)
    n_experts: int = 0  # a mixture of this many feed-forward experts in every block (Mixtral); 0: one
    experts_per_token: int = 2  # how many experts each token is routed to

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        by_lower_name = {known.lower(): known for known in KNOWN_MODELS}
        if name.lower() not in by_lower_name:
            raise ValueError(f"unknown model name {name!r}; known names: {', '.join(KNOWN_MODELS)}")
        return cls(**KNOWN_MODELS[by_lower_name[name.lower()]])

    @classmethod
    def from_hf_config(cls, config) -> "ModelArgs":
        """Read a Hugging Face Llama-like config.json (a path or an already-parsed dict): model_type "llama",
        "mistral" or "qwen2" (a Llama with biases on the query, key and value projections)."""
        if not isinstance(config, dict):
            config = json.loads(Path(config).read_text())
        if config.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window) is not supported")
        if config.get("attention_bias") or config.get("mlp_bias"):  # Qwen2's q/k/v biases come with its type
            raise ValueError("biases on every attention or feed-forward projection are not supported")
        # transformers 5 writes "rope_parameters" (with rope_theta inside); earlier versions "rope_scaling"
        rope_scaling = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_base = rope_scaling.get("rope_theta", config.get("rope_theta", 10000.0))
        kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if kind not in ("llama3", "default"):
            raise ValueError(f"rope scaling type {kind!r} is not supported (only 'llama3')")
        rope_scaling = {key: value for key, value in rope_scaling.items() if key != "rope_theta"}
        return cls(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads"),
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            head_dim=config.get("head_dim"),
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_base=rope_base,
            rope_scaling=rope_scaling if kind == "llama3" else None,
            max_seq_length=config.get("max_position_embeddings", 4096),
            tie_embeddings=config.get("tie_word_embeddings", False),
            qkv_bias=config.get("model_type") == "qwen2",
            n_experts=config.get("num_local_experts", 0) if config.get("model_type") == "mixtral" else 0,
            experts_per_token=config.get("num_experts_per_tok", 2),
        )

    def to_hf_config(self) -> dict:
        """The config.json written beside every converted checkpoint, readable by from_hf_config."""
        model_type = "qwen2" if self.qkv_bias else "mixtral" if self.n_experts else "llama"
        experts = {"num_local_experts": self.n_experts, "num_experts_per_tok": self.experts_per_token}
        return {
            "architectures": [{"qwen2": "Qwen2", "mixtral": "Mixtral", "llama": "Llama"}[model_type] + "ForCausalLM"],
            "model_type": model_type,
            **(experts if self.n_experts else {}),
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_base,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_seq_length,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
        }


LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
LLAMA32_ROPE = dict(LLAMA31_ROPE, factor=32.0)
_LLAMA3 = dict(vocab_size=128256, rope_base=500000.0, max_seq_length=8192)
_LLAMA31 = dict(_LLAMA3, rope_scaling=LLAMA31_ROPE, max_seq_length=131072)
_MIXTRAL = dict(vocab_size=32000, rope_base=1e6, max_seq_length=32768, n_experts=8, experts_per_token=2)
_QWEN25 = dict(vocab_size=151936, rope_base=1e6, norm_eps=1e-6, max_seq_length=32768, qkv_bias=True)
_SMOLLM2 = dict(vocab_size=49152, rope_base=100000.0, max_seq_length=8192, tie_embeddings=True)

# Shapes of well-known checkpoints, for benchmarks and random-weight runs. Converted checkpoints
# carry their own config.json, which is what loading uses. tests/test_model.py checks each shape's
# parameter count against the published one.
KNOWN_MODELS = {
    "Llama-2-7B": dict(dim=4096, n_layers=32, n_heads=32, intermediate_size=11008),
    "Llama-2-13B": dict(dim=5120, n_layers=40, n_heads=40, intermediate_size=13824),
    "Llama-2-70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672),
    "CodeLlama-7B": dict(dim=4096, n_layers=32, n_heads=32, intermediate_size=11008, vocab_size=32016,
                         rope_base=1e6, max_seq_length=16384),
    "CodeLlama-34B": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, intermediate_size=22016,
                          rope_base=1e6, max_seq_length=16384),
    # v0.1; its 4096-token sliding window is not modelled (later versions come with their config.json)
    "Mistral-7B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                       max_seq_length=32768),
    "Mixtral-8x7B": dict(_MIXTRAL, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336),
    "TinyLlama-1.1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, intermediate_size=5632,
                           max_seq_length=2048),
    "Llama-3-8B": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336),
    "Llama-3-70B": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672),
    "Llama-3.1-8B": dict(_LLAMA31, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336),
    "Llama-3.1-70B": dict(_LLAMA31, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672),
    "Llama-3.1-405B": dict(_LLAMA31, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                           intermediate_size=53248),
    "Llama-3.2-1B": dict(_LLAMA31, rope_scaling=LLAMA32_ROPE, tie_embeddings=True, dim=2048, n_layers=16,
                         n_heads=32, n_kv_heads=8, intermediate_size=8192),
    "Llama-3.2-3B": dict(_LLAMA31, rope_scaling=LLAMA32_ROPE, tie_embeddings=True, dim=3072, n_layers=28,
                         n_heads=24, n_kv_heads=8, intermediate_size=8192),
    "SmolLM2-135M": dict(_SMOLLM2, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536),
    "SmolLM2-360M": dict(_SMOLLM2, dim=960, n_layers=32, n_heads=15, n_kv_heads=5, intermediate_size=2560),
    "SmolLM2-1.7B": dict(_SMOLLM2, rope_base=130000.0, dim=2048, n_layers=24, n_heads=32,
                         intermediate_size=8192),
    "Qwen2.5-0.5B": dict(_QWEN25, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, intermediate_size=4864,
                         tie_embeddings=True),
    "Qwen2.5-1.5B": dict(_QWEN25, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, intermediate_size=8960,
                         tie_embeddings=True),
    "Qwen2.5-7B": dict(_QWEN25, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, intermediate_size=18944,
                       vocab_size=152064),
    # llama2.c's TinyStories models share the classifier with the embedding (15M parameters counted once)
    "stories15M": dict(dim=288, n_layers=6, n_heads=6, intermediate_size=768, max_seq_length=256,
                       tie_embeddings=True),
    "stories42M": dict(dim=512, n_layers=8, n_heads=8, intermediate_size=1376, max_seq_length=1024,
                       tie_embeddings=True),
    "stories110M": dict(dim=768, n_layers=12, n_heads=12, intermediate_size=2048, max_seq_length=1024,
                        tie_embeddings=True),
}
