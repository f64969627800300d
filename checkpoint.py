"""Checkpoints: a directory holding model.safetensors (or a quantized file such as model_int8.safetensors)
and the config.json that gives the model's shape.

Loading builds the model on the meta device (no memory, no random init), gives it the layer types the
file's tensors call for (int8 / int4 / NF4 layers where quantize.py wrote them), assigns the tensors of the
memory-mapped file, so the weights sit in RAM once; the model it gives has the plain layers, which prepare.py
then gives their device's forms. Writing streams one tensor at a time under a temporary name, so a
checkpoint larger than RAM can be written and no half-written file is ever left under the final name.
"""
import json
import math
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from model import Transformer, swap_layers
from model_args import ModelArgs
from quantized_layers import INT4_PACKING, Int4Linear, Int8Linear, NF4Linear, QuantizedEmbedding

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}


def checkpoint_files(checkpoint_path):
    """The weights file and the model shape of a converted checkpoint: checkpoint_path is a checkpoint
    directory or a .safetensors file inside one, with the config.json beside it."""
    path = Path(checkpoint_path)
    weights_file = path / "model.safetensors" if path.is_dir() else path
    config_file = weights_file.parent / "config.json"
    if not weights_file.is_file():
        raise FileNotFoundError(f"no checkpoint at {weights_file}: convert one first (see README, scripts/)")
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json beside {weights_file}: convert the checkpoint with scripts/")
    try:
        return weights_file, ModelArgs.from_hf_config(config_file)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{config_file} is not a Llama-like config ({error}): re-convert the checkpoint") from None


def stored_weights(checkpoint_path) -> str:
    """What a checkpoint's file stores, from its header alone: "int4" when it holds packed int4 weights,
    else "int8" when it holds int8 ones, else "float" (also when there is no readable file, which loading
    then reports)."""
    try:
        weights_file, _ = checkpoint_files(checkpoint_path)
        with safe_open(weights_file, framework="pt") as file:
            dtypes = {file.get_slice(name).get_dtype() for name in file.keys()}
    except Exception:
        return "float"
    return "int4" if "U8" in dtypes else "int8" if "I8" in dtypes else "float"


def unique_state_dict(model: nn.Module) -> dict:
    """The model's weights, each shared tensor (tied embedding and output head) once, under its first name."""
    seen, unique = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique[name] = tensor
    return unique


def layer_for(tensors: dict, prefix: str, in_features: int, out_features: int) -> nn.Module:
    """The empty layer that holds a file's tensors prefix.weight (and .scales, .zeros, .absmax..., .bias):
    float weights make an nn.Linear, int8 an Int8Linear, packed uint8 with zeros an Int4Linear, packed uint8
    with absmaxes an NF4Linear; groupsizes follow from the scales' (absmaxes') shape. A file may mix them (a
    converted GGUF: int4 blocks, an int8 output head)."""
    weight, scales, bias = tensors[prefix + "weight"], tensors.get(prefix + "scales"), prefix + "bias" in tensors
    if weight.dtype == torch.int8:
        groupsize = in_features // scales.shape[1] if scales.dim() == 2 else 0
        return Int8Linear(in_features, out_features, groupsize, bias=bias)
    if weight.dtype == torch.uint8 and scales is not None:
        return Int4Linear(in_features, out_features, 2 * weight.shape[1] // scales.shape[1], bias=bias)
    if weight.dtype == torch.uint8:
        double_quant = prefix + "absmax_codes" in tensors
        absmax = tensors[prefix + ("absmax_codes" if double_quant else "absmax")]
        return NF4Linear(in_features, out_features, 2 * weight.shape[1] // absmax.shape[1], double_quant, bias=bias)
    return nn.Linear(in_features, out_features, bias=bias)


def match_quantized(model: Transformer, tensors: dict, metadata: dict, weights_file):
    """Give the (meta-device) model the layer types of a quantized file, ready to be assigned its tensors."""
    if metadata.get("int4_packing") != INT4_PACKING and any(t.dtype == torch.uint8 for t in tensors.values()):
        raise ValueError(f"{weights_file} packs its int4 weights in an older layout: quantize (or convert) "
                         "the checkpoint again")
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name + ".weight" in tensors:
            parent_name, _, attribute = name.rpartition(".")
            layer = layer_for(tensors, name + ".", module.in_features, module.out_features)
            setattr(model.get_submodule(parent_name), attribute, layer)
    if "tok_embeddings.table.weight" in tensors:
        vocab_size, dim = model.tok_embeddings.weight.shape
        table = layer_for(tensors, "tok_embeddings.table.", dim, vocab_size)
        model.tok_embeddings = QuantizedEmbedding(table)
        if model.args.tie_embeddings:
            model.output = table


def empty_model(args: ModelArgs, tensors: dict, metadata: dict, weights_file) -> Transformer:
    """The model on the meta device, with the layer types of the file's tensors, checked against the
    file's tensor names."""
    with torch.device("meta"):
        model = Transformer(args)
        if "quantization" in metadata:
            match_quantized(model, tensors, metadata, weights_file)
    names = set(tensors) - ({"output.weight"} if args.tie_embeddings else set())
    expected = set(unique_state_dict(model))
    if names != expected:
        missing, unexpected = sorted(expected - names), sorted(names - expected)
        raise ValueError(f"{weights_file} does not match its config.json (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}): re-convert the checkpoint")
    return model


def tied(model: Transformer) -> Transformer:
    """A float output head tied to the embedding again, sharing its tensor: assigning a file's tensors, or
    to_empty, gives each of the two a tensor of its own. (A quantized head is the embedding's table already.)"""
    if model.args.tie_embeddings and isinstance(model.output, nn.Linear):
        model.output.weight = model.tok_embeddings.weight
    return model


def load_model(checkpoint_path, device="cpu", dtype=torch.float32, shard=None) -> Transformer:
    """The model of a checkpoint, on device, floating-point tensors in dtype (integer weights keep their
    type). shard(model, tensors) -> tensors, given by tp.py, resizes the empty model to one rank's share
    and slices the tensors to match, before any byte of the file is read (the mapped pages of the other
    ranks' shares are never touched). The layers are the plain ones of model.py and quantized_layers.py:
    prepare.py gives them their device's forms."""
    weights_file, args = checkpoint_files(checkpoint_path)
    try:
        with safe_open(weights_file, framework="pt") as file:
            metadata = file.metadata() or {}
        state_dict = load_file(weights_file, device="cpu")
    except Exception as error:
        raise ValueError(f"cannot read {weights_file} as safetensors ({error}): re-convert the checkpoint") from None
    model = empty_model(args, state_dict, metadata, weights_file)
    if args.tie_embeddings:
        state_dict.pop("output.weight", None)
    if shard is not None:
        state_dict = shard(model, state_dict)
    state_dict = {name: tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
                  for name, tensor in state_dict.items()}
    model.load_state_dict(state_dict, assign=True, strict=False)
    return tied(model).eval()


def parameter_count(args: ModelArgs) -> int:
    """Parameters of a model of this shape, a tied embedding counted once (built on the meta device: free)."""
    with torch.device("meta"):
        return sum(tensor.numel() for tensor in unique_state_dict(Transformer(args)).values())


# How --random_weights stores its linear layers: as floats, or as quantize.py's int8 (a scale per output
# channel) and int4 (groups of N) layers hold them
RANDOM_WEIGHTS = ("float", "int8", "int4-g32", "int4-g64", "int4-g128", "int4-g256")


def random_layer(layer: nn.Module, weights: str) -> nn.Module:
    """An empty layer of a linear layer's shape storing its weight as `weights` (one of RANDOM_WEIGHTS);
    other layers (attention) as they are."""
    if isinstance(layer, nn.Linear) and weights == "int8":
        return Int8Linear(layer.in_features, layer.out_features)
    if isinstance(layer, nn.Linear) and weights.startswith("int4-g"):
        return Int4Linear(layer.in_features, layer.out_features, int(weights.removeprefix("int4-g")))
    return layer


def empty_random_model(args: ModelArgs, dtype=torch.float32, shard=None, weights: str = "float") -> Transformer:
    """The model of a shape on the meta device (no memory), in dtype, its linear layers (the output head
    included, as quantize.py --quantize_embedding and llama.cpp's files hold it) stored as `weights`."""
    with torch.device("meta"):
        model = Transformer(args)
        if weights != "float":
            swap_layers(model, lambda layer: random_layer(layer, weights))
            if args.tie_embeddings:
                model.tok_embeddings = QuantizedEmbedding(model.output)
    if shard is not None:
        shard(model, {})
    return model.to(dtype)


def model_bytes(model: Transformer) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in unique_state_dict(model).values())


@torch.no_grad()
def random_model(args: ModelArgs, device="cpu", dtype=torch.float32, shard=None, weights: str = "float"):
    """Random weights of a given shape, for speed checks: floats normal with std 0.02 (norms 1); int8 and
    int4 codes uniform over their range, scaled to the same spread (the bytes a decode step reads are those
    of a quantized checkpoint; the values do not matter). shard as in load_model (with no tensors to slice)."""
    model = tied(empty_random_model(args, dtype, shard, weights).to_empty(device=device))
    for name, tensor in unique_state_dict(model).items():
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        elif tensor.is_floating_point() and not name.endswith((".scales", ".zeros")):
            tensor.normal_(0, 0.02)
    for layer in model.modules():
        if isinstance(layer, Int8Linear):
            layer.weight.random_(-127, 128)
            layer.scales.fill_(0.02 / 73.6)  # 73.6: the standard deviation of integers uniform on [-127, 127]
        elif isinstance(layer, Int4Linear):
            layer.weight.random_(0, 256)  # two codes a byte, each uniform on [0, 15]: mean 7.5, deviation 4.61
            layer.scales.fill_(0.02 / 4.61)
            layer.zeros.fill_(0.5 * 0.02 / 4.61)  # (q - 8) * scale + zero averages 0
    return model.eval()


def save_safetensors(path, shapes: dict, tensors, metadata: Optional[dict] = None):
    """Write a safetensors file one tensor at a time, so a checkpoint larger than RAM can be written.
    shapes: name -> (shape, dtype), in file order; tensors: yields (name, tensor) in that same order.
    The file appears under its final name only once complete."""
    header, offset = {}, 0
    for name, (shape, dtype) in shapes.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {key: str(value) for key, value in metadata.items()}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep tensor data 8-byte aligned
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(len(header_bytes).to_bytes(8, "little"))
        file.write(header_bytes)
        for name, tensor in tensors:
            shape, dtype = shapes[name]
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(shape)} {dtype}")
            file.write(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    os.replace(temporary, path)


def save_model(model: Transformer, path, metadata: dict):
    """Write a model built in memory (a quantized one, say) as one safetensors file, every shared tensor
    once; int4 files say how they pack their nibbles."""
    tensors = {name: tensor.detach().cpu() for name, tensor in unique_state_dict(model).items()}
    shapes = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()}
    save_safetensors(path, shapes, tensors.items(), {"format": "pt", "int4_packing": INT4_PACKING, **metadata})


def save_config(args: ModelArgs, directory):
    temporary = Path(directory) / "config.json.tmp"
    temporary.write_text(json.dumps(args.to_hf_config(), indent=2))
    os.replace(temporary, Path(directory) / "config.json")
