"""What every command line shares (generate.py, quantize.py, eval.py, serve.py, scripts/): the default
checkpoint, dtype names, device choice, reading text files and sizes, the peak-memory figure, and the
one way bad input is reported: a single line on stderr and exit status 2."""
import re
import resource
import sys
from pathlib import Path

import torch

# The embedded SmolLM2's original Q4_1 blocks, kept as int4 layers (scripts/prepare_default.py): the same
# values as its fp32 file (checkpoints/SmolLM2-135M-Instruct), a fifth of the bytes, and the fastest eagerly
DEFAULT_CHECKPOINT = Path("checkpoints/SmolLM2-135M-Instruct/model_q4_1.safetensors")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


def fail(message: str) -> int:
    """Report bad input; the exit status to return."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def checkpoint_error(error: Exception, checkpoint_path) -> UsageError:
    """A checkpoint that cannot be loaded, as bad input; for the default one, how to make it."""
    missing = Path(checkpoint_path) == DEFAULT_CHECKPOINT and not DEFAULT_CHECKPOINT.exists()
    hint = " (run: bash scripts/setup.sh)" if missing else ""
    return UsageError(f"{error}{hint}")


def pick_device(name: str) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available (use --device cpu)")
    return name


def read_text(path: Path, flag: str) -> str:
    """A text file given on the command line, as UTF-8; a missing or undecodable file is a UsageError."""
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{flag} {path} is not UTF-8 text (byte {error.start}): convert it to UTF-8") from None


UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'150MB', '2GB', '1.5GiB' -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS:
        raise UsageError(f"--memory_budget {text!r} is not a size: write it like 150MB, 2GB or 1.5GiB")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def available_memory_bytes() -> int:
    """Memory the system could give this process now (Linux's MemAvailable; elsewhere, no limit known)."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:")) * 1024
    except (OSError, StopIteration):
        return 2**62


def peak_memory_gb(device: str = "cpu") -> float:
    """Peak GPU memory allocated, or this process's peak resident memory. On Linux the latter is VmHWM:
    getrusage's ru_maxrss would also count the parent's memory, which a child started with fork carries
    until its exec."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1e6  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux, bytes on macOS
