"""Protects the command line of tools/chat.py and tools/eval.py: --help and a bad flag answer
without importing torch.

    .venv/bin/python -m pytest -q tests/test_generate.py
"""

import pytest

from conftest import run


@pytest.mark.parametrize("script,bad_flag,hint", [
    ("tools/eval.py", "--max_eval_row", "did you mean --max_eval_rows?"),
    ("tools/chat.py", "--temprature", "did you mean --temperature?"),
])
def test_help_and_bad_flags_answer_without_torch(tmp_path, monkeypatch, script, bad_flag, hint):
    """--help and a typo must answer before the library loads torch (seconds, and the whole
    environment): a `torch` that cannot be imported is put first on the path."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch/__init__.py").write_text("raise ImportError('torch was imported')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    p = run(script, "--help")
    assert "--max_new_tokens" in p.stdout and "torch was imported" not in p.stdout
    p = run(script, bad_flag, "1", check=False)
    assert p.returncode != 0 and hint in p.stdout and "torch was imported" not in p.stdout
    # the guard has teeth: past the command line, the same script does import torch
    p = run(script, "--preset", "demo", "--max_new_tokens", "1", check=False)
    assert "torch was imported" in p.stdout
