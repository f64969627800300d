"""scripts/bench.py runs end to end and reports every figure it promises (speed itself is never asserted)."""
import importlib.util
import json
import subprocess

import pytest
import torch

import quantized_kv_cache
from checkpoint import load_model
from cpu_kernels import native_kernels
from generation import cache_bytes_per_slot
from conftest import ROOT
from model_args import ModelArgs
from scripts.bench import main
from scripts.bench_gpu import main as bench_gpu
from scripts.bench_grammar import main as bench_grammar
from scripts.bench_kernels import main as bench_kernels
from scripts.bench_peers import main as bench_peers
from scripts.bench_scaling import main as bench_scaling
from scripts.bench_serve import LLAMA_CPP_PYTHON, llama_server
from scripts.bench_serve import main as bench_serve
from scripts.bench_tp import main as bench_tp
from scripts.soak_serve import main as soak_serve
from scripts.random_checkpoint import main as write_random
from tokenizer import load_tokenizer


def stored_bytes(args: ModelArgs, weight_bytes: int, per_row_scale: bool, float_bytes: int = 4,
                 scale_bytes: int = 4) -> int:
    """Bytes of a model whose linear layers and (tied) embedding hold weight_bytes per weight, plus one
    scale of scale_bytes per output row when quantized, and norms of float_bytes each: counted from the
    shape, not from brisk's code."""
    layer = [(args.dim, args.n_heads * args.head_dim), (args.dim, args.n_kv_heads * args.head_dim),
             (args.dim, args.n_kv_heads * args.head_dim), (args.n_heads * args.head_dim, args.dim),
             (args.dim, args.intermediate_size), (args.dim, args.intermediate_size), (args.intermediate_size, args.dim)]
    matrices = layer * args.n_layers + [(args.dim, args.vocab_size)]
    weights = sum(n_in * n_out for n_in, n_out in matrices) * weight_bytes
    scales = sum(n_out for _, n_out in matrices) * scale_bytes if per_row_scale else 0
    return weights + scales + (2 * args.n_layers + 1) * args.dim * float_bytes


def test_bench_reports_each_precision_and_prefill_length(tiny_dir, tmp_path, capsys):
    output = tmp_path / "bench.json"
    assert main(["--checkpoint_path", str(tiny_dir), "--precisions", "fp32", "int8", "--no_compile",
                 "--max_new_tokens", "6", "--prefill_lengths", "8", "32", "--repeats", "1", "--json", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["machine_bandwidth_gbs"] > 0 and report["peak_rss_gb"] > 0
    assert [(row["precision"], row["mode"]) for row in report["results"]] == [("fp32", "eager"), ("int8", "eager")]
    args = ModelArgs.from_hf_config(tiny_dir / "config.json")
    fp32, int8 = report["results"]
    assert round(fp32["weights_mb"] * 1e6) == stored_bytes(args, 4, per_row_scale=False)
    # the head quantized too; fp32 activations (and so fp32 norms), which brisk's kernels round, reading each
    # row's scale in fp16
    assert round(int8["weights_mb"] * 1e6) == stored_bytes(args, 1, per_row_scale=True, scale_bytes=2)
    for row in report["results"]:
        assert row["decode_tokens_per_s"] > 0 and row["prefill_32_tokens_per_s"] > 0 and row["bandwidth_gbs"] > 0
    assert "| int8 | eager |" in capsys.readouterr().out


@pytest.mark.skipif(not native_kernels(), reason="brisk's CPU kernels are unavailable here")
def test_bench_kernels_reports_brisks_kernels_beside_pytorchs(tmp_path, capsys):
    output = tmp_path / "kernels.json"
    assert bench_kernels(["--rows", "1", "3", "--repeats", "1", "--cycle_bytes", "1e6", "--json", str(output)]) == 0
    rows = json.loads(output.read_text())
    assert {(row["format"], row["engine"]) for row in rows} == {
        ("int4-g32", "brisk"), ("int4-g32", "torch int4 (bf16)"), ("int8-g32", "brisk"),
        ("fp32", "brisk"), ("fp32", "torch linear"), ("bf16", "brisk"), ("bf16", "torch linear")}
    assert {(tuple(row["shape"]), row["rows"]) for row in rows} == {
        (shape, rows) for shape in ((1536, 576), (576, 1536), (49152, 576)) for rows in (1, 3)}
    assert all(row["us_per_call"] > 0 and row["gb_per_s"] > 0 for row in rows)
    assert "| 49152 x 576 | int8-g32 | 3 | brisk |" in capsys.readouterr().out


def test_random_checkpoint_has_the_named_shape_and_loads(tiny_dir, tmp_path):

    assert write_random(["stories15M", str(tmp_path / "random"), "--tokenizer_from", str(tiny_dir)]) == 0
    model = load_model(tmp_path / "random")
    assert model.args == ModelArgs.from_name("stories15M")
    assert load_tokenizer(tmp_path / "random").encode("the quick") == load_tokenizer(tiny_dir).encode("the quick")


def test_bench_tp_reports_each_world_size(tiny_dir, tmp_path, capsys):
    output = tmp_path / "tp.json"
    assert bench_tp(["--checkpoint_path", str(tiny_dir), "--world_sizes", "1", "2", "--max_new_tokens", "4",
                     "--json", str(output)]) == 0
    rows = json.loads(output.read_text())["rows"]
    assert [row["ranks"] for row in rows] == [1, 2] and all(row["tokens_per_s"] > 0 for row in rows)
    assert [len(row["peak_gb"].split(" / ")) for row in rows] == [1, 2]  # a peak-memory figure per rank
    assert [line[:5] for line in capsys.readouterr().out.splitlines() if line[:5] in ("| 1 |", "| 2 |")] == [
        "| 1 |", "| 2 |"]


def test_bench_peers_compares_brisk_with_transformers_on_the_same_weights(smollm2_dir, tmp_path, capsys):
    output = tmp_path / "peers.json"
    assert bench_peers(["--checkpoint_path", str(smollm2_dir), "--precisions", "fp32", "--no_compile",
                        "--max_new_tokens", "4", "--prefill_length", "32", "--repeats", "1", "--gguf_dir",
                        str(tmp_path), "--json", str(output)]) == 0
    rows = json.loads(output.read_text())["results"]
    assert {"brisk eager", "transformers"} <= {row["engine"] for row in rows}
    assert all(row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0 for row in rows)
    assert "| fp32 | transformers |" in capsys.readouterr().out


def test_bench_scaling_writes_the_three_curves(tiny_dir, tmp_path):
    assert bench_scaling(["--checkpoint_path", str(tiny_dir), "--contexts", "32", "64", "--batches", "1", "2", "--sizes",
                 "--context", "32", "--max_new_tokens", "4", "--repeats", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "scaling_fp32_eager.json").read_text())
    assert [(p["curve"], p["batch"], p["context"]) for p in result["points"]] == [
        ("context", 1, 32), ("context", 1, 64), ("batch", 1, 32), ("batch", 2, 32), ("size", 1, 32)]
    assert all(p["decode_tokens_per_s"] > 0 for p in result["points"])
    assert "| batch | tiny-llama | 2 | 32 |" in (tmp_path / "scaling_fp32_eager.md").read_text()
    plot = tmp_path / "scaling_fp32_eager.png"
    assert plot.exists() == (importlib.util.find_spec("matplotlib") is not None)
    if plot.exists():
        assert plot.read_bytes()[:4] == b"\x89PNG"


def test_bench_serve_loads_a_server_and_reports_every_request(tiny_dir, tmp_path):
    output = tmp_path / "serve.json"
    assert bench_serve(["--engines", "brisk-mlfq", "--checkpoint_path", str(tiny_dir), "--clients", "2",
                        "--requests", "3", "--long_share", "0", "--slots", "2", "--max_seq_length", "256",
                        "--json", str(output)]) == 0
    [run] = json.loads(output.read_text())["results"]
    assert (run["engine"], run["clients"], run["requests"], run["failed"]) == ("brisk-mlfq", 2, 3, 0)
    assert run["tokens_per_s"] > 0 and run["short_ttft_p50"] <= run["short_e2e_p50"]


def test_bench_serve_chats_reuse_each_earlier_turn(tiny_dir, tmp_path):
    output = tmp_path / "chats.json"
    assert bench_serve(["--engines", "brisk-mlfq", "--checkpoint_path", str(tiny_dir), "--chat_turns", "3",
                        "--clients", "2", "--history_words", "8", "--chat_tokens", "4", "--slots", "2",
                        "--max_seq_length", "512", "--json", str(output)]) == 0
    [run] = json.loads(output.read_text())["results"]
    for turns in run["chats"]:
        assert [turn["ok"] for turn in turns] == [True] * 3
        for earlier, later in zip(turns, turns[1:]):
            assert later["cached_tokens"] >= earlier["prompt_tokens"] and later["ttft"] > 0


def test_a_short_soak_answers_or_refuses_every_kind_of_request(tiny_dir, tmp_path):
    output = tmp_path / "soak.json"
    assert soak_serve(["--checkpoint_path", str(tiny_dir), "--seconds", "8", "--clients", "2", "--slots", "2",
                       "--max_seq_length", "256", "--json", str(output)]) == 0
    run = json.loads(output.read_text())
    assert run["requests"] > 0 and set(run["outcomes"]) <= {"ok", "refused", "closed", "dropped",
                                                             "structured, cut by max_tokens"}


def test_bench_grammar_validates_each_answer_and_times_the_mask(smollm2_dir, tmp_path, capsys):
    output = tmp_path / "grammar.json"
    assert bench_grammar(["--checkpoint_path", str(smollm2_dir), "--schemas", "2", "--json", str(output)]) == 0
    result = json.loads(output.read_text())
    assert (result["answers"], result["failures"]) == (2, [])
    assert len(result["mask_s"]) > len(result["step_s"]) > 0
    assert "2 of 2 answers parse and validate" in capsys.readouterr().out


def test_bench_scaling_draws_each_cache_type_and_fills_a_budget(tiny_dir, tmp_path):
    model = load_model(tiny_dir)
    float_row, int4_row = (32 * cache_bytes_per_slot(quantized_kv_cache.use(model, kind)) for kind in ("float", "int4"))
    budget = float_row + 1
    assert bench_scaling(["--checkpoint_path", str(tiny_dir), "--contexts", "32", "64", "--batches", "--sizes",
                          "--kv_caches", "float", "int4", "--memory_budget", f"{budget}B", "--context", "32",
                          "--max_new_tokens", "4", "--repeats", "1", "--out", str(tmp_path)]) == 0
    points = json.loads((tmp_path / "scaling_fp32_eager.json").read_text())["points"]
    assert [(p["curve"], p["kv_cache"], p["context"]) for p in points if p["curve"] == "context"] == [
        ("context", "float", 32), ("context", "float", 64), ("context", "int4", 32), ("context", "int4", 64)]
    budget_rows = {p["kv_cache"]: p["batch"] for p in points if p["curve"] == "budget"}
    assert budget_rows == {"float": 1, "int4": budget // int4_row} and budget // int4_row >= 4
    assert all(p["peak_memory_gb"] > 0 and p["cache_mb"] > 0 for p in points)


def test_llama_server_is_built_once_then_taken_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRISK_CACHE_DIR", str(tmp_path))
    binary = tmp_path / f"llama-server-{LLAMA_CPP_PYTHON}"
    binary.write_bytes(b"")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("built again"))
    assert llama_server() == binary


def test_bench_serve_with_a_duration_sends_no_request_after_it(tiny_dir, tmp_path):
    output = tmp_path / "serve.json"
    assert bench_serve(["--engines", "brisk-fcfs", "--checkpoint_path", str(tiny_dir), "--clients", "2", "--requests",
                        "1000", "--long_share", "0", "--slots", "2", "--max_seq_length", "256", "--duration", "3",
                        "--json", str(output)]) == 0
    [run] = json.loads(output.read_text())["results"]
    assert 2 <= run["requests"] < 1000 and run["failed"] == 0 and run["wall_s"] < 60


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" errors="0"
failures="1" skipped="2" tests="7"><testcase classname="tests.test_cuda" name="test_a"/><testcase
classname="tests.test_cuda" name="test_b"><failure message="assert 1 == 2"/></testcase></testsuite></testsuites>"""


def test_bench_gpu_dry_run_on_a_cpu_tables_the_tests_copy_and_decode_figures(tmp_path, smollm2_dir, capsys):
    (tmp_path / "tests.xml").write_text(JUNIT)
    output = tmp_path / "gpu.json"
    assert bench_gpu(["--device", "cpu", "--parts", "copy", "decode", "--shapes", "stories15M", "--formats", "int4-g32",
                      "--max_new_tokens", "4", "--samples", "1", "--copy_gb", "0.1", "--tokenizer_from",
                      str(smollm2_dir), "--junit", str(tmp_path / "tests.xml"), "--json", str(output),
                      "--markdown", str(tmp_path / "gpu.md")]) == 0
    tests, copy, decode = json.loads(output.read_text())["rows"]
    assert (tests["passed"], tests["failures"], tests["skipped"], tests["failed_tests"]) == (4, 1, 2, ["test_b"])
    # stories15M's 15.19M weights in 0.625 bytes each (4 bits, an fp16 scale and min per group of 32: what brisk's
    # CPU kernel reads) and its fp32 norms: 9.51 MB
    assert copy["gbs"] > 0 and decode["tokens_per_s"] > 0 and decode["weights_mb"] == 10
    assert decode["share_of_copy_bandwidth"] == decode["bandwidth_gbs"] / copy["gbs"]
    table = (tmp_path / "gpu.md").read_text()
    assert "| tests | pytest -m cuda | 4 passed, 1 failed, 2 skipped: test_b |" in table
    assert "| decode | stories15M int4-g32, batch 1, compiled, float32 activations" in table
    assert table in capsys.readouterr().out + "\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    result = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: torch sees no CUDA device: run this on a machine with an NVIDIA GPU\n"
