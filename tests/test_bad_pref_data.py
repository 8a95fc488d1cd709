"""Adversarial preference data (hh-rlhf <subset>/{train,test}.jsonl.gz): every bad or unusable
pair is dropped with the right reason at the right `subset/file:line`; a damaged FILE (not
gzip, cut short, empty) stops the run naming the subset; the bad-row budget is judged per
file; an empty held-out set is an error unless --eval_pairs 0 asks for no eval. Transcript
and gzip cases run in-process; the pair rules run the real `dpo.py --prepare_only`.

    .venv/bin/python -m pytest -q tests/test_bad_pref_data.py
"""

import gzip
import json
import shutil

import pytest

import qlora.data
from conftest import assert_row_outcome, run, stage_args


def hh(*turns):
    """turns = human, assistant, human, assistant... -> an hh-rlhf transcript."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


# -----------------------------------------------------------------------------
# Transcripts (qlora.data.split_hh): the final assistant turn is the reply, or a named reason.

@pytest.mark.parametrize("name,transcript,expected", [
    ("one turn", hh("Hi?", "Hello."), (["Hi?"], "Hello.")),
    ("multi-turn", hh("a", "b", "c", "d"), (["a", "b", "c"], "d")),
    ("empty final reply", hh("a", ""), (["a"], "")),
    ("whitespace final reply", hh("a", "  \n "), (["a"], "")),
    ("stray 'Human:' without a blank line stays in the reply", hh("a", "He said Human: hi"),
     (["a"], "He said Human: hi")),
    ("no assistant turn", "\n\nHuman: only a question", "not a Human/Assistant transcript"),
    ("plain text", "no roles at all", "not a Human/Assistant transcript"),
    ("starts with the assistant", "\n\nAssistant: hi\n\nHuman: yo\n\nAssistant: ok",
     "not a Human/Assistant transcript"),
    ("text before the first turn", "Preamble" + hh("a", "b"), "not a Human/Assistant transcript"),
    ("two assistant turns in a row", "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c",
     "not a Human/Assistant transcript"),
    ("ends on a human turn", hh("a", "b", "c"), "transcript ends on a Human turn"),
    ("ends on an empty human turn", hh("a", "b") + "\n\nHuman:", "transcript ends on a Human turn"),
])
def test_split_hh(name, transcript, expected):
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            qlora.data.split_hh(transcript)
    else:
        assert qlora.data.split_hh(transcript) == expected


# -----------------------------------------------------------------------------
# gzip files (qlora.data.read_jsonl): a damaged file is a file-level error naming it.

ROW = json.dumps({"chosen": hh("q", "good"), "rejected": hh("q", "bad")})


def gz(rows):
    return gzip.compress(("\n".join(rows) + "\n").encode())


@pytest.mark.parametrize("name,make,message", [
    ("cut short", lambda: gz([ROW] * 200)[:-40], "is cut short after line"),
    ("not gzip at all", lambda: ("\n".join([ROW] * 3) + "\n").encode(), "is not a gzip file"),
    ("gzip followed by garbage", lambda: gz([ROW] * 3) + b"garbage!", "is damaged after line 3"),
    ("0 bytes", lambda: b"", "the file is empty (no rows)"),
    ("an empty gzip", lambda: gzip.compress(b""), "the file is empty (no rows)"),
    ("a gzip of blank lines", lambda: gzip.compress(b"\n\n\n"), "the file is empty (no rows)"),
])
def test_damaged_gzip_is_a_file_error(tmp_path, name, make, message):
    path = tmp_path / "helpful-base" / "train.jsonl.gz"
    path.parent.mkdir()
    path.write_bytes(make())
    report = qlora.data.DataReport("t")
    with pytest.raises(SystemExit) as e:
        list(qlora.data.read_jsonl(path, report, label="helpful-base/train.jsonl.gz"))
    assert str(e.value).startswith(f"{path}: {message}") and "make verify FULL=1" in str(e.value)


def test_concatenated_gzip_members_are_one_file(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gz([ROW] * 2) + gz([ROW] * 3))  # what `cat a.gz b.gz` makes: valid gzip
    report = qlora.data.DataReport("t")
    assert [n for n, _ in qlora.data.read_jsonl(path, report)] == [1, 2, 3, 4, 5] and report.bad == 0


def test_gzip_of_garbage_is_counted_row_by_row(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(bytes(range(11, 256)) * 4 + b"\n" + ROW.encode() + b"\n"))  # no newline byte
    report = qlora.data.DataReport("t")
    assert [n for n, _ in qlora.data.read_jsonl(path, report, label="s/train.jsonl.gz")] == [2]
    assert report.dropped == {"invalid UTF-8": [1, ["s/train.jsonl.gz:1"]]}


# -----------------------------------------------------------------------------
# The real script: every pair rule, with subset/file:line, in one prepare run.

PAIRS = [  # (row, reason or None = kept)
    ({"chosen": hh("What is 2+2?", "4."), "rejected": hh("What is 2+2?", "5.")}, None),
    ({"chosen": hh("a", "b", "Multi-turn?", "Yes."), "rejected": hh("a", "b", "Multi-turn?", "No.")}, None),
    ({"chosen": hh("Unicode?", "東京 👋"), "rejected": hh("Unicode?", "Γειά")}, None),
    ({"chosen": hh("q", "He said Human: hi"), "rejected": hh("q", "no")}, None),
    ({"chosen": hh("q", "yes")}, "missing or non-string chosen/rejected"),
    ({"chosen": hh("q", "yes"), "rejected": 7}, "missing or non-string chosen/rejected"),
    ({"chosen": None, "rejected": hh("q", "no")}, "missing or non-string chosen/rejected"),
    ({"chosen": "plain text", "rejected": hh("q", "no")}, "not a Human/Assistant transcript"),
    ({"chosen": hh("q", "a"), "rejected": "\n\nAssistant: x\n\nHuman: q\n\nAssistant: y"},
     "not a Human/Assistant transcript"),
    ({"chosen": hh("q", "a", "next?"), "rejected": hh("q", "a", "next?")}, "transcript ends on a Human turn"),
    ({"chosen": hh("q", "ok", "more?", "x"), "rejected": hh("q", "no")}, "chosen and rejected prompts differ"),
    ({"chosen": hh("q", ""), "rejected": hh("q", "no")}, "empty reply"),
    ({"chosen": hh("q", "yes"), "rejected": hh("q", "   ")}, "empty reply"),
    ({"chosen": hh("q", "same"), "rejected": hh("q", "same")}, "identical chosen and rejected"),
    ({"chosen": hh("w " * 200, "a"), "rejected": hh("w " * 200, "b")}, "prompt longer than max_prompt_len"),
    ({"chosen": hh("q", "x " * 300 + "A"), "rejected": hh("q", "x " * 300 + "B")}, "identical after truncation"),
    ({"chosen": hh("Long?", "y " * 300), "rejected": hh("Long?", "short")}, None),  # kept, chosen truncated
]
RAW_BAD = [b"{broken", b'["a list"]', b'{"chosen": "\\ud800", "rejected": "x"}', b"\xff\xfe"]
RAW_REASONS = ["invalid JSON", "not a JSON object", "invalid unicode (lone surrogate escape)", "invalid UTF-8"]
N_GOOD = 30


@pytest.fixture(scope="module")
def pair_run(demo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo_pairs")
    data = tmp / "hh"
    shutil.copytree(demo_root / "data/demo/hh-rlhf", data)
    good = [json.dumps({"chosen": hh(f"Q{i}?", f"Good {i}."), "rejected": hh(f"Q{i}?", f"Bad {i}.")})
            for i in range(N_GOOD)]
    lines = [json.dumps(r).encode() for r, _ in PAIRS] + RAW_BAD + [g.encode() for g in good]
    (data / "harmless-base/train.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    args = stage_args(demo_root, "dpo", data_dir=data, output_dir=tmp / "out", cache_dir=tmp / "cache")
    p = run("dpo.py", *args, "--prepare_only", "--subsets", "harmless-base", "--show_examples", "all",
            "--max_bad_fraction", "0.5", "--max_len", "192", "--max_prompt_len", "128")
    report = json.loads((tmp / "out/data_report.json").read_text())
    examples = {e["where"]: e for e in json.loads((tmp / "out/examples.json").read_text())}
    return p.stdout, report, examples, len(lines)


CASES = [(i + 1, reason) for i, (_, reason) in enumerate(PAIRS)] + \
        [(len(PAIRS) + i + 1, reason) for i, reason in enumerate(RAW_REASONS)]


@pytest.mark.parametrize("line,reason", CASES, ids=[f"line{n}-{r or 'kept'}" for n, r in CASES])
def test_each_pair_rule(pair_run, line, reason):
    stdout, report, examples, _ = pair_run
    assert_row_outcome(stdout, report, examples, f"harmless-base/train.jsonl.gz:{line}", reason)


def test_pair_run_accounts_for_every_row_and_reports_kept_pairs_only(pair_run, demo_root):
    stdout, report, examples, n_lines = pair_run
    dropped = sum(v["count"] for v in report["rows_dropped"].values())
    assert report["rows_read"] == n_lines and report["rows_kept"] + dropped == n_lines
    train = {w: e for w, e in examples.items() if "/train." in w}
    assert len(train) == report["rows_kept"] == N_GOOD + sum(r is None for _, r in PAIRS)
    # truncation is symmetric: both sides of the long pair fill max_len, and the cut side has no EOS
    tok = qlora.data.Tokenizer(demo_root / "models/demo-llama")
    long = examples[f"harmless-base/train.jsonl.gz:{len(PAIRS)}"]
    assert len(long["chosen"]["input_ids"]) == 192 and tok.eos_id not in long["chosen"]["input_ids"]
    assert long["rejected"]["input_ids"][-1] == tok.eos_id
    assert report["rows_truncated"] == 1
    assert report["tokens_after_truncation"]["max"] == 192
    # the held-out report counts what it kept (it said 0 before), and every test row is accounted for
    ev = report["eval"]
    assert ev["rows_kept"] == report["eval_pairs"] > 0
    usable = ev["rows_read"] - sum(v["count"] for v in ev["rows_dropped"].values())
    assert ev["rows_kept"] == min(16, usable)  # every usable test pair, capped at the demo's eval_pairs 16


def dpo_prepare(demo_root, data, out, *extra):
    args = stage_args(demo_root, "dpo", data_dir=data, output_dir=out, cache_dir=out / "cache")
    return run("dpo.py", "--prepare_only", *args, *extra, check=False)


def damaged_copy(demo_root, tmp_path, rel, content):
    data = tmp_path / "hh"
    shutil.copytree(demo_root / "data/demo/hh-rlhf", data)
    (data / rel).write_bytes(content)
    return data


@pytest.mark.parametrize("rel,content,needle", [
    ("helpful-base/train.jsonl.gz", b"plain text, not gzip\n", "helpful-base/train.jsonl.gz: is not a gzip file"),
    ("helpful-base/train.jsonl.gz", gzip.compress(b""), "helpful-base/train.jsonl.gz: the file is empty"),
    ("helpful-base/train.jsonl.gz", gz(["{bad"] * 10), "helpful-base/train.jsonl.gz: 10 of 10 rows are malformed"),
    ("harmless-base/test.jsonl.gz", gz([ROW] * 50)[:-30], "harmless-base/test.jsonl.gz: is cut short after line"),
    ("harmless-base/test.jsonl.gz", gz(["{bad"] * 10), "harmless-base/test.jsonl.gz: 10 of 10 rows are malformed"),
])
def test_a_damaged_subset_stops_the_run_naming_it(demo_root, tmp_path, rel, content, needle):
    """Judged per file: a ruined small subset cannot hide under the other subsets' good rows."""
    data = damaged_copy(demo_root, tmp_path, rel, content)
    p = dpo_prepare(demo_root, data, tmp_path / "out", "--subsets", "harmless-base,helpful-base")
    assert p.returncode == 1 and "Traceback" not in p.stdout
    assert needle in p.stdout
    assert not (tmp_path / "out/data_report.json").exists()


def test_no_usable_pairs_is_an_error_even_with_prepare_only(demo_root, tmp_path):
    row = json.dumps({"chosen": hh("q", "same"), "rejected": hh("q", "same")})
    data = damaged_copy(demo_root, tmp_path, "harmless-base/train.jsonl.gz", gz([row] * 5))
    p = dpo_prepare(demo_root, data, tmp_path / "out", "--subsets", "harmless-base")
    assert p.returncode == 1 and "Traceback" not in p.stdout
    assert "no usable preference pairs in" in p.stdout and "identical chosen and rejected" in p.stdout


def test_empty_held_out_set_is_an_error_unless_asked_for(demo_root, tmp_path):
    row = json.dumps({"chosen": hh("q", ""), "rejected": hh("q", "no")})
    data = damaged_copy(demo_root, tmp_path, "harmless-base/test.jsonl.gz", gz([row] * 5))
    p = dpo_prepare(demo_root, data, tmp_path / "out", "--subsets", "harmless-base")
    assert p.returncode == 1 and "Traceback" not in p.stdout
    assert "no usable held-out pairs in" in p.stdout and "--eval_pairs 0" in p.stdout
    # asked for: no eval at all, and the report says so
    p = dpo_prepare(demo_root, data, tmp_path / "out", "--subsets", "harmless-base", "--eval_pairs", "0")
    assert p.returncode == 0, p.stdout
    report = json.loads((tmp_path / "out/data_report.json").read_text())
    assert report["eval_pairs"] == 0 and report["eval"]["rows_read"] == 0


def test_no_eval_run_logs_no_fake_eval(pipeline, tmp_path):
    """--eval_pairs 0 trains with no eval line at all (it used to log loss 0.0000, accuracy 0.00)."""
    root, _ = pipeline
    args = stage_args(root, "dpo", output_dir=tmp_path / "dpo", cache_dir=tmp_path / "cache")
    p = run("dpo.py", *args, "--eval_pairs", "0", "--max_steps", "2", "--eval_steps", "1")
    assert "eval loss" not in p.stdout
    history = [json.loads(x) for x in (tmp_path / "dpo/metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and not any("eval_loss" in h or "eval_acc" in h for h in history)


def test_no_eval_needs_no_test_split(demo_root, tmp_path):
    """--eval_pairs 0 (the advice an empty held-out set gives) must work with the test file gone."""
    data = tmp_path / "hh"
    shutil.copytree(demo_root / "data/demo/hh-rlhf", data)
    (data / "harmless-base/test.jsonl.gz").unlink()
    p = dpo_prepare(demo_root, data, tmp_path / "out", "--subsets", "harmless-base")
    assert p.returncode == 1 and "missing input files" in p.stdout and "test.jsonl.gz" in p.stdout
    p = dpo_prepare(demo_root, data, tmp_path / "out", "--subsets", "harmless-base", "--eval_pairs", "0")
    assert p.returncode == 0, p.stdout
