"""Protects data preparation as a user runs it (`sft.py / dpo.py --prepare-only`): every bad row
is counted with its line number and never becomes a traceback; too many bad rows stop the run
with a message naming the file; hh-rlhf is filtered and truncated as documented; the prepared
data cache hits on a re-run and misses whenever an input, the tokenizer or a setting changes;
a resume refuses data that changed under it.

    .venv/bin/python -m pytest -q tests/test_prepare.py
"""

import json
import shutil

import pytest

from conftest import FIXTURES, run, stage_args


def sft_prepare(root, data_dir, out, *extra, check=True):
    args = stage_args(root, "sft", data_dir=data_dir, output_dir=out, cache_dir=out / "cache")
    return run("sft.py", "--prepare-only", *args, *extra, check=check)


def dpo_prepare(root, data_dir, out, *extra, check=True):
    args = stage_args(root, "dpo", data_dir=data_dir, output_dir=out, cache_dir=out / "cache")
    return run("dpo.py", "--prepare-only", *args, *extra, check=check)


def write_airoboros(folder, bad_lines):
    """40 good records, then the bad lines appended; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    good = [json.dumps({"instruction": f"Question {i}?", "response": f"Answer {i}.", "category": "general"})
            for i in range(40)]
    (folder / "instructions.jsonl").write_text("\n".join(good + bad_lines) + "\n", encoding="utf-8")
    return folder


BAD = [
    '{"instruction": "no closing brace", "response": "x"',  # line 41: invalid JSON
    '{"instruction": "only an instruction"}',  # 42: missing field
    '{"instruction": 7, "response": "seven"}',  # 43: non-string
    '{"instruction": "   ", "response": "blank instruction"}',  # 44: empty after strip
    '["a", "list"]',  # 45: not an object
]


def test_bad_rows_are_counted_with_line_numbers(demo_root, tmp_path):
    data = write_airoboros(tmp_path / "data", BAD)
    p = sft_prepare(demo_root, data, tmp_path / "out", "--max_bad_fraction", "0.5")
    assert "Traceback" not in p.stdout
    report = json.loads((tmp_path / "out/data_report.json").read_text())
    assert report["rows_read"] == 45 and report["rows_kept"] == 40
    dropped = {k: v["first_lines"] for k, v in report["rows_dropped"].items()}
    assert dropped == {"invalid JSON": ["instructions.jsonl:41"],
                       "missing or non-string instruction/response": ["instructions.jsonl:42", "instructions.jsonl:43"],
                       "empty instruction or response": ["instructions.jsonl:44"],
                       "not a JSON object": ["instructions.jsonl:45"]}
    for key in ("tokens_before_truncation", "tokens_after_truncation"):
        assert set(report[key]) == {"p50", "p90", "p99", "max"}
    assert 0 < report["packing_efficiency"] <= 1
    assert "invalid JSON" in p.stdout and "packing_efficiency" in p.stdout  # the printed table


def test_too_many_bad_rows_stop_with_a_clear_message(demo_root, tmp_path):
    data = write_airoboros(tmp_path / "data", BAD)  # 5 of 45 bad = 11% > the default 1%
    p = sft_prepare(demo_root, data, tmp_path / "out", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stdout
    assert "instructions.jsonl" in p.stdout and "max_bad_fraction" in p.stdout and "41" in p.stdout


def test_gzip_that_ends_early_stops_the_run_naming_the_subset(demo_root, tmp_path):
    """A cut-short gzip is a damaged FILE, not one bad row: counted as a row it hid under the
    threshold and silently dropped the rest of the subset. Whatever --max_bad_fraction says."""
    src = demo_root / "data/demo/hh-rlhf"
    data = tmp_path / "hh"
    shutil.copytree(src, data)
    blob = (data / "helpful-base/train.jsonl.gz").read_bytes()
    (data / "helpful-base/train.jsonl.gz").write_bytes(blob[:len(blob) * 2 // 3])  # an interrupted copy
    p = dpo_prepare(demo_root, data, tmp_path / "out", "--subsets", "harmless-base,helpful-base",
                    "--max_bad_fraction", "0.9", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stdout
    assert f"{data / 'helpful-base/train.jsonl.gz'}: is cut short after line" in p.stdout
    assert "make verify FULL=1" in p.stdout
    assert not (tmp_path / "out/data_report.json").exists()  # no report of a partial subset


def test_hh_rlhf_filters_on_the_real_fixture(demo_root, tmp_path):
    """The 200 real rows through dpo.py: quirks dropped and counted by reason, truncation symmetric."""
    src = FIXTURES / "hh-rlhf-harmless-base-test-head200.jsonl.gz"
    data = tmp_path / "hh"
    (data / "harmless-base").mkdir(parents=True)
    shutil.copy(src, data / "harmless-base/test.jsonl.gz")
    # the demo tokenizer (512 pieces) makes long sequences: a tight budget exercises truncation
    dpo_prepare(demo_root, data, tmp_path / "out", "--subsets", "harmless-base", "--split", "test",
                    "--eval_pairs", "0", "--max_len", "600", "--max_prompt_len", "400")
    report = json.loads((tmp_path / "out/data_report.json").read_text())
    assert report["rows_read"] == 200
    drops = report["rows_dropped"]
    assert drops["empty reply"]["count"] >= 1
    assert drops["prompt longer than max_prompt_len"]["count"] >= 1
    assert report["rows_truncated"] >= 1
    assert report["rows_kept"] + sum(v["count"] for v in drops.values()) == 200  # every row accounted for
    assert report["tokens_after_truncation"]["max"] <= 600


def test_cache_hits_and_invalidates(demo_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_root / "data/demo/airoboros", data)
    out = tmp_path / "out"
    first = sft_prepare(demo_root, data, out).stdout
    assert "data: prepared" in first
    report1 = json.loads((out / "data_report.json").read_text())
    second = sft_prepare(demo_root, data, out).stdout
    assert "data: cache hit" in second
    assert json.loads((out / "data_report.json").read_text())["data_digest"] == report1["data_digest"]
    # a setting that shapes the data: a miss
    assert "data: prepared" in sft_prepare(demo_root, data, out, "--max_seq_len", "200").stdout
    # a changed input file: a miss, and different data
    with open(data / "instructions.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"instruction": "One more?", "response": "Yes."}) + "\n")
    third = sft_prepare(demo_root, data, out).stdout
    assert "data: prepared" in third
    assert json.loads((out / "data_report.json").read_text())["data_digest"] != report1["data_digest"]
    # a damaged cache entry is rebuilt, not trusted
    for entry in (out / "cache").glob("*.safetensors"):
        entry.write_bytes(entry.read_bytes()[:100])
    fourth = sft_prepare(demo_root, data, out).stdout
    assert "unreadable" in fourth and "data: prepared" in fourth


def test_dpo_cache_round_trips_pairs_exactly(demo_root, tmp_path):
    out = tmp_path / "out"
    dpo_prepare(demo_root, demo_root / "data/demo/hh-rlhf", out)
    a = json.loads((out / "data_report.json").read_text())
    p = dpo_prepare(demo_root, demo_root / "data/demo/hh-rlhf", out)
    assert "data: cache hit" in p.stdout
    assert json.loads((out / "data_report.json").read_text()) == a


def test_resume_refuses_changed_data(demo_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_root / "data/demo/airoboros", data)
    args = stage_args(demo_root, "sft", data_dir=data, output_dir=tmp_path / "sft", cache_dir=tmp_path / "cache")
    run("sft.py", *args, "--max_steps", "2", "--save_steps", "2")
    shutil.rmtree(tmp_path / "sft/final")  # as if interrupted right after the step-2 checkpoint
    lines = (data / "instructions.jsonl").read_text(encoding="utf-8").splitlines()
    (data / "instructions.jsonl").write_text("\n".join(lines[:-3]) + "\n", encoding="utf-8")
    p = run("sft.py", *args, "--max_steps", "4", check=False)
    assert p.returncode != 0 and "prepared data changed" in p.stdout and "Traceback" not in p.stdout


def _read_rows(path):
    import gzip
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return {i: json.loads(line) for i, line in enumerate(f, 1) if line.strip()}


def test_show_examples_are_the_trained_ids_in_file_order(demo_root, tmp_path):
    """--show_examples N: the first N kept rows, in file order, unpacked, each exactly
    [BOS] + encode(prompt + reply) + [EOS] with -100 over BOS + prompt (the real data path)."""
    import qlora.data
    tok = qlora.data.Tokenizer(demo_root / "models/demo-llama")
    data = write_airoboros(tmp_path / "data", [])
    lines = (data / "instructions.jsonl").read_text().splitlines()
    lines[1] = '{"instruction": "", "response": "dropped: empty"}'  # line 2 is not kept: skipped in the listing
    (data / "instructions.jsonl").write_text("\n".join(lines) + "\n")
    p = sft_prepare(demo_root, data, tmp_path / "out", "--show_examples", "3", "--max_bad_fraction", "0.5")
    shown = json.loads((tmp_path / "out/examples.json").read_text())
    assert [e["where"] for e in shown] == ["instructions.jsonl:1", "instructions.jsonl:3", "instructions.jsonl:4"]
    rows = _read_rows(data / "instructions.jsonl")
    for e in shown:
        row = rows[int(e["where"].rsplit(":", 1)[1])]
        prompt = qlora.data.format_prompt([row["instruction"]])
        (p_ids,) = tok.encode([prompt])
        assert e["input_ids"] == [tok.bos_id] + tok.encode([prompt + row["response"]])[0] + [tok.eos_id]
        assert e["labels"] == [-100] * (1 + len(p_ids)) + e["input_ids"][1 + len(p_ids):]
    assert "[[Answer 0.</s>]]" in p.stdout and "boundary (prompt | first trained tokens)" in p.stdout
    assert "data report written" in p.stdout  # --prepare_only: stopped after writing them
    # 'all': every kept record (the held-out ones too), still in file order
    sft_prepare(demo_root, data, tmp_path / "out", "--show_examples", "all", "--max_bad_fraction", "0.5")
    shown = json.loads((tmp_path / "out/examples.json").read_text())
    report = json.loads((tmp_path / "out/data_report.json").read_text())
    assert len(shown) == report["rows_kept"] == 39
    assert [int(e["where"].rsplit(":", 1)[1]) for e in shown] == [1] + list(range(3, 41))


def test_show_examples_dpo_both_sides(demo_root, tmp_path):
    import qlora.data
    tok = qlora.data.Tokenizer(demo_root / "models/demo-llama")
    data = demo_root / "data/demo/hh-rlhf"
    p = dpo_prepare(demo_root, data, tmp_path / "out", "--subsets", "helpful-base", "--show_examples", "2")
    shown = json.loads((tmp_path / "out/examples.json").read_text())
    assert [e["where"].rsplit(":", 1)[0] for e in shown] == ["helpful-base/train.jsonl.gz"] * 2
    rows = _read_rows(data / "helpful-base/train.jsonl.gz")
    for e in shown:
        row = rows[int(e["where"].rsplit(":", 1)[1])]
        for side in ("chosen", "rejected"):
            turns, reply = qlora.data.split_hh(row[side])
            prompt = qlora.data.format_prompt(turns)
            (p_ids,) = tok.encode([prompt])
            assert e[side]["input_ids"] == [tok.bos_id] + tok.encode([prompt + reply])[0] + [tok.eos_id]
            assert e[side]["labels"][:1 + len(p_ids)] == [-100] * (1 + len(p_ids))
    assert "(chosen)" in p.stdout and "(rejected)" in p.stdout


@pytest.mark.parametrize("value", ["0", "-2", "some", "1.5"])
def test_show_examples_bad_value(demo_root, tmp_path, value):
    p = sft_prepare(demo_root, demo_root / "data/demo/airoboros", tmp_path / "out", "--show_examples", value,
                    check=False)
    assert p.returncode == 1 and "Traceback" not in p.stdout
    assert f"--show_examples: expected a whole number >= 1 or 'all', got '{value}'" in p.stdout
    assert not (tmp_path / "out").exists()  # refused before anything was written
