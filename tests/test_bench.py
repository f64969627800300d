"""scripts/bench.py runs end to end and reports every figure it promises (speed itself is never asserted)."""
import json

from scripts.bench import main


def test_bench_reports_each_precision_and_prefill_length(tiny_dir, tmp_path, capsys):
    output = tmp_path / "bench.json"
    assert main(["--checkpoint_path", str(tiny_dir), "--precisions", "fp32", "int8", "int4", "--no_compile",
                 "--max_new_tokens", "6", "--prefill_lengths", "8", "32", "--repeats", "1", "--json", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["machine_bandwidth_gbs"] > 0 and report["peak_rss_gb"] > 0
    assert [(row["precision"], row["mode"]) for row in report["results"]] == [
        ("fp32", "eager"), ("int8", "eager"), ("int4", "eager")]
    for row in report["results"]:
        assert row["decode_tokens_per_s"] > 0 and row["prefill_32_tokens_per_s"] > 0
        assert row["bandwidth_gbs"] == row["weights_mb"] * 1e6 * row["decode_tokens_per_s"] / 1e9
    assert "| int4 | eager |" in capsys.readouterr().out
