"""The decode step compiled ahead of time: torch.export traces one decode pass, AOTInductor compiles it
into a package (a shared library of C++ code), and later steps call that library directly, with none of
the checks Dynamo runs before a torch.compile'd step nor its Python wrapper (faster than a compiled step:
docs/experiments.md).

A package is built for one batch size, one attended length (generation.slots_to_attend) and one KV cache
shape, and kept in a cache directory, so that the next run with the same shapes loads it in milliseconds
instead of building it again (about a minute for SmolLM2). It holds none of the model's tensors: it reads
the weights (for brisk's CPU kernels, their reordered copies: cpu_kernels.QuantizedCPULinear) and the KV
cache where the model keeps them ("user-managed constants"), which costs no memory and lets one package
serve every checkpoint of the same shapes and dtypes. So every tensor a step reads must be a named
parameter or buffer of the model: a plain tensor attribute would be copied into the package under a
made-up name.
"""
import hashlib
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

import cpu_kernels
import model as model_source
import quantized_kv_cache
import quantized_layers
from generation import CPU_COMPILE_OPTIONS, decode_one_token
from model import ForwardOptions, Transformer
from sampling import Sampling, sample

# The package reads the model's tensors in place instead of holding copies (user-managed constants).
PACKAGE_OPTIONS = {**CPU_COMPILE_OPTIONS, "aot_inductor.package_constants_in_so": False, "emulate_precision_casts": True}


def default_cache_dir() -> Path:
    """$BRISK_CACHE_DIR, else $XDG_CACHE_HOME/brisk, else ~/.cache/brisk."""
    if os.environ.get("BRISK_CACHE_DIR"):
        return Path(os.environ["BRISK_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "brisk"


class DecodePass(nn.Module):
    """The model's forward pass over one new token per row at a fixed attended length, as torch.export
    traces it: (batch, vocab) logits. Sampling stays outside, in eager PyTorch."""

    def __init__(self, model: Transformer, attended_slots: int):
        super().__init__()
        self.model, self.attended_slots = model, attended_slots

    def forward(self, token: Tensor, input_pos: Tensor, left_pad: Optional[Tensor] = None) -> Tensor:
        options = ForwardOptions(left_pad=left_pad, attended_slots=self.attended_slots)
        return self.model(token, input_pos, options)[:, -1]


def named_tensors(decode_pass: DecodePass) -> dict:
    """Every parameter and buffer under its name in the package (a tied weight under both of its names)."""
    return {**dict(decode_pass.named_parameters(remove_duplicate=False)),
            **dict(decode_pass.named_buffers(remove_duplicate=False))}


def package_name(decode_pass: DecodePass, batch: int, padded: bool) -> str:
    """A name that changes with anything the compiled code depends on: torch, the CPU's instruction set and
    thread count (Inductor writes both into the code), the source of the modules it traces and of brisk's
    kernels, and the shape, dtype and strides of every tensor it reads. Not the weights' values: the package
    reads those in place."""
    digest = hashlib.sha256()
    for part in (torch.__version__, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(),
                 batch, padded, decode_pass.attended_slots, decode_pass.model.args):
        digest.update(repr(part).encode())
    for module in (model_source, cpu_kernels, quantized_layers, quantized_kv_cache, sys.modules[__name__]):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(cpu_kernels.KERNEL_SOURCE.read_bytes())  # the ops the package calls
    for name, tensor in sorted(named_tensors(decode_pass).items()):
        digest.update(repr((name, tuple(tensor.shape), tensor.dtype, tensor.stride())).encode())
    return f"decode_b{batch}_s{decode_pass.attended_slots}{'_padded' if padded else ''}_{digest.hexdigest()[:16]}"


def build_package(decode_pass: DecodePass, batch: int, padded: bool, path: Path):
    """Export one decode pass and compile it into a package at path (written under a temporary name, then
    renamed: an interrupted build leaves no package behind)."""
    device = decode_pass.model.rope.device
    example = (torch.zeros(batch, 1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device))
    if padded:
        example += (torch.zeros(batch, dtype=torch.long, device=device),)
    with torch.no_grad():
        exported = torch.export.export(decode_pass, example, strict=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
    try:
        with warnings.catch_warnings():  # torch's packaging uses its own deprecated LeafSpec: not the user's concern
            warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(partial),
                                                     inductor_configs=PACKAGE_OPTIONS)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_package(decode_pass: DecodePass, path: Path):
    """The package at path, reading the model's own tensors. It is opened with AOTInductor's loader itself:
    torch._inductor.aoti_load_package would first check the CPU's instruction set by compiling and loading
    test code in subprocesses (over a second), which package_name has already pinned."""
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    tensors, names = named_tensors(decode_pass), loader.get_constant_fqns()
    missing = [name for name in names if name not in tensors]
    if missing:
        raise RuntimeError(f"{path} reads {missing[0]}, which is not a parameter or buffer of the model: "
                           "delete the package and build it again")
    # (constants, use_inactive, check_full_update, user_managed, allow_h2d_copy)
    loader.load_constants({name: tensors[name] for name in names}, False, True, True, False)
    return loader


class AheadOfTimeDecode:
    """A decode step (generation.Steps.decode) through packages: each (batch size, attended length,
    padding) is loaded from the cache directory on its first step. A package not there yet is built there
    first, or with build=False that shape decodes eagerly. A model whose KV cache is allocated again
    (Transformer.setup_caches) has its packages bound to the new cache."""

    def __init__(self, cache_dir: Path, build: bool = True, on_build=None):
        self.cache_dir, self.build = cache_dir, build
        self.on_build = on_build  # on_build(path) is called before a package is built there
        self.loaders = {}  # (batch, attended, padded) -> (the rope table it is bound to, package loader or None)

    def __call__(self, model: Transformer, token: Tensor, input_pos: Tensor, left_pad: Optional[Tensor],
                 sampling: Sampling, attended_slots: int) -> Tensor:
        loader = self.loader(model, token.shape[0], attended_slots, left_pad is not None)
        if loader is None:
            return decode_one_token(model, token, input_pos, left_pad, sampling, attended_slots)
        inputs = [token, input_pos] if left_pad is None else [token, input_pos, left_pad]
        return sample(loader.boxed_run(inputs)[0], sampling)

    def loader(self, model: Transformer, batch: int, attended_slots: int, padded: bool):
        """The package for these shapes, bound to the model's KV cache; None where there is none and build is
        False."""
        shape = (batch, attended_slots, padded)
        bound_to, loader = self.loaders.get(shape, (None, None))
        if bound_to is not model.rope:  # setup_caches replaces the rope table with the KV cache
            loader = self.load(model, *shape)
            self.loaders[shape] = model.rope, loader
        return loader

    def load(self, model: Transformer, batch: int, attended_slots: int, padded: bool):
        decode_pass = DecodePass(model, attended_slots)
        path = self.cache_dir / f"{package_name(decode_pass, batch, padded)}.pt2"
        if not path.is_file():
            if not self.build:
                return None
            if self.on_build:
                self.on_build(path)
            build_package(decode_pass, batch, padded, path)
        return load_package(decode_pass, path)
