"""Keeps `make bench` runnable for the next person with a GPU: on the CPU it runs the same code
on a tiny model (real vocabulary) with short sequences, ours and the TRL baseline, and must write
a complete result. Speed and memory are NOT asserted here (they belong to the benchmark).

    .venv/bin/python -m pytest -q tests/test_bench.py
"""

import json

import pytest

from conftest import run


@pytest.mark.slow  # builds or trains a model (left out by make test-fast)
def test_bench_smoke_runs_ours_and_the_trl_baseline(tmp_path):
    out = tmp_path / "bench.json"
    p = run("bench/bench.py", "--size", "tiny", "--steps", "1", "--warmup", "0", "--micro_batch", "1",
            "--sft_len", "128", "--dpo_len", "96", "--out", out, timeout=900)
    assert "ours vs TRL, sft" in p.stdout and "ours vs TRL, dpo" in p.stdout, p.stdout[-3000:]
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"ours_sft", "ours_dpo", "trl_sft", "trl_dpo"}
    for name, r in result["results"].items():
        assert "error" not in r, (name, r)
        assert r["tok_s"] > 0 and r["s_per_step"] > 0
    assert result["results"]["ours_sft"]["tokens_per_step"] == 128
    assert result["results"]["ours_dpo"]["tokens_per_step"] == 2 * 96
    assert result["device"].startswith("CPU") and result["command"].startswith("python")
