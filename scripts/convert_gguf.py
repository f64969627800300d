"""Convert a GGUF file (llama.cpp's format) into a brisk checkpoint directory:

    checkpoints/NAME/model.safetensors   weights, dequantized with the `gguf` package
    checkpoints/NAME/config.json         the model's shape, Hugging Face style
    checkpoints/NAME/tokenizer.tiktoken  + tokenizer_config.json (byte-level BPE), or tokenizer.model
                                         (sentencepiece), rebuilt from the GGUF metadata
    checkpoints/NAME/chat_template.jinja if the GGUF has one

Usage: python scripts/convert_gguf.py MODEL.gguf [--out checkpoints/NAME] [--dtype float32]
"""
import argparse
import json
import os
import struct
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import save_config, save_safetensors  # noqa: E402
from cli import UsageError, fail  # noqa: E402
from model import ModelArgs  # noqa: E402
from quantized_layers import INT4_PACKING  # noqa: E402
from tokenizer import (DIGITS_PATTERN, GPT2_PATTERN, LLAMA3_PATTERN, byte_level_ranks, save_tiktoken,  # noqa: E402
                       write_atomic)

# llama.cpp's tensor names -> brisk's (blk.N.* are per layer)
TENSOR_NAMES = {
    "token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
    "attn_output": "attention.wo", "ffn_norm": "ffn_norm", "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2",
}
# llama.cpp's name for a byte-level BPE pre-tokenizer -> the regex that reproduces it
PRE_TOKENIZER_PATTERNS = {
    "gpt-2": GPT2_PATTERN, "default": GPT2_PATTERN,
    "smollm": DIGITS_PATTERN, "starcoder": DIGITS_PATTERN,
    "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN,
}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def field(reader, key, default=None):
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def required(reader, key):
    value = field(reader, key)
    if value is None:
        raise UsageError(f"the GGUF has no {key!r} metadata: it is incomplete or not a llama.cpp model file")
    return value


def model_args(reader) -> ModelArgs:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise UsageError(f"GGUF architecture {arch!r} is not a Llama-family model (expected 'llama')")
    if any(tensor.name == "rope_freqs.weight" for tensor in reader.tensors):
        raise UsageError("this GGUF stores Llama 3.1 rope frequency factors, which brisk reads from a "
                         "Hugging Face config.json instead: convert the Hugging Face directory")
    n_heads = required(reader, "llama.attention.head_count")
    n_vocab = field(reader, "llama.vocab_size") or len(required(reader, "tokenizer.ggml.tokens"))
    return ModelArgs(
        dim=required(reader, "llama.embedding_length"),
        n_layers=required(reader, "llama.block_count"),
        n_heads=n_heads,
        n_kv_heads=field(reader, "llama.attention.head_count_kv", n_heads),
        intermediate_size=required(reader, "llama.feed_forward_length"),
        vocab_size=n_vocab,
        head_dim=field(reader, "llama.attention.key_length"),
        norm_eps=float(field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_base=float(field(reader, "llama.rope.freq_base", 10000.0)),
        max_seq_length=field(reader, "llama.context_length", 4096),
        tie_embeddings=not any(tensor.name == "output.weight" for tensor in reader.tensors),
    )


def brisk_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")  # e.g. blk.3.attn_q.weight, or output_norm.weight
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{TENSOR_NAMES[parts[2]]}.{parts[3]}"
    return f"{TENSOR_NAMES[parts[0]]}.{parts[1]}"


def unpermute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp stores Q and K rows with each head's two rotary halves interleaved (pairs 0,1 / 2,3 ...,
    Meta's layout); brisk uses Hugging Face's rotate-half layout (dims i and i + head_dim/2 pair up).
    This is the inverse of the permutation llama.cpp's converter applies."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def dequantized(tensor, args: ModelArgs) -> torch.Tensor:
    from gguf.quants import dequantize

    weight = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
    if tensor.name.endswith("attn_q.weight"):
        weight = unpermute(weight, args.n_heads)
    elif tensor.name.endswith("attn_k.weight"):
        weight = unpermute(weight, args.n_kv_heads)
    return weight


def protobuf_field(number: int, value) -> bytes:
    """One field of protobuf's wire format: ints and bools as varints, floats as fixed32, bytes and
    nested messages length-delimited."""
    def varint(n):
        n &= (1 << 64) - 1  # negative int32s are written as 10-byte two's complement
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    if isinstance(value, float):
        return varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bool, int)):
        return varint(number << 3) + varint(int(value))
    return varint(number << 3 | 2) + varint(len(value)) + value


def sentencepiece_model(reader) -> bytes:
    """A sentencepiece ModelProto (sentencepiece_model.proto) rebuilt from a GGUF's 'llama' vocabulary:
    pieces with their scores and types (GGUF uses sentencepiece's type numbers), a BPE trainer spec with
    byte fallback, and Llama's normalizer (no normalisation, spaces as U+2581, a leading space added)."""
    tokens, scores = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    pieces = b"".join(protobuf_field(1, protobuf_field(1, token.encode()) + protobuf_field(2, float(score))
                                     + protobuf_field(3, int(kind)))
                      for token, score, kind in zip(tokens, scores, types))
    trainer = b"".join([
        protobuf_field(3, 2), protobuf_field(4, len(tokens)), protobuf_field(35, True),  # BPE, vocab size, bytes
        protobuf_field(40, field(reader, "tokenizer.ggml.unknown_token_id", 0)),
        protobuf_field(41, field(reader, "tokenizer.ggml.bos_token_id", -1)),
        protobuf_field(42, field(reader, "tokenizer.ggml.eos_token_id", -1)),
        protobuf_field(43, field(reader, "tokenizer.ggml.padding_token_id", -1))])
    normalizer = b"".join([
        protobuf_field(1, b"identity"), protobuf_field(3, bool(field(reader, "tokenizer.ggml.add_space_prefix", True))),
        protobuf_field(4, False), protobuf_field(5, True)])
    return pieces + protobuf_field(2, trainer) + protobuf_field(3, normalizer)


# GGUF block types that brisk's layouts hold exactly, groups of 32 (llama.cpp's ggml-quants.c):
#   Q8_0: fp16 d, 32 int8 q           w = q * d             -> int8, groupsize 32
#   Q4_0: fp16 d, 16 bytes of nibbles w = (q - 8) * d       -> int4 g32, zero 0
#   Q4_1: fp16 d, fp16 m, 16 bytes    w = q * d + m         -> int4 g32, zero m + 8 d
# Nibbles: byte j holds value j (low) and value j + 16 (high) of its block, as in brisk's int4 files.
KEEPABLE = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}  # bytes per block of 32


def kept_blocks(tensor, n_heads=None) -> dict:
    """A Q8_0 / Q4_0 / Q4_1 tensor as brisk's int8 / int4 tensors (weight, scales[, zeros]), unchanged
    but for the Q/K row order (n_heads given), which applies alike to every per-row tensor. The nibbles
    keep their bytes: brisk packs int4 groups as GGUF does."""
    kind, rows = tensor.tensor_type.name, tensor.data.shape[0]
    blocks = torch.from_numpy(tensor.data.copy()).reshape(rows, -1, KEEPABLE[kind])
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    if kind == "Q8_0":
        parts = {"weight": blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, -1), "scales": d}
    else:
        m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float() if kind == "Q4_1" else None
        nibbles = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]
        zeros = (m + 8 * d) if kind == "Q4_1" else torch.zeros_like(d)
        parts = {"weight": nibbles.reshape(rows, -1), "scales": d, "zeros": zeros}
    if n_heads:
        parts = {name: unpermute(part, n_heads) for name, part in parts.items()}
    return parts


def kept_shapes(tensor) -> dict:
    rows, cols = int(tensor.shape[1]), int(tensor.shape[0])
    if tensor.tensor_type.name == "Q8_0":
        return {"weight": ((rows, cols), torch.int8), "scales": ((rows, cols // 32), torch.float32)}
    return {"weight": ((rows, cols // 2), torch.uint8), "scales": ((rows, cols // 32), torch.float32),
            "zeros": ((rows, cols // 32), torch.float32)}


def keepable(tensor) -> bool:
    return tensor.tensor_type.name in KEEPABLE and len(tensor.shape) == 2


def tokenizer_files(reader, out_dir: Path):
    kind = field(reader, "tokenizer.ggml.model")
    bos, eos = field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")
    if kind == "llama":
        temporary = out_dir / "tokenizer.model.tmp"
        temporary.write_bytes(sentencepiece_model(reader))
        os.replace(temporary, out_dir / "tokenizer.model")
        write_atomic(out_dir / "tokenizer_config.json", json.dumps(
            {"add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", True))}, indent=2))
    elif kind != "gpt2":
        raise UsageError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE and "
                         "'llama' sentencepiece): convert the Hugging Face directory instead")
    else:
        byte_level_tokenizer(reader, out_dir, bos, eos)
    chat_template = field(reader, "tokenizer.chat_template")
    if chat_template:
        write_atomic(out_dir / "chat_template.jinja", chat_template)


def byte_level_tokenizer(reader, out_dir: Path, bos, eos):
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_PATTERNS:
        raise UsageError(f"GGUF pre-tokenizer {pre!r} is not known; known: {', '.join(PRE_TOKENIZER_PATTERNS)}")
    tokens = field(reader, "tokenizer.ggml.tokens")
    token_types = field(reader, "tokenizer.ggml.token_type")
    # token types 3 (control) and 4 (user-defined) are matched whole in text, never BPE-merged
    special = {token: id_ for id_, (token, kind) in enumerate(zip(tokens, token_types)) if kind in (3, 4)}
    ranks = byte_level_ranks({token: id_ for id_, token in enumerate(tokens)},
                             field(reader, "tokenizer.ggml.merges"), special)
    save_tiktoken(out_dir, ranks, {
        "pattern": PRE_TOKENIZER_PATTERNS[pre],
        "special_tokens": special,
        "bos_token": None if bos is None else tokens[bos],
        "eos_token": None if eos is None else tokens[eos],
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
    })


def convert(gguf_path, out_dir, dtype=None, keep_quantized=False):
    """dtype None keeps a float GGUF's own precision and writes dequantized blocks as float32 (exact).
    keep_quantized writes Q8_0 / Q4_0 / Q4_1 blocks as brisk's int8 / int4 layers, values unchanged,
    to model_<type>.safetensors, and dequantizes only the other tensors."""
    from gguf import GGUFReader
    from tqdm import tqdm

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise UsageError(f"no GGUF file at {gguf_path}")
    try:
        reader = GGUFReader(gguf_path)
    except Exception as error:
        raise UsageError(f"cannot read {gguf_path} as GGUF ({error})") from None
    args = model_args(reader)
    types = [tensor.tensor_type.name for tensor in reader.tensors if len(tensor.shape) > 1]
    if dtype is None:
        dtype = FLOAT_TYPES[types[0]] if len(set(types)) == 1 and types[0] in FLOAT_TYPES else torch.float32
    kept = {tensor.name for tensor in reader.tensors if keep_quantized and keepable(tensor)}
    if keep_quantized and not kept:
        raise UsageError(f"--keep_quantized: {gguf_path.name} has no Q8_0, Q4_0 or Q4_1 tensors to keep")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_files(reader, out_dir)

    def name_of(tensor):  # a kept embedding is a quantized table, looked up row by row
        name = brisk_name(tensor.name).rsplit(".", 1)[0]
        return "tok_embeddings.table" if name == "tok_embeddings" and tensor.name in kept else name

    tensors = sorted(reader.tensors, key=name_of)
    shapes = {}
    for tensor in tensors:
        if tensor.name in kept:
            shapes.update({f"{name_of(tensor)}.{part}": shape for part, shape in kept_shapes(tensor).items()})
        else:
            shapes[f"{name_of(tensor)}.weight"] = (tuple(int(n) for n in reversed(tensor.shape)), dtype)

    def converted():
        for tensor in tqdm(tensors, desc=f"converting {gguf_path.name}", unit="tensor"):
            if tensor.name not in kept:
                yield f"{name_of(tensor)}.weight", dequantized(tensor, args).to(dtype)
                continue
            heads = {"attn_q.weight": args.n_heads, "attn_k.weight": args.n_kv_heads}.get(tensor.name.split(".", 2)[-1])
            for part, value in kept_blocks(tensor, heads).items():
                yield f"{name_of(tensor)}.{part}", value

    weights_name = "model.safetensors"
    metadata = {"format": "pt", "source": gguf_path.name}
    if kept:
        main_type = max(set(types), key=types.count)
        weights_name = f"model_{main_type.lower()}.safetensors"
        metadata.update(quantization=f"gguf-{main_type.lower()}", groupsize=32, int4_packing=INT4_PACKING,
                        quantize_embedding=any("token_embd" in name for name in kept))
    save_safetensors(out_dir / weights_name, shapes, converted(), metadata)
    save_config(args, out_dir)
    return out_dir / weights_name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf_path", type=Path)
    parser.add_argument("--out", type=Path, help="output directory (default: checkpoints/<file name>)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="weights' precision (default: the GGUF's float type, or float32 for quantized blocks)")
    parser.add_argument("--keep_quantized", action="store_true",
                        help="keep Q8_0 / Q4_0 / Q4_1 blocks as int8 / int4 layers (groups of 32), values unchanged")
    options = parser.parse_args(argv)
    out_dir = options.out or Path("checkpoints") / options.gguf_path.stem
    try:
        written = convert(options.gguf_path, out_dir, options.dtype and getattr(torch, options.dtype),
                          options.keep_quantized)
    except UsageError as error:
        return fail(str(error))
    print(f"wrote {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
