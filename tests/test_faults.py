"""Protects 'a fault at any moment ends with one clear line, and the last good checkpoint stays
intact' (issue 16, faults group), on the CPU demo:

- training health: a NaN/inf loss or gradient norm in SFT or DPO, before the first save and
  after one, stops the run (exit 1) with the step and the knobs, and never writes a checkpoint
  or an adapter holding NaN/inf; a re-run with a sane --lr resumes from the last good one;
- Ctrl+C / SIGTERM in every start-up phase of sft.py and dpo.py (and merge.py while it
  writes): one line, exit 128 + signal, no traceback; a second Ctrl+C in the loop exits at once;
- a full disk at every write before the first checkpoint (config.json, data_report.json,
  metrics.jsonl, the data cache) and during a save: one line naming the path, no traceback.

Faults come from qlora.runtime.inject_fault (QLORA_FAULT=<point>:<where>: a real signal sent to the process
as a phase begins, a write failing exactly as safetensors fails on a full disk), from real
full filesystems (/dev/full, and a tmpfs where this machine lets us mount one), and from
signals sent from outside when a marker line is printed.

    .venv/bin/python -m pytest -q tests/test_faults.py
"""

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

import qlora.checkpoint
import qlora.files
import qlora.runtime
from conftest import ROOT, run, stage_args

# one thread: the demo model gains nothing from more, and on a shared CPU idle OpenMP threads
# spinning against other processes cost 2-3x the wall time
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

SFT = ["--max_steps", "4", "--save_steps", "2", "--log_steps", "1"]
DPO = ["--max_steps", "4", "--save_steps", "2", "--log_steps", "1"]


@pytest.fixture(scope="module")
def bases(demo_root, tmp_path_factory):
    """A finished 2-step SFT and DPO run (step_000002 + final each): the SFT adapter DPO starts
    from, and the 'last good checkpoint' the cases below resume from or must leave intact."""
    root = tmp_path_factory.mktemp("faults")
    run("sft.py", *stage_args(demo_root, "sft", output_dir=root / "sft"), *SFT, "--max_steps", "2", env=ONE_THREAD)
    run("dpo.py", *stage_args(demo_root, "dpo", sft_dir=root / "sft/final", output_dir=root / "dpo"),
        *DPO, "--max_steps", "2", env=ONE_THREAD)
    return root


def args(demo_root, bases, stage, out, **over):
    if stage == "dpo":
        over.setdefault("sft_dir", bases / "sft/final")
    return [*stage_args(demo_root, stage, output_dir=out, **over), *(SFT if stage == "sft" else DPO)]


def with_checkpoint(bases, stage, tmp_path):
    """A copy of the stage's run as an interrupted one: step_000002 is its last good checkpoint."""
    out = tmp_path / stage
    shutil.copytree(bases / stage, out)
    shutil.rmtree(out / "final")
    return out


def fault(script, argv, spec, rc):
    p = run(script, *argv, check=False, env=dict(ONE_THREAD, QLORA_FAULT=spec))
    assert p.returncode == rc, p.stdout[-3000:]
    assert "Traceback" not in p.stdout, p.stdout[-3000:]
    return p.stdout


def the_line(text, start):
    """The one line starting with `start` (the message a user reads)."""
    lines = [line for line in text.splitlines() if line.startswith(start)]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def snapshot(out):
    """Every step folder's COMPLETE.json (the sha256 of each file): equal before and after = untouched."""
    return {p.name: (p / "COMPLETE.json").read_text() for p in qlora.checkpoint.step_folders(out)}


def assert_last_good(out, name):
    """The newest complete checkpoint is `name`, its files match their recorded hashes, every
    float tensor in it is finite, and no half-written save or final adapter is left."""
    newest = qlora.checkpoint.latest_checkpoint(out)
    assert newest is not None and newest.name == name, [p.name for p in qlora.checkpoint.step_folders(out)]
    assert qlora.files.verify_checkpoint(newest) == []
    for f in newest.glob("*.safetensors"):
        for k, t in load_file(f).items():
            assert not t.is_floating_point() or torch.isfinite(t).all(), f"{f.name}: {k}"
    assert not list(out.glob("*.tmp")) and not (out / "final").exists()


# -----------------------------------------------------------------------------
# Training health: in-process checks of the one function both loops call, and of the claims
# its docstring makes about when a loss and a gradient norm disagree.

SFT_CFG = types.SimpleNamespace(lr=2e-4, grad_clip=0.3)
DPO_CFG = types.SimpleNamespace(lr=2e-5, grad_clip=0.0, beta=0.1)


@pytest.mark.parametrize("loss, norm, cfg, ckpt, says", [
    (float("nan"), 1.0, SFT_CFG, None, ["step 7: loss nan, gradient norm 1", "--lr (now 0.0002)", "--grad_clip (now 0.3)"]),
    (float("inf"), 2.0, DPO_CFG, None, ["step 7: loss inf", "--beta (now 0.1)", "--grad_clip > 0 (now off)"]),
    (0.5, float("inf"), SFT_CFG, "out/step_000006", ["step 7: loss 0.5, gradient norm inf"]),
    (0.5, float("nan"), DPO_CFG, "out/step_000006", ["gradient norm nan", "--beta (now 0.1)"]),
], ids=["nan-loss-finite-grad", "inf-loss-dpo", "inf-grad", "nan-grad-dpo"])
def test_check_health_stops_on_any_non_finite_value(monkeypatch, loss, norm, cfg, ckpt, says):
    monkeypatch.setitem(qlora.runtime.run_status, "checkpoint", ckpt)  # what find_resume / the last save recorded
    with pytest.raises(SystemExit) as e:
        qlora.runtime.check_health(7, loss, torch.tensor(norm), cfg)
    text = str(e.value.code)
    assert all(s in text for s in says), text
    assert "stopped before this step changed the weights, nothing of it was saved" in text
    assert (f"last good checkpoint: {ckpt}; re-run with a fix and it resumes from there" if ckpt
            else "no checkpoint was written yet; re-run with a fix") in text
    assert ("--beta" in text) == hasattr(cfg, "beta")


def test_check_health_passes_finite_values_through_as_a_float():
    assert qlora.runtime.check_health(1, 0.69, torch.tensor(0.25), DPO_CFG) == 0.25


def test_a_non_finite_loss_can_have_finite_gradients_and_nan_activations_poison_every_gradient():
    """Why check_health looks at both: (1) cross-entropy whose target logit is -inf has an
    infinite loss but the finite gradient softmax - onehot; (2) one NaN activation gives a NaN
    loss AND a NaN clip_grad_norm_ (so the norm alone covers that case, at no extra sync)."""
    logits = torch.tensor([[0.0, float("-inf"), 1.0]], requires_grad=True)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([1]))
    loss.backward()
    assert loss.item() == math.inf and torch.isfinite(logits.grad).all()
    w = torch.nn.Parameter(torch.ones(3))
    x = torch.tensor([1.0, float("nan"), 2.0])
    (w * x).sum().backward()
    assert math.isnan(float(torch.nn.utils.clip_grad_norm_([w], 0.3)))


@pytest.mark.parametrize("file, key", [("adapter_model.safetensors", "lora_B"), ("optimizer.safetensors", "exp_avg")])
def test_write_checkpoint_refuses_a_non_finite_tensor(tmp_path, file, key):
    files = {"adapter_model.safetensors": {"lora_A": torch.ones(2, 2), "lora_B": torch.zeros(2, 2)},
             "optimizer.safetensors": {"exp_avg": torch.ones(3), "step": torch.tensor([1], dtype=torch.int64)}}
    files[file][key] = files[file][key].clone().index_fill_(0, torch.tensor([0]), float("nan"))
    with pytest.raises(SystemExit) as e:
        qlora.checkpoint.write_checkpoint(tmp_path / "step_000003", files, {"trainer_state.json": {"step": 3}})
    assert f"refusing to write {tmp_path / 'step_000003'}: {file} tensor {key} has NaN/inf" in str(e.value.code)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the .tmp folder
    files[file][key] = torch.zeros_like(files[file][key])  # control: the same files, finite, are written
    qlora.checkpoint.write_checkpoint(tmp_path / "step_000003", files, {"trainer_state.json": {"step": 3}})
    assert qlora.files.verify_checkpoint(tmp_path / "step_000003") == []


# -----------------------------------------------------------------------------
# Training health in real runs: --lr 1e30 makes the weights ~1e30 after one step (finite) and
# the next forward NaN. Before the first save: nothing is written. After a save (a run that
# resumes from step 2 with the bad lr): step 3 changes the weights, step 4 is NaN, and step 2
# stays the newest checkpoint; a re-run with the original lr resumes from it.


@pytest.mark.parametrize("stage", ["sft", "dpo"])
@pytest.mark.parametrize("when", ["before-first-save", "after-a-save"])
def test_non_finite_loss_stops_the_run_and_writes_nothing(demo_root, bases, tmp_path, stage, when):
    out = tmp_path / stage if when == "before-first-save" else with_checkpoint(bases, stage, tmp_path)
    before = snapshot(out) if out.exists() else {}
    p = run(f"{stage}.py", *args(demo_root, bases, stage, out), "--lr", "1e30", check=False, env=ONE_THREAD)
    assert p.returncode == 1 and "Traceback" not in p.stdout, p.stdout[-3000:]
    step = 2 if when == "before-first-save" else 4
    line = the_line(p.stdout, f"step {step}: loss nan, gradient norm nan: not finite, training diverged")
    assert "nothing of it was saved" in line
    assert "--lr (now 1e+30)" in p.stdout and ("--beta (now 0.1)" in p.stdout) == (stage == "dpo")
    if when == "before-first-save":
        assert "no checkpoint was written yet" in p.stdout
        assert not qlora.checkpoint.step_folders(out) and not list(out.glob("*.tmp")) and not (out / "final").exists()
        return
    assert f"last good checkpoint: {out / 'step_000002'}" in p.stdout
    assert snapshot(out) == before
    assert_last_good(out, "step_000002")
    if stage == "sft":  # the fix: the same command with a sane lr resumes from the last good checkpoint
        p = run(f"{stage}.py", *args(demo_root, bases, stage, out), env=ONE_THREAD)
        assert "at step 2/4" in p.stdout
        assert qlora.files.verify_checkpoint(out / "final") == []
        assert all(torch.isfinite(t).all() for t in load_file(out / "final/adapter_model.safetensors").values())


# -----------------------------------------------------------------------------
# Ctrl+C / SIGTERM before the training loop: the signal is sent as each phase begins.


@pytest.mark.parametrize("stage", ["sft", "dpo"])
@pytest.mark.parametrize("phase, sig, resumable", [
    ("start-up", "sigint", False),  # importing torch, reading the flags
    ("data preparation", "sigint", False),
    ("data preparation", "sigterm", True),
    ("model load", "sigint", True),
    ("checkpoint load", "sigint", True),
])
def test_signal_during_start_up_is_one_line(demo_root, bases, tmp_path, stage, phase, sig, resumable):
    out = with_checkpoint(bases, stage, tmp_path) if resumable else tmp_path / stage
    before = snapshot(out) if resumable else {}
    signum = signal.SIGINT if sig == "sigint" else signal.SIGTERM
    text = fault(f"{stage}.py", args(demo_root, bases, stage, out), f"{sig}:{phase}", 128 + signum)
    line = the_line(text, "interrupted (")
    if resumable:
        assert line == (f"interrupted ({signum.name}) during {phase}: last good checkpoint: "
                        f"{out / 'step_000002'}; re-run the same command to resume")
        assert snapshot(out) == before
        assert_last_good(out, "step_000002")
    elif phase == "start-up":
        assert line == f"interrupted ({signum.name}) during start-up: nothing was written; re-run the same command"
        assert not out.exists()
    else:
        assert line == f"interrupted ({signum.name}) during {phase}: no checkpoint yet; re-run the same command to start"
        assert not qlora.checkpoint.step_folders(out) and not list(out.glob("*.tmp"))


def test_ctrl_c_from_outside_while_starting_is_one_line(demo_root, tmp_path):
    """A real Ctrl+C from outside, the moment the config table is printed (the process is then
    reading data, or about to): one line, exit 130."""
    cmd = [sys.executable, str(ROOT / "sft.py"), *map(str, stage_args(demo_root, "sft", output_dir=tmp_path / "sft"))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **ONE_THREAD))
    seen = ""
    for line in proc.stdout:
        seen += line
        if line.startswith("SFTConfig:"):
            proc.send_signal(signal.SIGINT)
            break
    text = seen + proc.stdout.read()
    assert proc.wait(timeout=120) == 130 and "Traceback" not in text, text[-3000:]
    assert re.fullmatch(r"interrupted \(SIGINT\) during (start-up|data preparation|model load): .*re-run the same command.*",
                        the_line(text, "interrupted ("))


def test_second_ctrl_c_in_the_loop_exits_at_once(demo_root, bases, tmp_path):
    """The first Ctrl+C arrives as the loop starts (finish the step, then save); the second as
    that save begins: exit 130 at once, naming the checkpoint that is still the newest."""
    out = with_checkpoint(bases, "dpo", tmp_path)
    text = fault("dpo.py", args(demo_root, bases, "dpo", out),
                 f"sigint:training,sigint:writing {out / 'step_000003'}", 130)
    assert "SIGINT: finishing this optimizer step" in text
    assert the_line(text, "second interrupt") == (f"second interrupt: exiting now; last good checkpoint: "
                                                  f"{out / 'step_000002'}; re-run the same command to resume")
    assert not (out / "step_000003").exists()
    assert_last_good(out, "step_000002")


def test_ctrl_c_while_merge_writes_leaves_nothing(demo_root, bases, tmp_path):
    out = tmp_path / "merged"
    argv = stage_args(demo_root, "merge", sft_dir=bases / "sft/final", dpo_dir=bases / "dpo/final", output_dir=out)
    text = fault("merge.py", argv, f"sigint:writing {out}", 130)
    assert the_line(text, "interrupted (") == (f"interrupted (SIGINT) during writing {out}: nothing was written; "
                                               f"re-run the same command")
    assert list(tmp_path.iterdir()) == []  # neither the model nor its .tmp


# -----------------------------------------------------------------------------
# Full disk: every write before the first checkpoint, and a save (fault injection: the write
# raises exactly what safetensors raises on a full disk).

DISK_FULL = "disk full: free space and re-run the same command"


@pytest.mark.parametrize("stage, target", [("sft", "config.json"), ("dpo", "config.json"),
                                           ("sft", "data_report.json"), ("dpo", "data_report.json"),
                                           ("sft", "metrics.jsonl")])
def test_full_disk_before_the_first_checkpoint(demo_root, bases, tmp_path, stage, target):
    out = tmp_path / stage
    # a fresh cache that cannot be written either: a warning, and the run goes on to the real failure
    cache = tmp_path / "cache"
    text = fault(f"{stage}.py", args(demo_root, bases, stage, out, cache_dir=cache), f"enospc:cache,enospc:{target}", 1)
    assert the_line(text, "could not write").startswith(f"could not write {out / target}: ")
    assert text.rstrip().endswith(DISK_FULL), text[-2000:]
    if target != "config.json":  # (written before the data)
        assert the_line(text, "warning: could not write the data cache").endswith("continuing without it")
        assert list(cache.iterdir()) == []  # no partial cache entry
    assert not list(out.glob("*.tmp")) and not qlora.checkpoint.step_folders(out)


def test_full_disk_during_a_save_keeps_the_last_good_checkpoint(demo_root, bases, tmp_path):
    """DPO resumed from step 2 with --max_steps 2: the only save is the final adapter; it fails,
    step 2 stays the newest and intact, and (space freed) the same command resumes from it.
    (tests/test_resume.py has the same for a step folder mid-run in SFT.)"""
    out = with_checkpoint(bases, "dpo", tmp_path)
    before = snapshot(out)
    argv = [*args(demo_root, bases, "dpo", out), "--max_steps", "2"]
    text = fault("dpo.py", argv, "enospc:1", 1)
    assert the_line(text, "could not write") == (
        f"could not write {out / 'final'}: Error while serializing: I/O error: No space left on device (os error 28) "
        f"(injected); {DISK_FULL} (it resumes from {out / 'step_000002'}, which is intact)")
    assert snapshot(out) == before
    assert_last_good(out, "step_000002")
    p = run("dpo.py", *argv, env=ONE_THREAD)
    assert "at step 2/2" in p.stdout and qlora.files.verify_checkpoint(out / "final") == []


def test_full_disk_is_named_on_a_real_full_device():
    """/dev/full fails every write with ENOSPC, as a full disk does."""
    with pytest.raises(SystemExit) as e:
        with qlora.runtime.writing("/dev/full"), open("/dev/full", "w") as f:
            f.write("{}")
    assert e.value.code == f"could not write /dev/full: No space left on device; {DISK_FULL}"


# -----------------------------------------------------------------------------
# A real full filesystem: a small tmpfs as the output folder (needs mount rights: root in a
# container; skipped elsewhere, the fault-injected cases above still run).


@pytest.fixture
def small_disk(tmp_path):
    mounted = []

    def make(options):
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()})")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.parametrize("stage, options, filled, target, left", [
    ("sft", "size=4k,nr_inodes=1", False, "", None),  # no room for the output folder itself (mkdir)
    ("dpo", "size=4k", True, "config.json", []),  # not even config.json
    ("sft", "size=4k", False, "data_report.json", ["config.json"]),  # config.json takes the one page
], ids=["output-folder", "config.json", "data_report.json"])
def test_real_full_disk_before_the_first_checkpoint(demo_root, bases, small_disk, stage, options, filled, target, left):
    disk = small_disk(options)
    if filled:
        (disk / "filler").write_bytes(b"x" * 4096)
    out = disk / stage
    text = fault(f"{stage}.py", args(demo_root, bases, stage, out), "", 1)
    assert the_line(text, "could not write") == f"could not write {out / target}: No space left on device; {DISK_FULL}"
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == left


def test_real_full_disk_during_a_save(demo_root, bases, small_disk):
    """Room for one checkpoint and a half: the second save runs out of space mid-file."""
    ckpt = sum(f.stat().st_size for f in (bases / "sft/step_000002").iterdir())
    disk = small_disk(f"size={int(ckpt * 1.5) + 64 * 1024}")
    out = disk / "sft"
    text = fault("sft.py", [*args(demo_root, bases, "sft", out), "--max_steps", "2", "--save_steps", "1"], "", 1)
    line = the_line(text, "could not write")
    assert line.startswith(f"could not write {out / 'step_000002'}: ") and "No space left on device" in line
    assert line.endswith(f"{DISK_FULL} (it resumes from {out / 'step_000001'}, which is intact)")
    assert_last_good(out, "step_000001")
