"""Convert a Hugging Face Llama-family model directory (Llama, Mistral, Qwen2 / Qwen2.5, Mixtral) into a brisk
checkpoint directory:

    checkpoints/NAME/model.safetensors   weights renamed to brisk's modules (no permutation needed)
    checkpoints/NAME/config.json         the source's shape, as brisk reads it
    checkpoints/NAME/tokenizer.model     (sentencepiece), or tokenizer.tiktoken + tokenizer_config.json
    checkpoints/NAME/chat_template.jinja if the source has a chat template

Usage: python scripts/convert_hf_checkpoint.py HF_DIR [--out checkpoints/NAME] [--dtype bfloat16]
"""
import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import save_config, save_safetensors  # noqa: E402
from cli import UsageError, fail  # noqa: E402
from model_args import ModelArgs  # noqa: E402
from tokenizer import DIGITS_PATTERN, GPT2_PATTERN, byte_level_ranks, save_tiktoken, write_atomic  # noqa: E402

LAYER_NAMES = {
    "input_layernorm": "attention_norm", "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
    "block_sparse_moe.gate": "feed_forward.gate",  # Mixtral's router
}
# Mixtral's experts, one tensor each, concatenated into one layer per block and projection (brisk's Experts)
EXPERT_NAME = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "mixtral")


def brisk_name(hf_name: str):
    """brisk's name for a Hugging Face tensor name, or None for tensors brisk recomputes (rotary tables)."""
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    expert = EXPERT_NAME.fullmatch(hf_name)
    if expert:
        return f"layers.{expert.group(1)}.feed_forward.experts.{expert.group(3)}.weight"
    found = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)  # biases: Qwen2's q/k/v
    if found and found.group(2) in LAYER_NAMES:
        return f"layers.{found.group(1)}.{LAYER_NAMES[found.group(2)]}.{found.group(3)}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    raise UsageError(f"unexpected tensor {hf_name!r}: this is not a plain Llama-family checkpoint")


def expert_number(hf_name: str) -> int:
    expert = EXPERT_NAME.fullmatch(hf_name)
    return int(expert.group(2)) if expert else -1


def source_tensors(hf_dir: Path) -> dict:
    """name -> a function loading that tensor, over every weight file; each file is memory-mapped,
    so no more than one tensor at a time is materialised."""
    from safetensors import safe_open

    loaders = {}
    safetensors_files = sorted(hf_dir.glob("*.safetensors"))
    for file in safetensors_files:
        handle = safe_open(file, framework="pt")
        for name in handle.keys():
            loaders[name] = lambda handle=handle, name=name: handle.get_tensor(name)
    if not safetensors_files:
        for file in sorted(hf_dir.glob("pytorch_model*.bin")):
            state_dict = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            loaders.update({name: lambda tensor=tensor: tensor for name, tensor in state_dict.items()})
    if not loaders:
        raise UsageError(f"no *.safetensors or pytorch_model*.bin weights in {hf_dir}")
    return loaders


def bpe_pattern(pre_tokenizer: dict):
    """The single regex equal to a tokenizer.json byte-level pre-tokenizer, or None if there is none."""
    parts = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    kinds = [part["type"] for part in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True) and not parts[0].get("add_prefix_space"):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return DIGITS_PATTERN
    if (kinds == ["Split", "ByteLevel"] and parts[0].get("behavior") == "Isolated"
            and "Regex" in parts[0]["pattern"] and not parts[1].get("use_regex", True)):
        return parts[0]["pattern"]["Regex"]  # Llama 3 and its descendants
    return None


def adds_bos(tokenizer_json: dict, tokenizer_config: dict) -> bool:
    if "add_bos_token" in tokenizer_config:
        return bool(tokenizer_config["add_bos_token"])
    processor = tokenizer_json.get("post_processor") or {}
    processors = processor.get("processors", [processor])
    return any(p.get("type") == "TemplateProcessing" and "SpecialToken" in p["single"][0] for p in processors)


def token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def convert_tokenizer(hf_dir: Path, out_dir: Path):
    tokenizer_config_file = hf_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_file.read_text()) if tokenizer_config_file.is_file() else {}
    chat_template = tokenizer_config.get("chat_template")
    if (hf_dir / "chat_template.jinja").is_file():
        chat_template = (hf_dir / "chat_template.jinja").read_text()
    if isinstance(chat_template, list):  # several named templates: use the default one
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    if chat_template:
        write_atomic(out_dir / "chat_template.jinja", chat_template)
    names = {"bos_token": token_text(tokenizer_config.get("bos_token")),
             "eos_token": token_text(tokenizer_config.get("eos_token"))}

    if (hf_dir / "tokenizer.model").is_file() and not (hf_dir / "tokenizer.json").is_file():
        shutil.copyfile(hf_dir / "tokenizer.model", out_dir / "tokenizer.model")
        config = {key: value for key, value in names.items() if value}
        config["add_bos_token"] = tokenizer_config.get("add_bos_token", True)
        write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=2))
        return
    if not (hf_dir / "tokenizer.json").is_file():
        raise UsageError(f"no tokenizer.json or tokenizer.model in {hf_dir}")
    tokenizer_json = json.loads((hf_dir / "tokenizer.json").read_text())
    special = {token["content"]: token["id"] for token in tokenizer_json.get("added_tokens", [])}
    config = {**names, "special_tokens": special, "add_bos_token": adds_bos(tokenizer_json, tokenizer_config)}
    model = tokenizer_json["model"]
    pattern = bpe_pattern(tokenizer_json.get("pre_tokenizer"))
    # Unicode NFC before pre-tokenizing (Qwen2) is reproduced; another normalizer keeps tokenizer.json
    normalizer = (tokenizer_json.get("normalizer") or {}).get("type")
    if model["type"] == "BPE" and pattern is not None and normalizer in (None, "NFC"):
        try:
            save_tiktoken(out_dir, byte_level_ranks(model["vocab"], model["merges"], special),
                          {"pattern": pattern, **({"normalizer": normalizer} if normalizer else {}), **config})
            return
        except ValueError as error:
            print(f"note: {error}; keeping tokenizer.json", file=sys.stderr)
    # No exact tiktoken equivalent: keep tokenizer.json, run by the `tokenizers` library.
    if (hf_dir / "tokenizer.model").is_file():
        shutil.copyfile(hf_dir / "tokenizer.model", out_dir / "tokenizer.model")
        config["add_bos_token"] = tokenizer_config.get("add_bos_token", True)
        write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=2))
        return
    shutil.copyfile(hf_dir / "tokenizer.json", out_dir / "tokenizer.json")
    write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=2))


def convert(hf_dir, out_dir, dtype=None):
    """dtype None keeps the source's precision."""
    from tqdm import tqdm

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not (hf_dir / "config.json").is_file():
        raise UsageError(f"no config.json in {hf_dir}: expected a Hugging Face model directory")
    hf_config = json.loads((hf_dir / "config.json").read_text())
    if hf_config.get("model_type") not in SUPPORTED_TYPES:
        raise UsageError(f"model_type {hf_config.get('model_type')!r} is not Llama-family "
                         f"(supported: {', '.join(SUPPORTED_TYPES)})")
    try:
        args = ModelArgs.from_hf_config(hf_config)
    except (KeyError, ValueError) as error:
        raise UsageError(f"{hf_dir / 'config.json'}: {error}") from None

    loaders = source_tensors(hf_dir)
    sources = {}  # brisk name -> its Hugging Face tensors: one, or a layer's experts in their order
    for hf_name in sorted(loaders, key=expert_number):
        sources.setdefault(brisk_name(hf_name), []).append(hf_name)
    sources.pop(None, None)
    if args.tie_embeddings:
        sources.pop("output.weight", None)

    def tensor(name):  # a memory-mapped view, or a layer's experts one after another
        views = [loaders[hf_name]() for hf_name in sources[name]]
        return torch.cat(views) if len(views) > 1 else views[0]

    metas = {name: loaders[hf_names[0]]() for name, hf_names in sources.items()}
    dtype = dtype or next(iter(metas.values())).dtype
    shapes = {name: ((len(sources[name]) * metas[name].shape[0], *metas[name].shape[1:]),
                     dtype if metas[name].is_floating_point() else metas[name].dtype) for name in sorted(metas)}
    out_dir.mkdir(parents=True, exist_ok=True)
    convert_tokenizer(hf_dir, out_dir)
    converted = ((name, tensor(name).to(shapes[name][1])) for name in tqdm(shapes, desc="converting", unit="tensor"))
    save_safetensors(out_dir / "model.safetensors", shapes, converted, {"format": "pt", "source": hf_dir.name})
    save_config(args, out_dir)
    return out_dir / "model.safetensors"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("--out", type=Path, help="output directory (default: checkpoints/<directory name>)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the source's")
    options = parser.parse_args(argv)
    out_dir = options.out or Path("checkpoints") / options.hf_dir.resolve().name
    try:
        written = convert(options.hf_dir, out_dir, options.dtype and getattr(torch, options.dtype))
    except UsageError as error:
        return fail(str(error))
    print(f"wrote {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
