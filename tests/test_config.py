"""Protects the command-line contract: --field value overrides, --preset demo, --help, and a
clear, immediate error naming the field for unknown fields and bad values.

    .venv/bin/python -m pytest -q tests/test_config.py
"""

import json
import subprocess
import sys

import pytest

import qlora.cli
from config import DPOConfig, MergeConfig, SFTConfig
from qlora.cli import _parse_args, parse_args
from conftest import ROOT, run


def test_defaults_are_the_13b_recipe():
    c = SFTConfig()
    assert (c.lora_r, c.max_seq_len, c.quantize_4bit) == (128, 2048, True)
    assert c.lora_targets.split(",") == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert DPOConfig().max_len == 1536


def test_overrides_typed_and_preset_then_override():
    c = parse_args(SFTConfig, ["--preset", "demo", "--max_steps", "7", "--lr=0.5", "--gradient_checkpointing", "false"])
    assert c.max_steps == 7 and c.lr == 0.5 and c.gradient_checkpointing is False
    assert c.model_dir == "models/demo-llama"  # from the preset
    assert parse_args(SFTConfig, ["--seed", "3", "--output_dir", "x", "--data_dir", "d", "--model_dir", "m",
                                  "--save_steps", "5"]).seed == 3


def test_switches():
    flags = [("--prepare_only", ""), ("--show_examples N", "")]
    c, sw = parse_args(DPOConfig, ["--prepare-only", "--subsets", "harmless-base"], flags=flags)
    assert sw == {"prepare_only": True, "show_examples": None} and c.subsets == "harmless-base"
    # one spelling with the hyphenated alias; a switch's explicit value is honoured, strictly
    assert parse_args(DPOConfig, ["--prepare_only=false", "--show-examples", "all"], flags=flags)[1] == \
        {"prepare_only": False, "show_examples": "all"}
    with pytest.raises(qlora.cli.ConfigError, match="prepare_only: expected true/false"):
        _parse_args(DPOConfig, ["--prepare-only=maybe"], flags)
    # fields accept either spelling too
    assert parse_args(SFTConfig, ["--max-seq-len", "512"]).max_seq_len == 512


@pytest.mark.parametrize("argv,needle", [
    (["--max_stepz", "3"], "unknown field --max_stepz for SFTConfig (did you mean --max_steps?)"),
    (["--max_steps", "three"], "--max_steps: expected int, got 'three'"),
    (["--lr", "-1"], "SFTConfig.lr"),
    (["--dtype", "fp8"], "SFTConfig.dtype"),
    (["--lora_targets", "q_proj,qq_proj"], "qq_proj"),
    (["--max_steps", "0"], "SFTConfig.max_steps"),
    (["--eval_fraction", "2"], "SFTConfig.eval_fraction"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--seed"], "--seed needs a value"),
    (["positional"], "unexpected argument 'positional'"),
])
def test_bad_input_names_the_field(argv, needle):
    with pytest.raises(qlora.cli.ConfigError) as e:
        _parse_args(SFTConfig, argv, ())
    assert needle in str(e.value)


def test_dpo_specific_validation():
    with pytest.raises(qlora.cli.ConfigError, match="subsets"):
        _parse_args(DPOConfig, ["--subsets", "harmless-base,red-team-attempts"], ())
    with pytest.raises(qlora.cli.ConfigError, match="max_prompt_len"):
        _parse_args(DPOConfig, ["--max_len", "512", "--max_prompt_len", "512"], ())
    with pytest.raises(qlora.cli.ConfigError, match="max_shard_gb"):
        _parse_args(MergeConfig, ["--max_shard_gb", "0"], ())


def test_scripts_fail_fast_with_the_field_name():
    for script in ("sft.py", "dpo.py", "merge.py"):
        p = run(script, "--nonsense_field", "1", check=False)
        assert p.returncode != 0
        assert "unknown field --nonsense_field" in p.stdout
        assert "Traceback" not in p.stdout


def test_help_lists_fields_with_defaults():
    p = run("sft.py", "--help")
    for field in ("--max_steps", "--save_steps", "--output_dir", "--seed", "--data_dir", "--model_dir", "--prepare_only"):
        assert field in p.stdout
    assert "higher = more capacity" in p.stdout  # the field comments come along


def test_cli_module_prints_resolved_json():
    # what `make check-config` runs before any stage starts
    p = subprocess.run([sys.executable, "-m", "qlora.cli", "dpo", "--preset", "demo", "--beta", "0.3"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    d = json.loads(p.stdout)
    assert d["beta"] == 0.3 and d["output_dir"] == "checkpoints/demo/dpo"


def test_missing_inputs_list_files_and_the_fix(tmp_path):
    p = run("sft.py", "--model_dir", tmp_path / "nomodel", "--data_dir", tmp_path / "nodata",
            "--output_dir", tmp_path / "out", check=False)
    assert p.returncode != 0
    assert "missing input files" in p.stdout and "tokenizer.model" in p.stdout and "instructions.jsonl" in p.stdout
    assert "make download-datasets-and-models" in p.stdout
