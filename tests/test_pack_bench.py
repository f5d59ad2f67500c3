"""The benchmarks run (on tiny inputs) and report what they claim; no timing is asserted."""

from __future__ import annotations

from bench import packing, throughput


def test_packing_benchmark_runs_and_writes_its_table_and_plot(tmp_path):
    results = packing.main(["--samples", "3000", "--seq-lens", "512", "2048", "--out", str(tmp_path)])
    assert [r["sequence_len"] for r in results] == [512, 2048]
    for r in results:
        assert r["molt"] >= r["first_fit_in_order"] - 1e-9  # never worse than the baseline it falls back to
        assert r["molt_rows"] >= r["lower_bound_rows"]
        assert r["unpacked_pad_to_sequence_len"] < r["unpacked_pad_to_longest"] < r["molt"] <= 1
    text = (tmp_path / "packing.md").read_text()
    assert "| 2048 | " in text and (tmp_path / "packing.png").read_bytes()[:4] == b"\x89PNG"


def test_throughput_benchmark_runs_every_mode_on_the_same_tokens(tmp_path):
    result = throughput.main(["--samples", "12", "--seq-len", "128", "--micro-batch-size", "2", "--rounds", "1", "--out", str(tmp_path)])
    modes = result["modes"]
    assert set(modes) == set(throughput.MODES)
    assert modes["unpacked, pad to longest"]["ratio"] == 1.0
    assert modes["packed"]["micro_batches"] < modes["unpacked, pad to longest"]["micro_batches"]
    assert modes["packed"]["slots"] < modes["unpacked, pad to sequence_len"]["slots"]
    assert all(m["tokens_per_s"] > 0 for m in modes.values())
    assert "| packed |" in (tmp_path / "throughput-128-mbs2.md").read_text()
