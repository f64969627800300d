"""Download a Llama-family model from the Hugging Face hub and convert it into checkpoints/NAME/.

Usage: python scripts/download.py HuggingFaceTB/SmolLM2-360M-Instruct [--dtype bfloat16]
Gated models (Llama) need an access token: set HF_TOKEN or pass --token.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import UsageError, fail  # noqa: E402
from scripts.convert_hf_checkpoint import convert  # noqa: E402

# what conversion reads; other files (original/ weights, ONNX, GGUF copies) are not fetched
WANTED = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def download(repo_id: str, token=None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=WANTED, token=token))
    except GatedRepoError:
        raise UsageError(f"{repo_id} is gated: accept its licence on the hub, then set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UsageError(f"no model {repo_id!r} on the hub (or it is private: set HF_TOKEN)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        reason = str(error).splitlines()[0]
        raise UsageError(f"cannot download {repo_id} from the Hugging Face hub ({reason}); "
                         "check the network, or convert a local copy with scripts/convert_hf_checkpoint.py") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo_id", help="e.g. HuggingFaceTB/SmolLM2-360M-Instruct")
    parser.add_argument("--out", type=Path, help="output directory (default: checkpoints/<model name>)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the source's")
    parser.add_argument("--token", help="Hugging Face access token (default: $HF_TOKEN)")
    options = parser.parse_args(argv)
    out_dir = options.out or Path("checkpoints") / options.repo_id.split("/")[-1]
    try:
        written = convert(download(options.repo_id, options.token), out_dir,
                          options.dtype and getattr(torch, options.dtype))
    except UsageError as error:
        return fail(str(error))
    print(f"wrote {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
