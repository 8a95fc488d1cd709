"""Shared test fixtures: the demo assets built once per session into a temporary folder,
helpers to run the real stage scripts as subprocesses, and the real Llama-2 tokenizer
and 200 real hh-rlhf rows from tests/fixtures/ (their licences: tests/fixtures/NOTICE). They ship
with the repo, so these tests run (never skip) on a user's fresh clone."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"


# Every script a test runs is under the socket guard (tests/netguard): loopback only, and any
# other connect or DNS lookup is logged here. tests/test_offline.py asserts the log is empty.
NETGUARD = Path(__file__).resolve().parent / "netguard"
NETGUARD_LOG = Path(tempfile.mkdtemp(prefix="netguard_")) / "denied.log"


def run(script, *args, check=True, timeout=600, env=None):
    """Run a repo script with this interpreter, offline-guarded; returns CompletedProcess (stdout+stderr merged)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", NETGUARD_LOG=str(NETGUARD_LOG),
               PYTHONPATH=os.pathsep.join([str(NETGUARD)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               **(env or {}))
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout[-4000:]}")
    return p


def assert_row_outcome(stdout, report, examples, where, reason):
    """One input row of a prepare run: kept (in examples.json) when reason is None, else dropped
    with exactly that reason at that file:line; and never a traceback."""
    if reason is None:
        assert where in examples
    else:
        assert where not in examples and where in report["rows_dropped"][reason]["first_lines"]
    assert "Traceback" not in stdout


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    run("tools/demo_assets.py", "--out", root)
    return root


def stage_args(root, stage, **over):
    """--preset demo with every path pointed into `root` (never the repo's own folders)."""
    paths = {
        "sft": dict(model_dir=root / "models/demo-llama", data_dir=root / "data/demo/airoboros",
                    output_dir=root / "checkpoints/sft", cache_dir=root / "cache"),
        "dpo": dict(model_dir=root / "models/demo-llama", data_dir=root / "data/demo/hh-rlhf",
                    sft_dir=root / "checkpoints/sft/final", output_dir=root / "checkpoints/dpo",
                    cache_dir=root / "cache"),
        "merge": dict(model_dir=root / "models/demo-llama", sft_dir=root / "checkpoints/sft/final",
                      dpo_dir=root / "checkpoints/dpo/final", output_dir=root / "models/merged"),
    }[stage]
    paths.update(over)
    args = ["--preset", "demo"]
    for k, v in paths.items():
        args += [f"--{k}", v]
    return args


@pytest.fixture(scope="session")
def pipeline(demo_root):
    """SFT -> DPO -> merge on the demo model, once per session. Returns the root folder."""
    out = {}
    for stage in ("sft", "dpo", "merge"):
        out[stage] = run(f"{stage}.py", *stage_args(demo_root, stage)).stdout
    return demo_root, out


@pytest.fixture(scope="session")
def llama_tokenizer(tmp_path_factory):
    src = FIXTURES / "llama2-tokenizer.model"
    folder = tmp_path_factory.mktemp("llama2-tok")
    shutil.copy(src, folder / "tokenizer.model")
    import qlora.data
    return qlora.data.Tokenizer(folder)


# Two tiers. `make test` runs everything (what CI runs). `make test-fast` is the edit loop: it
# leaves out every test that needs the demo model built or trained (the demo_root / pipeline
# fixtures and the ones built on them), which is where the minutes go.
SLOW_FIXTURES = {"demo_root", "pipeline"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs the demo model built or trained (left out by make test-fast)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
