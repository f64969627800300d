"""Convert a GGUF file (llama.cpp's format; architectures "llama" and "qwen2") into a brisk checkpoint
directory:

    checkpoints/NAME/model.safetensors   weights, dequantized with the `gguf` package
    checkpoints/NAME/config.json         the model's shape, Hugging Face style
    checkpoints/NAME/tokenizer.tiktoken  + tokenizer_config.json (byte-level BPE), or tokenizer.model
                                         (sentencepiece), or tokenizer.json: rebuilt from the GGUF
                                         metadata by scripts/gguf_vocab.py
    checkpoints/NAME/chat_template.jinja if the GGUF has one

Usage: python scripts/convert_gguf.py MODEL.gguf [--out checkpoints/NAME] [--dtype float32]
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import save_config, save_safetensors  # noqa: E402
from cli import UsageError, fail  # noqa: E402
from model import rope_frequencies  # noqa: E402
from model_args import LLAMA31_ROPE, LLAMA32_ROPE, ModelArgs  # noqa: E402
from quantized_layers import INT4_PACKING  # noqa: E402
from scripts.gguf_vocab import field, tokenizer_files  # noqa: E402

# llama.cpp's tensor names -> brisk's (blk.N.* are per layer)
TENSOR_NAMES = {
    "token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
    "attn_output": "attention.wo", "ffn_norm": "ffn_norm", "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2",
    # Mixtral's router, and its experts stacked (n_experts, out, in): brisk's one layer of n_experts * out rows
    "ffn_gate_inp": "feed_forward.gate", "ffn_gate_exps": "feed_forward.experts.w1",
    "ffn_up_exps": "feed_forward.experts.w3", "ffn_down_exps": "feed_forward.experts.w2",
}
ARCHITECTURES = ("llama", "qwen2")  # Llama and Mistral files both say "llama"
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def required(reader, key):
    value = field(reader, key)
    if value is None:
        raise UsageError(f"the GGUF has no {key!r} metadata: it is incomplete or not a llama.cpp model file")
    return value


def model_args(reader) -> ModelArgs:
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UsageError(f"GGUF architecture {arch!r} is not a Llama-family model (expected one of "
                         f"{', '.join(ARCHITECTURES)})")
    names = {tensor.name for tensor in reader.tensors}
    n_heads = required(reader, f"{arch}.attention.head_count")
    args = ModelArgs(
        dim=required(reader, f"{arch}.embedding_length"),
        n_layers=required(reader, f"{arch}.block_count"),
        n_heads=n_heads,
        n_kv_heads=field(reader, f"{arch}.attention.head_count_kv", n_heads),
        intermediate_size=required(reader, f"{arch}.feed_forward_length"),
        vocab_size=field(reader, f"{arch}.vocab_size") or len(required(reader, "tokenizer.ggml.tokens")),
        head_dim=field(reader, f"{arch}.attention.key_length"),
        norm_eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_base=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_seq_length=field(reader, f"{arch}.context_length", 4096),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        n_experts=field(reader, f"{arch}.expert_count", 0),
        experts_per_token=field(reader, f"{arch}.expert_used_count", 2),
    )
    if "rope_freqs.weight" in names:
        args.rope_scaling = rope_scaling(next(t for t in reader.tensors if t.name == "rope_freqs.weight"), args)
    return args


def rope_scaling(tensor, args: ModelArgs) -> dict:
    """Llama 3.1 and 3.2 GGUF files store their rope scaling as the factor each frequency is divided by
    (`rope_freqs.weight`), not as its parameters: those are found among the known scalings."""
    stored = torch.from_numpy(tensor.data.copy()).float()
    for scaling in (LLAMA31_ROPE, LLAMA32_ROPE):
        candidate = dataclasses.replace(args, rope_scaling=scaling)
        factors = rope_frequencies(dataclasses.replace(args, rope_scaling=None)) / rope_frequencies(candidate)
        if factors.shape == stored.shape and torch.allclose(factors, stored, rtol=1e-4):
            return scaling
    raise UsageError("this GGUF's rope frequency factors (rope_freqs.weight) match neither Llama 3.1's nor "
                     "Llama 3.2's rope scaling: convert the Hugging Face directory, whose config.json names it")


def brisk_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")  # e.g. blk.3.attn_q.weight, or output_norm.weight
    layer = parts[2] if parts[0] == "blk" else parts[0]
    if layer not in TENSOR_NAMES or len(parts) != (4 if parts[0] == "blk" else 2):
        # e.g. blk.0.ffn_gate.3.weight: Mixtral files from before llama.cpp stacked the experts
        raise UsageError(f"unexpected GGUF tensor {gguf_name!r}: brisk reads llama.cpp's current Llama-family "
                         "tensors (experts stacked in ffn_*_exps); convert the Hugging Face directory instead")
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{TENSOR_NAMES[parts[2]]}.{parts[3]}"
    return f"{TENSOR_NAMES[parts[0]]}.{parts[1]}"


def brisk_shape(tensor) -> tuple:
    """GGUF lists dimensions innermost first; stacked experts (n, out, in) become one layer's (n * out, in)."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return (shape[0] * shape[1], shape[2]) if len(shape) == 3 else shape


def unpermute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp stores Q and K rows with each head's two rotary halves interleaved (pairs 0,1 / 2,3 ...,
    Meta's layout); brisk uses Hugging Face's rotate-half layout (dims i and i + head_dim/2 pair up).
    This is the inverse of the permutation llama.cpp's converter applies, to a weight or a bias."""
    rows = weight.shape[0]
    columns = weight.reshape(rows, -1)
    return columns.reshape(n_heads, rows // n_heads // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def interleaved_heads(gguf_name: str, args: ModelArgs, arch: str):
    """The number of heads whose rows llama.cpp interleaved in this tensor (Q and K of its 'llama'
    architecture, weights and biases alike), else None: its 'qwen2' keeps Hugging Face's layout."""
    if arch == "llama" and ".attn_q." in gguf_name:
        return args.n_heads
    if arch == "llama" and ".attn_k." in gguf_name:
        return args.n_kv_heads
    return None


def dequantized(tensor, heads) -> torch.Tensor:
    from gguf.quants import dequantize

    weight = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
    return weight if heads is None else unpermute(weight, heads)


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
    args, arch = model_args(reader), field(reader, "general.architecture")
    types = [tensor.tensor_type.name for tensor in reader.tensors if len(tensor.shape) > 1]
    if dtype is None:
        dtype = FLOAT_TYPES[types[0]] if len(set(types)) == 1 and types[0] in FLOAT_TYPES else torch.float32
    kept = {tensor.name for tensor in reader.tensors if keep_quantized and keepable(tensor)}
    if keep_quantized and not kept:
        raise UsageError(f"--keep_quantized: {gguf_path.name} has no Q8_0, Q4_0 or Q4_1 tensors to keep")
    tensors = [tensor for tensor in reader.tensors if tensor.name != "rope_freqs.weight"]  # (read as rope_scaling)
    names = {tensor.name: brisk_name(tensor.name) for tensor in tensors}  # an unexpected one is refused here
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_files(reader, out_dir)

    def layer_of(tensor):  # a kept embedding is a quantized table, looked up row by row
        name = names[tensor.name].rsplit(".", 1)[0]
        return "tok_embeddings.table" if name == "tok_embeddings" and tensor.name in kept else name

    tensors = sorted(tensors, key=layer_of)
    shapes = {}
    for tensor in tensors:
        if tensor.name in kept:
            shapes.update({f"{layer_of(tensor)}.{part}": shape for part, shape in kept_shapes(tensor).items()})
        else:
            shapes[names[tensor.name]] = (brisk_shape(tensor), dtype)

    def converted():
        for tensor in tqdm(tensors, desc=f"converting {gguf_path.name}", unit="tensor"):
            heads = interleaved_heads(tensor.name, args, arch)
            if tensor.name not in kept:
                yield names[tensor.name], dequantized(tensor, heads).to(dtype).reshape(brisk_shape(tensor))
                continue
            for part, value in kept_blocks(tensor, heads).items():
                yield f"{layer_of(tensor)}.{part}", value

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
