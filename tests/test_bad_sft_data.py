"""Adversarial SFT data (Airoboros instructions.jsonl): every bad row is dropped with the right
reason at the right line and nothing else is lost; a bad FILE stops the run naming it. The
reader cases run in-process on qlora.data.read_jsonl (milliseconds each); the field and
tokenization cases and the file-level errors run the real `sft.py --prepare_only`.

    .venv/bin/python -m pytest -q tests/test_bad_sft_data.py
"""

import json

import pytest

import qlora.data
from conftest import assert_row_outcome, run, stage_args

GOOD = b'{"instruction": "Question?", "response": "Answer."}'


def read(path):
    """-> (yielded line numbers, {reason: [lines]}, report) of qlora.data.read_jsonl on one file."""
    report = qlora.data.DataReport("t")
    lines = [n for n, _ in qlora.data.read_jsonl(path, report)]
    drops = {r: [w.rsplit(":", 1)[1] for w in ws] for r, (n, ws) in report.dropped.items()}
    return lines, drops, report


# One bad line (line 3 of 5, between good rows) -> the reason it must be dropped with.
ROW_CASES = {
    "truncated object": (b'{"instruction": "Q", "response": "A"', "invalid JSON"),
    "trailing garbage": (b'{"instruction": "Q", "response": "A"} extra', "invalid JSON"),
    "single quotes": (b"{'instruction': 'Q', 'response': 'A'}", "invalid JSON"),
    "nesting 100,000 deep": (b'{"instruction": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid JSON"),
    "5,000-digit integer": (b'{"instruction": "Q", "response": ' + b"9" * 5000 + b"}", "invalid JSON"),
    "array": (b'["Q", "A"]', "not a JSON object"),
    "string": (b'"just text"', "not a JSON object"),
    "number": (b"42", "not a JSON object"),
    "null": (b"null", "not a JSON object"),
    "invalid UTF-8 byte": (b'{"instruction": "Q\xff", "response": "A"}', "invalid UTF-8"),
    "latin-1 text": ('{"instruction": "caf\u00e9", "response": "A"}'.encode("latin-1"), "invalid UTF-8"),
    "lone surrogate in instruction": (b'{"instruction": "Q\\ud800", "response": "A"}',
                                      "invalid unicode (lone surrogate escape)"),
    "lone low surrogate in response": (b'{"instruction": "Q", "response": "\\uDC00A"}',
                                       "invalid unicode (lone surrogate escape)"),
}


@pytest.mark.parametrize("case", ROW_CASES, ids=list(ROW_CASES))
def test_bad_row_is_dropped_at_its_line_and_nothing_else(tmp_path, case):
    bad, reason = ROW_CASES[case]
    path = tmp_path / "instructions.jsonl"
    path.write_bytes(b"\n".join([GOOD, GOOD, bad, GOOD, GOOD]) + b"\n")
    lines, drops, report = read(path)
    assert lines == [1, 2, 4, 5], "exactly the bad row is lost"
    assert drops == {reason: ["3"]}
    assert (report.read, report.bad) == (5, 1)


def test_invalid_utf8_near_the_end_of_a_long_file_costs_one_row(tmp_path):
    """The reported case: one bad byte near the end of 2,001 lines used to lose 43 valid rows and
    name the wrong line (a text-mode decode fails per 8 KB chunk)."""
    rows = [json.dumps({"instruction": f"Question {i}?", "response": f"Answer {i}."}).encode() for i in range(2001)]
    rows[1990] = rows[1990].replace(b"Answer", b"Answ\xe9r")
    path = tmp_path / "instructions.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    lines, drops, report = read(path)
    assert drops == {"invalid UTF-8": ["1991"]}
    assert len(lines) == 2000 and 1991 not in lines


def test_one_bad_line_in_a_short_file_is_named_by_its_own_line(tmp_path):
    path = tmp_path / "instructions.jsonl"
    path.write_bytes(GOOD + b"\n" + GOOD + b"\n" + b'{"instruction": "\xc3"}\n')
    assert read(path)[1] == {"invalid UTF-8": ["3"]}


@pytest.mark.parametrize("name,content,lines", [
    ("byte-order mark", b"\xef\xbb\xbf" + GOOD + b"\n" + GOOD + b"\n", [1, 2]),
    ("CRLF line ends", GOOD + b"\r\n" + GOOD + b"\r\n", [1, 2]),
    ("blank lines keep the numbering", GOOD + b"\n\n   \n" + GOOD + b"\n", [1, 4]),
    ("no newline at the end", GOOD + b"\n" + GOOD, [1, 2]),
    ("escaped valid pair is not a lone surrogate", b'{"instruction": "\\ud83d\\ude00", "response": "A"}\n', [1]),
])
def test_harmless_quirks_are_read(tmp_path, name, content, lines):
    path = tmp_path / "instructions.jsonl"
    path.write_bytes(content)
    got, drops, _ = read(path)
    assert got == lines and drops == {}


@pytest.mark.parametrize("name,content,message", [
    ("0 bytes", b"", "the file is empty (no rows)"),
    ("only blank lines", b"\n\n  \n", "the file is empty (no rows)"),
    ("a folder where the file should be", None, "cannot be read (Is a directory)"),
])
def test_file_level_errors_name_the_file(tmp_path, name, content, message):
    path = tmp_path / "instructions.jsonl"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        read(path)
    assert str(e.value).startswith(f"{path}: {message}") and "make verify FULL=1" in str(e.value)


def test_unreadable_file_names_it(tmp_path, monkeypatch):
    """chmod 000 does not stop root (tests run as root here): the same OSError, injected."""
    path = tmp_path / "instructions.jsonl"
    path.write_bytes(GOOD + b"\n")
    real_open = open

    def deny(p, *a, **k):
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(p, *a, **k)
    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(SystemExit, match="instructions.jsonl: cannot be read \\(Permission denied\\)"):
        read(path)


# -----------------------------------------------------------------------------
# The real script: field rules, tokenization limits and the bad-row budget, end to end.

FIELD_ROWS = [  # (line content, reason or None = kept)
    ({"instruction": "Question A?", "response": "Answer A."}, None),
    ({"response": "no instruction"}, "missing or non-string instruction/response"),
    ({"instruction": "no response"}, "missing or non-string instruction/response"),
    ({"instruction": 7, "response": "seven"}, "missing or non-string instruction/response"),
    ({"instruction": "Q", "response": ["a", "list"]}, "missing or non-string instruction/response"),
    ({"instruction": "Q", "response": None}, "missing or non-string instruction/response"),
    ({"instruction": "", "response": "A"}, "empty instruction or response"),
    ({"instruction": "Q", "response": " \n\t "}, "empty instruction or response"),
    ({"instruction": "word " * 400, "response": "A"}, "prompt alone fills max_seq_len"),
    ({"instruction": "Print </s> and <s>.", "response": "Here: </s> <s>"}, None),  # text, never a real EOS
    ({"instruction": "Long?", "response": "word " * 400}, None),  # kept, truncated, no EOS
    ({"instruction": "Unicode?", "response": "東京 👋 Γειά \u0000 nul"}, None),
    ({"instruction": "Extra fields?", "response": "Fine.", "category": "x", "id": 3}, None),
]


@pytest.fixture(scope="module")
def field_run(demo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_fields")
    data = tmp / "data"
    data.mkdir()
    good = [{"instruction": f"Question {i}?", "response": f"Answer {i}."} for i in range(20)]
    rows = [r for r, _ in FIELD_ROWS] + good
    (data / "instructions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    args = stage_args(demo_root, "sft", data_dir=data, output_dir=tmp / "out", cache_dir=tmp / "cache")
    p = run("sft.py", *args, "--prepare_only", "--show_examples", "all", "--max_bad_fraction", "0.5")
    report = json.loads((tmp / "out/data_report.json").read_text())
    examples = {e["where"]: e for e in json.loads((tmp / "out/examples.json").read_text())}
    return p.stdout, report, examples, len(rows)


@pytest.mark.parametrize("i", range(len(FIELD_ROWS)), ids=[str(r[1] or "kept") + f"-line{i + 1}"
                                                         for i, r in enumerate(FIELD_ROWS)])
def test_field_rules_drop_or_keep_each_row(field_run, i):
    stdout, report, examples, _ = field_run
    assert_row_outcome(stdout, report, examples, f"instructions.jsonl:{i + 1}", FIELD_ROWS[i][1])


def test_field_run_accounts_for_every_row(field_run, demo_root):
    stdout, report, examples, n_rows = field_run
    dropped = sum(v["count"] for v in report["rows_dropped"].values())
    assert report["rows_read"] == n_rows and report["rows_kept"] + dropped == n_rows == len(examples) + dropped
    assert report["rows_truncated"] == 1  # the long reply, and not the dropped long prompt
    tok = qlora.data.Tokenizer(demo_root / "models/demo-llama")
    special = examples["instructions.jsonl:10"]
    assert special["input_ids"].count(tok.eos_id) == 1 and special["input_ids"][-1] == tok.eos_id
    long = examples["instructions.jsonl:11"]
    assert tok.eos_id not in long["input_ids"] and len(long["input_ids"]) == 256  # cut, and no EOS taught
    # percentiles of kept rows only: the dropped 400-word prompt is not in them
    assert report["tokens_before_truncation"]["max"] == max(
        len(e["input_ids"]) for w, e in examples.items() if w != "instructions.jsonl:11") or \
        report["tokens_before_truncation"]["max"] > 256  # the truncated reply's own untruncated length


def sft_prepare(demo_root, data, out, *extra):
    args = stage_args(demo_root, "sft", data_dir=data, output_dir=out, cache_dir=out / "cache")
    return run("sft.py", *args, "--prepare_only", *extra, check=False)


@pytest.mark.parametrize("name,content,needle", [
    ("empty file", b"", "instructions.jsonl: the file is empty (no rows)"),
    ("every row bad", b"{not json}\n" * 10, "10 of 10 rows are malformed"),
    ("over the 1% budget", (GOOD + b"\n") * 97 + b"{bad\n" * 3, "3 of 100 rows are malformed (3.0% > max_bad_fraction 1.0%)"),
    ("nothing usable", (json.dumps({"instruction": "w " * 400, "response": "A"}) + "\n").encode() * 3,
     "no usable training examples"),
])
def test_script_stops_with_one_clear_message(demo_root, tmp_path, name, content, needle):
    data = tmp_path / "data"
    data.mkdir()
    (data / "instructions.jsonl").write_bytes(content)
    p = sft_prepare(demo_root, data, tmp_path / "out")
    assert p.returncode == 1 and "Traceback" not in p.stdout
    assert needle in p.stdout
    assert str(data / "instructions.jsonl") in p.stdout  # the file, with its folder


def test_under_the_budget_the_run_goes_on(demo_root, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "instructions.jsonl").write_bytes((GOOD + b"\n") * 99 + b"{bad\n")  # 1 of 100 = 1.0%, not > 1%
    p = sft_prepare(demo_root, data, tmp_path / "out")
    assert p.returncode == 0, p.stdout
    report = json.loads((tmp_path / "out/data_report.json").read_text())
    assert report["rows_dropped"] == {"invalid JSON": {"count": 1, "first_lines": ["instructions.jsonl:100"]}}
