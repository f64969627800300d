"""Write a checkpoint of random weights in the shape of a known model, for benchmarks where only the
shape matters: models larger than memory (--offload) or split across processes (tp.py). Tensors are
made and written one at a time, so a checkpoint larger than RAM can be written.

    python scripts/random_checkpoint.py SmolLM2-1.7B checkpoints/random-SmolLM2-1.7B

The tokenizer is copied from --tokenizer_from (the default SmolLM2 checkpoint), so that generate.py
can encode a prompt; the text it prints is noise.
"""
import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import save_config, save_safetensors, unique_state_dict  # noqa: E402
from model import Transformer  # noqa: E402
from model_args import ModelArgs  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.tiktoken", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja")


def random_tensors(shapes: dict, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for name, (shape, dtype) in shapes.items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype)
        else:
            yield name, (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def write(name: str, directory: Path, tokenizer_from: Path, dtype: torch.dtype, seed: int = 0) -> Path:
    args = ModelArgs.from_name(name)
    tokenizer = load_tokenizer(tokenizer_from)
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"the tokenizer at {tokenizer_from} has {tokenizer.vocab_size} tokens, more than "
                         f"{name}'s {args.vocab_size}: pass a matching --tokenizer_from")
    with torch.device("meta"):
        model = Transformer(args)
    shapes = {key: (tuple(tensor.shape), dtype) for key, tensor in unique_state_dict(model).items()}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.safetensors"
    save_safetensors(path, shapes, random_tensors(shapes, seed))
    save_config(args, directory)
    source = tokenizer_from if tokenizer_from.is_dir() else tokenizer_from.parent
    for file in TOKENIZER_FILES:
        if (source / file).is_file():
            shutil.copy(source / file, directory / file)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a known model name, e.g. SmolLM2-1.7B or Llama-2-7B")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--tokenizer_from", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct"))
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        path = write(args.name, args.directory, args.tokenizer_from, dtype)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
