"""Models larger than memory: the weights stay on disk (or in host memory) and visit the compute device
one transformer block at a time.

    python generate.py --offload disk --memory_budget 2GB --checkpoint_path checkpoints/big
    python generate.py --offload disk --memory_budget 2GB --prompt_file prompts.txt --batch_size 32

Layered inference (the AirLLM idea): a forward pass needs a block's weights only while that block runs.
The embedding, the final norm and the output head stay in memory, and so do as many blocks as the budget
allows (the first ones); the others stream through two buffers: while block i computes from one, a
background thread reads block i + 1 into the other, so reading overlaps computing.

Throughput (the FlexGen idea): a decode step streams the same bytes whatever the batch, so a batch of B
sequences divides the bytes read per generated token by B; int8 and int4 checkpoints stream 4 and about
7 times fewer bytes than fp32.

The page cache: --offload disk never memory-maps the file. It reads each tensor with pread into the
reused buffers, then tells the kernel with posix_fadvise(POSIX_FADV_DONTNEED) that those file pages are
not needed again soon, so the file piles up neither in the process (whose memory holds only the
buffers) nor in the kernel's page cache.

model.py is used unchanged: the streamed blocks are ordinary TransformerBlocks on the meta device, and
a forward pre-hook gives each one its weights just before it runs (a forward hook takes them back).
"""
import ctypes
import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
from torch import Tensor

from checkpoint import SAFETENSORS_DTYPES, checkpoint_files, empty_model, tied, unique_state_dict
from model import Transformer

DTYPES_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
class SafetensorsFile:
    """A safetensors file read tensor by tensor with pread, into buffers the caller owns."""

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        header_length = int.from_bytes(os.pread(self.fd, 8, 0), "little")
        header = json.loads(os.pread(self.fd, header_length, 8))
        self.metadata = header.pop("__metadata__", {})
        self.entries = {}  # name -> (dtype, shape, byte offset in the file, byte length)
        for name, entry in header.items():
            start, end = entry["data_offsets"]
            self.entries[name] = (DTYPES_BY_NAME[entry["dtype"]], tuple(entry["shape"]), 8 + header_length + start,
                                  end - start)

    def meta(self, name: str) -> Tensor:
        dtype, shape, _, _ = self.entries[name]
        return torch.empty(shape, dtype=dtype, device="meta")

    def read_into(self, name: str, out: Tensor):
        """Fill out (a contiguous CPU tensor of the stored dtype and shape) with the tensor's bytes."""
        _, _, offset, length = self.entries[name]
        view = memoryview((ctypes.c_char * length).from_address(out.data_ptr())).cast("B")
        done = 0
        while done < length:  # one pread returns at most about 2 GB
            done += os.preadv(self.fd, [view[done:]], offset + done)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    def read(self, name: str) -> Tensor:
        dtype, shape, _, _ = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        self.read_into(name, out)
        return out


def compute_dtype(stored: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """Floating tensors (weights, scales, zeros) compute in dtype; integer ones keep their type."""
    return dtype if stored.is_floating_point else stored


def nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def set_tensor(module: nn.Module, name: str, tensor: Tensor):
    """Point module's parameter or buffer `name` (dotted, e.g. attention.wq.weight) at tensor."""
    owner_name, _, attribute = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if isinstance(getattr(owner, attribute), nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=False)
    setattr(owner, attribute, tensor)


class BlockStreamer:
    """Gives each streamed block its weights just before it runs, from `buffers` reused sets of tensors
    on the device; with two buffers, a background thread loads the next block while this one computes."""

    def __init__(self, model: Transformer, streamed: list, read_block, buffers: int, device: str):
        first = model.layers[streamed[0]]
        self.placeholders = {name: tensor for name, tensor in unique_state_dict(first).items()
                             if not name.startswith("attention.kv_cache.")}
        self.buffers = [{name: torch.empty_like(tensor, device=device) for name, tensor in self.placeholders.items()}
                        for _ in range(buffers)]
        self.streamed, self.read_block, self.device = streamed, read_block, torch.device(device)
        self.bytes_per_pass = len(streamed) * sum(map(nbytes, self.buffers[0].values()))
        self.pool = ThreadPoolExecutor(max_workers=1) if buffers > 1 else None
        self.copy_stream = torch.cuda.Stream() if self.device.type == "cuda" else None
        self.released = [None] * buffers  # CUDA: an event once the compute stream is done with a buffer
        self.pending = {}  # position in self.streamed -> (buffer index, Future of its load)
        self.next_buffer = 0  # loads alternate between the buffers, so consecutive blocks never share one
        self.in_use = 0  # the buffer of the block running now
        for position, index in enumerate(streamed):
            model.layers[index].register_forward_pre_hook(lambda block, args, p=position: self.before(p, block))
            model.layers[index].register_forward_hook(lambda block, args, out, p=position: self.after(p, block))

    def load(self, position: int, buffer_index: int):
        buffer = self.buffers[buffer_index]
        if self.copy_stream is None:
            self.read_block(self.streamed[position], buffer)
            return
        with torch.cuda.stream(self.copy_stream):
            if self.released[buffer_index] is not None:  # kernels still reading the buffer must finish first
                self.copy_stream.wait_event(self.released[buffer_index])
            self.read_block(self.streamed[position], buffer)
        self.copy_stream.synchronize()

    def start_load(self, position: int):
        buffer_index, self.next_buffer = self.next_buffer, (self.next_buffer + 1) % len(self.buffers)
        future = self.pool.submit(self.load, position, buffer_index) if self.pool else None
        self.pending[position] = (buffer_index, future)

    def before(self, position: int, block: nn.Module):
        if position not in self.pending:
            self.start_load(position)
        buffer_index, future = self.pending.pop(position)
        if future is None:
            self.load(position, buffer_index)
        else:
            future.result()
        for name, tensor in self.buffers[buffer_index].items():
            set_tensor(block, name, tensor)
        self.in_use = buffer_index
        if self.pool:  # the next streamed block (the first again after the last) loads while this one runs
            self.start_load((position + 1) % len(self.streamed))

    def after(self, position: int, block: nn.Module):
        for name, tensor in self.placeholders.items():
            set_tensor(block, name, tensor)
        if self.copy_stream is not None:
            self.released[self.in_use] = torch.cuda.current_stream().record_event()


HEADROOM = 0.9  # of the budget for weights; the rest is left to activations and the allocator's slack


def plan_blocks(budget: int, process: int, resident: int, block: int, n_layers: int):
    """How many blocks stay in memory, and how many buffers the others stream through."""
    room = int(budget * HEADROOM) - process - resident
    if room < block:
        raise ValueError(f"--memory_budget {budget / 1e6:.0f}MB cannot hold one transformer block "
                         f"({block / 1e6:.0f} MB) besides the embedding, norm and head ({resident / 1e6:.0f} MB) "
                         f"and the running process ({process / 1e6:.0f} MB): give at least "
                         f"{(process + resident + block) / HEADROOM / 1e6:.0f}MB")
    fits = room // block
    if fits >= n_layers:
        return n_layers, 0
    if fits == 1:
        return 0, 1  # no room for a second buffer: each block loads, then runs
    return fits - 2, 2


def resident_memory() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_offloaded(checkpoint_path, device: str, dtype: torch.dtype, offload: str, memory_budget=None):
    """The model of a checkpoint with its blocks left on disk (offload="disk") or in host memory ("cpu"),
    streamed to `device` as they run. memory_budget (bytes) bounds what the device holds (with "disk" on
    a CPU, the whole process); without one, every block streams through two buffers."""
    weights_file, args = checkpoint_files(checkpoint_path)
    try:
        file = SafetensorsFile(weights_file)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot read {weights_file} as safetensors ({error}): re-convert the checkpoint") from None
    model = empty_model(args, {name: file.meta(name) for name in file.entries}, file.metadata,
                        weights_file)
    in_memory = lambda tensor: nbytes(tensor.to(compute_dtype(tensor.dtype, dtype)))
    sizes = {name: in_memory(tensor) for name, tensor in unique_state_dict(model).items()}
    block = sum(size for name, size in sizes.items() if name.startswith("layers.0."))
    resident = sum(size for name, size in sizes.items() if not name.startswith("layers."))
    if memory_budget is None:
        kept, buffers = 0, 2
    else:
        process = torch.cuda.memory_allocated() if device == "cuda" else resident_memory()
        kept, buffers = plan_blocks(memory_budget, process, resident, block, args.n_layers)

    def load(name: str) -> Tensor:
        tensor = file.read(name)
        return tensor.to(device=device, dtype=compute_dtype(tensor.dtype, dtype))

    for name in sizes:
        if not name.startswith("layers.") or int(name.split(".")[1]) < kept:
            set_tensor(model, name, load(name))
    tied(model)
    streamed = list(range(kept, args.n_layers))
    if streamed:
        read_block = disk_reader(file, device) if offload == "disk" else host_reader(file, streamed, device)
        model.streamer = BlockStreamer(model, streamed, read_block, buffers, device)
    return model.eval()


def streamed_bytes(model: Transformer, timing) -> str:
    """For generate.py's report: the bytes each step brought to the device, and their share per generated
    token (a step streams the same bytes for the whole batch). Empty when nothing streams."""
    streamer = getattr(model, "streamer", None)
    if streamer is None:
        return ""
    per_token = streamer.bytes_per_pass * timing.decode_steps / max(timing.decoded_tokens, 1)
    return f"; streamed {streamer.bytes_per_pass / 1e6:.0f} MB per step, {per_token / 1e6:.1f} MB per token"


def disk_reader(file: SafetensorsFile, device: str):
    """read_block for --offload disk: pread straight into the buffer when it is a CPU tensor of the stored
    dtype, else into a staging tensor (pinned, for fast copies to a GPU) and convert from there."""
    staging = {}

    def read_block(index: int, buffer: dict):
        for name, out in buffer.items():
            key = f"layers.{index}.{name}"
            stored_dtype, shape, _, _ = file.entries[key]
            if out.device.type == "cpu" and out.dtype == stored_dtype:
                file.read_into(key, out)
                continue
            if name not in staging:
                staging[name] = torch.empty(shape, dtype=stored_dtype, pin_memory=device == "cuda")
            file.read_into(key, staging[name])
            out.copy_(staging[name], non_blocking=True)
    return read_block


def host_reader(file: SafetensorsFile, streamed: list, device: str):
    """read_block for --offload cpu: every streamed block is read once into host memory (pinned when the
    device is a GPU, so copies to it run asynchronously), then copied to the device as it runs."""
    pin = device == "cuda"
    store = {key: file.read(key).pin_memory() if pin else file.read(key)
             for key in file.entries if key.startswith("layers.") and int(key.split(".")[1]) in streamed}

    def read_block(index: int, buffer: dict):
        for name, out in buffer.items():
            out.copy_(store[f"layers.{index}.{name}"], non_blocking=pin)
    return read_block
