"""Proves the training side never touches the network: the guard used for every script run in
these tests has teeth, the whole demo pipeline (SFT -> DPO -> merge -> chat) ran under it without
one denied connect or DNS lookup, and, where the kernel allows an unprivileged network namespace
(`unshare -rn`: no interface at all, not even loopback), a training run passes inside one.

    .venv/bin/python -m pytest -q tests/test_offline.py
"""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import NETGUARD, NETGUARD_LOG, ROOT, run, stage_args


def test_guard_denies_and_logs(tmp_path):
    log = tmp_path / "denied.log"
    code = ("import socket\n"
            "s = socket.socket()\n"
            "try:\n    s.connect(('1.1.1.1', 443))\nexcept OSError as e:\n    print('denied:', e)\n"
            "socket.getaddrinfo('localhost', 80)\n")  # loopback stays allowed
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(NETGUARD), NETGUARD_LOG=str(log)),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "denied: netguard" in p.stdout
    assert log.read_text().split()[1:] == ["connect", "1.1.1.1:443"]


def test_demo_pipeline_made_no_network_call(pipeline):
    root, out = pipeline
    run("tools/chat.py", "--preset", "demo", "--model_dir", root / "models/merged", "--prompt", "Hi")
    assert (root / "models/merged/COMPLETE.json").is_file()
    denied = NETGUARD_LOG.read_text() if NETGUARD_LOG.exists() else ""
    assert denied == "", f"an offline stage tried the network:\n{denied}"


def test_training_inside_a_network_namespace(demo_root, tmp_path):
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode != 0:
        pytest.skip("unprivileged network namespaces are not available here (the socket guard test still runs)")
    args = stage_args(demo_root, "sft", output_dir=tmp_path / "sft", cache_dir=tmp_path / "cache")
    p = subprocess.run(["unshare", "-rn", sys.executable, str(ROOT / "sft.py"), *map(str, args), "--max_steps", "4"],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert p.returncode == 0, p.stdout[-3000:]
    assert (tmp_path / "sft/final/COMPLETE.json").is_file()
