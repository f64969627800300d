"""brisk side by side with Hugging Face transformers and llama.cpp on the same weights: decode tokens/s and
prefill tokens/s (--prefill_length, 512) at each precision, batch 1, greedy, the same thread count. Engines
take turns (A B C A B C ...) and medians are reported with the ratio brisk / llama.cpp, so a machine whose
speed drifts still compares fairly.

    pip install -r requirements-bench.txt     # llama-cpp-python compiles llama.cpp (minutes)
    python scripts/bench_peers.py --precisions fp32 int4

The weights are the embedded SmolLM2 GGUF (Q4_1). llama.cpp runs it as is for int4, and F32 / F16 /
Q8_0 files made from it (dequantized to F32 with the gguf package, then llama.cpp's own quantizer);
transformers reads the F32 file; brisk runs its converted checkpoint (int4: the kept Q4_1 blocks, the very
same numbers llama.cpp reads). Decode speed excludes the prompt: brisk times its steps, llama.cpp reports
its own decode time, and for transformers rate = (N - 1) / (time for N tokens - time for 1 token).
Prefill is one forward pass over the whole prompt (brisk: eager, also beside a compiled decode step).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from aot_step import AheadOfTimeDecode, default_cache_dir  # noqa: E402
from checkpoint import load_model  # noqa: E402
from generation import Steps, compile_steps, generate  # noqa: E402
from prepare import activation_dtype, prepare  # noqa: E402
from sampling import Sampling  # noqa: E402
from scripts.bench import build, synthetic_tokens  # noqa: E402
from scripts.prepare_default import embedded_gguf  # noqa: E402

LLAMA_CPP_TYPES = {"fp32": "F32", "bf16": "F16", "int8": "Q8_0", "int4": "Q4_1"}
LLAMA_FTYPES = {"F16": 1, "Q8_0": 7}  # llama.h's LLAMA_FTYPE_MOSTLY_*


def write_f32_gguf(source: Path, target: Path):
    """The source GGUF with every tensor dequantized to F32 and its metadata copied."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(target) + ".tmp", reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = 0 if key == "general.file_type" else field.contents()  # 0: all F32
        kind = gguf.GGUFValueType(field.types[0])
        element = gguf.GGUFValueType(field.types[-1]) if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, kind, sub_type=element)
    for tensor in reader.tensors:
        values = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values.reshape([int(n) for n in reversed(tensor.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(target) + ".tmp").rename(target)


def llama_cpp_file(kind: str, directory: Path) -> Path:
    """The GGUF llama.cpp runs for a precision, made once into directory."""
    source = embedded_gguf()
    if kind == "Q4_1":
        return source
    f32 = directory / "SmolLM2-135M-Instruct.F32.gguf"
    if not f32.is_file():
        write_f32_gguf(source, f32)
    if kind == "F32":
        return f32
    target = directory / f"SmolLM2-135M-Instruct.{kind}.gguf"
    if not target.is_file():
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPES[kind]
        llama_cpp.llama_model_quantize(str(f32).encode(), str(target).encode(), params)
    return target


def rate_from_lengths(run, new_tokens: int) -> float:
    """Decode tokens/s without the prompt, from a run of new_tokens and a run of one token."""
    started = time.perf_counter()
    produced = run(new_tokens)
    long_s = time.perf_counter() - started
    started = time.perf_counter()
    run(1)
    return (produced - 1) / (long_s - (time.perf_counter() - started))


def timed_rate(forward, tokens: int) -> float:
    """tokens / seconds of one call of forward()."""
    started = time.perf_counter()
    forward()
    return tokens / (time.perf_counter() - started)


def brisk_engine(checkpoint: Path, precision: str, mode: str, prompt: list, new_tokens: int, long_prompt: list):
    """(decode, prefill) rate functions, the decode step eager, "compiled" (torch.compile) or "aot" (aot_step.py,
    its package built into the cache directory on the first run). Prefill is the eager forward in every mode."""
    # int4: the kept Q4_1 file, with the activations `--dtype auto` gives it
    model = build(checkpoint, precision, 32, mode) if precision != "int4" else prepare(load_model(
        checkpoint / "model_q4_1.safetensors", "cpu", activation_dtype("auto", "cpu", mode, "int4")), "cpu", mode)
    model.setup_caches(1, max(len(prompt) + new_tokens + 1, len(long_prompt)))
    steps = {"eager": Steps(), "compiled": compile_steps("cpu"),
             "aot": Steps(decode=AheadOfTimeDecode(default_cache_dir()))}[mode]
    generate(model, [prompt], 3, Sampling(temperature=0), steps=steps)  # warm-up (compiles, builds or loads)

    def decode() -> float:
        _, timing = generate(model, [prompt], new_tokens, Sampling(temperature=0), steps=steps)
        return timing.decoded_tokens / timing.decode_s

    def prefill() -> float:
        with torch.no_grad():
            return timed_rate(lambda: model(torch.tensor([long_prompt]), torch.arange(len(long_prompt))),
                              len(long_prompt))
    return decode, prefill


def transformers_engine(f32_gguf: Path, precision: str, prompt: list, new_tokens: int, long_prompt: list):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(f32_gguf.parent, gguf_file=f32_gguf.name, dtype=dtype).eval()
    inputs = torch.tensor([prompt])

    def generated(count: int) -> int:
        with torch.no_grad():
            output = model.generate(inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False)
        return output.shape[1] - len(prompt)

    def prefill() -> float:
        with torch.no_grad():
            return timed_rate(lambda: model(torch.tensor([long_prompt])), len(long_prompt))
    return (lambda: rate_from_lengths(generated, new_tokens)), prefill


def llama_cpp_engine(gguf_file: Path, threads: int, prompt: list, new_tokens: int, long_prompt: list):
    """Decode on llama.cpp's own clock (llama_perf_context), so that llama-cpp-python's Python sampling loop
    around its steps is not charged to llama.cpp; prefill (one batch of the whole prompt) on the wall clock."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_file), n_threads=threads, n_threads_batch=threads,
                          n_ctx=max(1024, len(long_prompt) + 1), n_batch=max(512, len(long_prompt)), verbose=False)

    def decode() -> float:
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        llm.create_completion(prompt, max_tokens=new_tokens, temperature=0, logit_bias={llm.token_eos(): -100})
        perf = llama_cpp.llama_perf_context(llm.ctx)
        return perf.n_eval / (perf.t_eval_ms / 1000)

    def prefill() -> float:  # one C call for the whole prompt: the wall clock is llama.cpp's own time
        llm.reset()
        return timed_rate(lambda: llm.eval(long_prompt), len(long_prompt))
    return decode, prefill


def compare(precision: str, engines: dict, repeats: int) -> list:
    """Run each engine's (decode, prefill) in turns, repeats rounds; print and return the medians."""
    runs = {name: ([], []) for name in engines}
    for _ in range(repeats):  # interleaved: each engine once per round
        for name, (decode, prefill) in engines.items():
            runs[name][0].append(decode())
            runs[name][1].append(prefill())
    medians = {name: (statistics.median(decode), statistics.median(prefill))
               for name, (decode, prefill) in runs.items()}
    best = [max(rates[i] for name, rates in medians.items() if name.startswith("brisk")) for i in (0, 1)]
    rows = []
    for name, (decode, prefill) in medians.items():
        ratios = ["", ""] if name.startswith("brisk") else [f"{best[0] / decode:.2f}x", f"{best[1] / prefill:.2f}x"]
        print(f"| {precision} | {name} | {decode:.1f} | {ratios[0]} | {prefill:.0f} | {ratios[1]} |", flush=True)
        rows.append({"precision": precision, "engine": name, "decode_tokens_per_s": decode,
                     "prefill_tokens_per_s": prefill, "decode_runs": runs[name][0], "prefill_runs": runs[name][1]})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct"))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8", "int4"],
                        choices=list(LLAMA_CPP_TYPES))
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill_length", type=int, default=512, help="prompt tokens of the prefill figure")
    parser.add_argument("--no_compile", action="store_true", help="brisk's eager decode step only")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--gguf_dir", type=Path, default=Path("checkpoints/gguf"), help="where the made GGUFs go")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.gguf_dir.mkdir(parents=True, exist_ok=True)
    prompt, long_prompt = synthetic_tokens(16, 49152), synthetic_tokens(args.prefill_length, 49152)
    results = []
    print(f"| precision | engine | decode tok/s | brisk / engine | prefill {args.prefill_length} tok/s "
          "| brisk / engine |")
    print("| --- | --- | --- | --- | --- | --- |")
    for precision in args.precisions:
        modes = ["eager"] + ([] if args.no_compile else ["compiled", "aot"])
        engines = {f"brisk {mode}": brisk_engine(args.checkpoint_path, precision, mode, prompt, args.max_new_tokens,
                                                 long_prompt) for mode in modes}
        if precision in ("fp32", "bf16"):
            engines["transformers"] = transformers_engine(llama_cpp_file("F32", args.gguf_dir), precision, prompt,
                                                          args.max_new_tokens, long_prompt)
        try:
            kind = LLAMA_CPP_TYPES[precision]
            engines[f"llama.cpp {kind}"] = llama_cpp_engine(llama_cpp_file(kind, args.gguf_dir), args.threads,
                                                            prompt, args.max_new_tokens, long_prompt)
        except ImportError:
            print("llama-cpp-python is not installed (pip install -r requirements-bench.txt)", file=sys.stderr)
        results += compare(precision, engines, args.repeats)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
