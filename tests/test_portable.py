"""Proves the folder is portable, the way the airgapped workflow uses it: a run is killed
(kill -9) mid-SFT in one place, the whole folder is copied elsewhere and the original is
deleted, and there `make verify && make train` checks the inputs and continues the run from
its last checkpoint to a merged model. No saved config, checkpoint or report holds an absolute
path of either place.

    .venv/bin/python -m pytest -q tests/test_portable.py
"""

import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import NETGUARD, NETGUARD_LOG, ROOT

VENV = ROOT / ".venv"


def make(cwd, *targets, **kw):
    # the repo's own venv (the copy has none); -o: never rebuild it because the lock's mtime moved
    cmd = ["make", f"VENV={VENV}", "-o", f"{VENV}/.installed", "PRESET=demo", *targets]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(NETGUARD), NETGUARD_LOG=str(NETGUARD_LOG))
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


@pytest.mark.slow  # builds or trains a model (left out by make test-fast)
def test_copy_to_another_path_and_continue(tmp_path):
    first = tmp_path / "box-a" / "qlora"
    first.mkdir(parents=True)
    for f in list(ROOT.glob("*.py")) + [ROOT / "Makefile", ROOT / "requirements.lock"]:
        shutil.copy2(f, first / f.name)
    for d in ("qlora", "tools"):  # the library and the tools the Make targets run
        shutil.copytree(ROOT / d, first / d, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([str(VENV / "bin/python"), "tools/demo_assets.py"], cwd=first, check=True, capture_output=True)

    # start the demo training and kill -9 the whole process group once a checkpoint exists
    proc = make(first, "train")
    marker = first / "checkpoints/demo/sft/step_000010/COMPLETE.json"
    deadline = time.time() + 300
    while not marker.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.is_file(), proc.communicate()[0][-3000:] if proc.poll() is not None else "no checkpoint in 300 s"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (first / "checkpoints/demo/sft/final").exists()

    # the airgapped move: copy everything, remove the original
    second = tmp_path / "box-b" / "somewhere" / "qlora"
    shutil.copytree(first, second, symlinks=True)
    shutil.rmtree(tmp_path / "box-a")

    out = make(second, "verify").communicate(timeout=120)[0]
    assert "verify: ok" in out, out
    p = make(second, "train")
    out = p.communicate(timeout=900)[0]
    assert p.returncode == 0, out[-4000:]
    assert "resumed from sft/step_0000" in out, out[-4000:]
    assert (second / "models/demo-merged/COMPLETE.json").is_file()

    # no absolute path of either place in anything written
    for f in list((second / "checkpoints").rglob("*.json")) + list((second / "models/demo-merged").glob("*.json")):
        text = f.read_text()
        assert str(tmp_path) not in text, f"{f} contains an absolute path"

    # and verify names a damaged file with the command that repairs it
    (second / "data/demo/airoboros/instructions.jsonl").write_text("cut")
    p = make(second, "verify")
    out = p.communicate(timeout=120)[0]
    assert p.returncode != 0
    assert "data/demo/airoboros/instructions.jsonl: size 3 bytes" in out and "repair: make clean-demo" in out
