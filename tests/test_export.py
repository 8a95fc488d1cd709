"""Protects tools/export_gguf.py (merged model -> GGUF for llama.cpp) on the demo pipeline's merged
2-layer Llama: the files, their metadata (architecture, hyperparameters, tokenizer, chat
template), llama.cpp's tensor names and q/k row layout, and that a real GGUF loader
(transformers, which dequantizes and undoes llama.cpp's q/k permutation) reproduces the
safetensors model's logits and greedy tokens. Independent of the script's own checks.
Also: the real Llama-2 tokenizer's 32000 pieces survive the trip (tests/fixtures).

    .venv/bin/python -m pytest -q tests/test_export.py
"""

import json
import shutil

import numpy as np
import pytest
import torch

import config
import qlora.checkpoint
import qlora.data
import conftest
from conftest import FIXTURES, run

PROMPTS = [["What is the capital of France?"], ["What is 12 + 7?"], ["Tell me a joke about a cat."],
           ["Hi there.", "Hello! How can I help?", "Write a two-line poem about an owl."]]
LOGIT_ATOL = {"f16": 0.02, "q8_0": 0.3}  # demo logits reach ~10: f16 moves them ~2e-3, q8_0 ~0.08


@pytest.fixture(scope="session")
def exported(pipeline, tmp_path_factory):
    """f16 + q8_0 of the demo's merged model, into a folder of its own (the merged folder must
    keep holding only safetensors/json for test_pipeline)."""
    root, _ = pipeline
    out = tmp_path_factory.mktemp("gguf")
    p = run("tools/export_gguf.py", "--preset", "demo", "--model_dir", root / "models/merged", "--out_dir", out,
            "--types", "f16,q8_0")
    return root / "models/merged", out, p.stdout


def field(reader, key):
    """A GGUF metadata value as Python (str, number, bool, or list)."""
    f = reader.fields[key]
    vals = [f.parts[i] for i in f.data]
    if f.types[0] == 8 or (len(f.types) > 1 and f.types[1] == 8):  # strings: raw utf-8 bytes
        vals = [bytes(v).decode() for v in vals]
    else:
        vals = [v.tolist()[0] for v in vals]
    return vals if f.types[0] == 9 else vals[0]  # 9 = array


def test_files_and_sidecars(exported):
    merged, out, stdout = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "merged-f16.gguf", "merged-f16.gguf.json", "merged-q8_0.gguf", "merged-q8_0.gguf.json"]  # no .tmp, no scratch
    complete_sha = config.sha256_file(merged / "COMPLETE.json")
    for t in ("f16", "q8_0"):
        rec = json.loads((out / f"merged-{t}.gguf.json").read_text())
        assert rec["sha256"] == config.sha256_file(out / f"merged-{t}.gguf")
        assert rec["bytes"] == (out / f"merged-{t}.gguf").stat().st_size
        assert rec["source_complete_sha256"] == complete_sha  # which merge it came from
        assert rec["verify"]["greedy_wrong"] == 0 and rec["verify"]["greedy_positions"] > 30  # 4 replies, to EOS
        assert rec["verify"]["mean_kl_nats"] < {"f16": 1e-5, "q8_0": 1e-3}[t]  # measured 1e-7 / 6e-5
    assert (out / "merged-q8_0.gguf").stat().st_size < 0.6 * (out / "merged-f16.gguf").stat().st_size
    assert "read back: every tensor's name, type, shape and bytes match" in stdout
    assert "tokenizer: the GGUF metadata reproduces tokenizer.model's ids" in stdout
    log = getattr(conftest, "NETGUARD_LOG", None)  # scripts run under conftest's socket guard
    if log is not None and log.exists():
        assert log.read_text() == "", f"a script tried the network:\n{log.read_text()}"


def test_metadata_and_tensor_names(exported):
    import gguf
    from safetensors import safe_open
    merged, out, _ = exported
    hf = json.loads((merged / "config.json").read_text())
    tok_cfg = json.loads((merged / "tokenizer_config.json").read_text())
    n = hf["num_hidden_layers"]
    # the HF -> GGUF names gguf-py itself defines for llama (what llama.cpp looks up)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n)
    index = json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"]
    want_names = {name_map.get_name(k, try_suffixes=(".weight",)) for k in index}
    assert None not in want_names and len(want_names) == 9 * n + 3
    for t, ftype, qtype in (("f16", 1, gguf.GGMLQuantizationType.F16), ("q8_0", 7, gguf.GGMLQuantizationType.Q8_0)):
        r = gguf.GGUFReader(out / f"merged-{t}.gguf")
        assert field(r, "general.architecture") == "llama"
        assert field(r, "general.file_type") == ftype
        assert field(r, "llama.block_count") == n
        assert field(r, "llama.context_length") == hf["max_position_embeddings"]
        assert field(r, "llama.embedding_length") == hf["hidden_size"]
        assert field(r, "llama.feed_forward_length") == hf["intermediate_size"]
        assert field(r, "llama.attention.head_count") == hf["num_attention_heads"]
        assert field(r, "llama.attention.head_count_kv") == hf["num_key_value_heads"]
        assert field(r, "llama.rope.dimension_count") == hf["hidden_size"] // hf["num_attention_heads"]
        assert field(r, "llama.rope.freq_base") == pytest.approx(10000.0)
        assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(hf["rms_norm_eps"])
        assert field(r, "tokenizer.ggml.model") == "llama"
        assert len(field(r, "tokenizer.ggml.tokens")) == hf["vocab_size"] == len(field(r, "tokenizer.ggml.scores"))
        assert (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id"),
                field(r, "tokenizer.ggml.unknown_token_id")) == (1, 2, 0)
        assert field(r, "tokenizer.ggml.add_bos_token") is True and field(r, "tokenizer.ggml.add_eos_token") is False
        assert field(r, "tokenizer.chat_template") == tok_cfg["chat_template"]
        assert "### Human:" in field(r, "tokenizer.chat_template")
        types = {rt.name: rt.tensor_type for rt in r.tensors}
        assert set(types) == want_names
        for name, ty in types.items():
            is_norm = name.endswith("_norm.weight")
            assert ty == (gguf.GGMLQuantizationType.F32 if is_norm else qtype), (t, name, ty)
        # shapes: GGUF lists ggml dims (row length first), i.e. the torch shape reversed
        with safe_open(str(merged / index["model.layers.0.mlp.down_proj.weight"]), framework="pt") as f:
            shape = tuple(f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape())
        rt = next(rt for rt in r.tensors if rt.name == "blk.0.ffn_down.weight")
        assert tuple(int(d) for d in rt.shape[::-1]) == shape == (hf["hidden_size"], hf["intermediate_size"])


def test_qk_rows_are_in_llama_cpp_rotary_layout(exported):
    """llama.cpp rotates ADJACENT dims (2i, 2i+1) of each head; HF pairs i with i + d/2. So in
    the GGUF, row 2i of a head must be HF row i, and row 2i+1 HF row i + d/2 (q and k), while
    v (no rotary) is stored untouched."""
    import gguf
    from safetensors.torch import load_file
    merged, out, _ = exported
    hf = json.loads((merged / "config.json").read_text())
    heads, d = hf["num_attention_heads"], hf["hidden_size"] // hf["num_attention_heads"]
    index = json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"]
    r = gguf.GGUFReader(out / "merged-f16.gguf")
    stored = {rt.name: gguf.quants.dequantize(rt.data, rt.tensor_type) for rt in r.tensors}
    for proj, name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
        key = f"model.layers.1.self_attn.{proj}.weight"
        w_hf = load_file(merged / index[key])[key].float().numpy()
        g = stored[f"blk.1.{name}.weight"]
        if proj == "v_proj":
            np.testing.assert_allclose(g, w_hf, atol=2e-3)
            continue
        assert not np.allclose(g, w_hf, atol=2e-3)  # q/k really were moved
        for h in range(heads):
            for i in range(d // 2):
                np.testing.assert_allclose(g[h * d + 2 * i], w_hf[h * d + i], atol=2e-3)
                np.testing.assert_allclose(g[h * d + 2 * i + 1], w_hf[h * d + d // 2 + i], atol=2e-3)


def _greedy_and_logits(model, ids, n_new=16):
    x = torch.tensor([ids])
    with torch.no_grad():
        seq = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, do_sample=False,
                             pad_token_id=2, eos_token_id=2)[0].tolist()
        return seq, model(input_ids=torch.tensor([seq])).logits[0]


@pytest.mark.parametrize("gtype", ["f16", "q8_0"])
def test_transformers_gguf_loader_reproduces_the_model(exported, gtype):
    """Load the GGUF the way a third party would (transformers' GGUF loader: dequantize + undo
    the q/k permutation) and run it next to the safetensors model: logits close along each
    prompt and continuation, and the same greedy text (a divergence is only tolerated where
    the reference itself was at a near-tie, within the logit tolerance)."""
    from transformers import AutoModelForCausalLM
    merged, out, _ = exported
    tok = qlora.data.Tokenizer(merged)
    ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(out, gguf_file=f"merged-{gtype}.gguf", dtype=torch.float32).eval()
    identical = 0
    for ids in tok.encode([qlora.data.format_prompt(p) for p in PROMPTS]):
        ids = [tok.bos_id] + ids
        seq_ref, logits_ref = _greedy_and_logits(ref, ids)
        seq_got, _ = _greedy_and_logits(got, ids)
        with torch.no_grad():
            logits_got = got(input_ids=torch.tensor([seq_ref])).logits[0]  # same tokens as the reference saw
        torch.testing.assert_close(logits_got, logits_ref, atol=LOGIT_ATOL[gtype], rtol=0)
        if seq_got == seq_ref:
            identical += 1
            continue
        k = next((i for i, (a, b) in enumerate(zip(seq_got, seq_ref)) if a != b), min(len(seq_got), len(seq_ref)))
        top2 = logits_ref[k - 1].topk(2).values
        assert top2[0] - top2[1] < LOGIT_ATOL[gtype], f"greedy differs at token {k} with a clear margin"
    assert identical >= len(PROMPTS) - 1


def test_missing_permutation_would_be_caught(exported):
    """Negative control: had the exporter skipped the q/k permutation, transformers' loader would
    apply its inverse to HF-layout rows. Those logits are far outside the tolerance above, so
    the logit checks (here and in tools/export_gguf.py --verify) do detect a wrong layout."""
    from transformers import AutoModelForCausalLM
    merged, _, _ = exported
    ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    broken = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    cfg = broken.config
    for layer in broken.model.layers:
        for proj, heads in ((layer.self_attn.q_proj, cfg.num_attention_heads),
                            (layer.self_attn.k_proj, cfg.num_key_value_heads)):
            w = proj.weight.data
            d = w.shape[0] // heads // 2  # transformers' _reverse_permute_weights on un-permuted rows
            proj.weight.data = w.reshape(heads, d, 2, -1).swapaxes(1, 2).reshape(w.shape).contiguous()
    tok = qlora.data.Tokenizer(merged)
    ids = torch.tensor([[tok.bos_id] + tok.encode([qlora.data.format_prompt(PROMPTS[0])])[0]])
    with torch.no_grad():
        bad, good = broken(input_ids=ids).logits[0], ref(input_ids=ids).logits[0]
    assert (bad - good).abs().max() > 10 * LOGIT_ATOL["q8_0"]  # measured 8.7
    p_log, q_log = good.log_softmax(-1), bad.log_softmax(-1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1).mean()
    assert kl > 20 * 5e-3, float(kl)  # tools/export_gguf.py's q8_0 limit is 5e-3 nats; measured 0.72


def test_rerun_skips_and_damaged_file_is_rewritten(exported, tmp_path):
    merged, out, _ = exported
    work = tmp_path / "gguf"
    shutil.copytree(out, work)
    args = ["--model_dir", merged, "--out_dir", work, "--types", "f16,q8_0"]
    p = run("tools/export_gguf.py", *args)
    assert p.stdout.count("already exported from this merge") == 2 and "wrote" not in p.stdout
    good = config.sha256_file(work / "merged-q8_0.gguf")
    with open(work / "merged-q8_0.gguf", "r+b") as f:  # flip one byte in the tensor data
        f.seek(-100, 2)
        b = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    p = run("tools/export_gguf.py", *args)
    assert "merged-q8_0.gguf: stale or damaged" in p.stdout and "merged-f16.gguf: already exported" in p.stdout
    assert config.sha256_file(work / "merged-q8_0.gguf") == good  # deterministic: the same bytes again
    assert not list(work.glob("*.tmp"))


def test_refuses_bad_input_in_the_first_second(exported, tmp_path):
    merged, out, _ = exported
    p = run("tools/export_gguf.py", "--model_dir", merged, "--out_dir", tmp_path, "--types", "q4_K_M", check=False)
    assert p.returncode != 0 and "q4_K_M" in p.stdout and "llama-quantize" in p.stdout
    p = run("tools/export_gguf.py", "--preset", "nope", check=False)
    assert p.returncode != 0 and "invalid choice" in p.stdout
    half = tmp_path / "half"
    shutil.copytree(merged, half)
    (half / "COMPLETE.json").unlink()  # an interrupted merge
    p = run("tools/export_gguf.py", "--model_dir", half, "--out_dir", tmp_path, check=False)
    assert p.returncode != 0 and "run `make train` first" in p.stdout
    assert not list(tmp_path.glob("*.gguf*"))


@pytest.mark.slow  # builds or trains a model (left out by make test-fast)
def test_real_llama2_tokenizer_survives(tmp_path):
    """Llama-2's own tokenizer.model (32000 pieces: 3 special, 256 byte-fallback) through the
    exporter on a tiny random model with Llama-2's vocabulary; the script's tokenizer check
    re-encodes prompts, digits and unicode through the GGUF's metadata."""
    src = FIXTURES / "llama2-tokenizer.model"
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
    folder = tmp_path / "llama2-vocab"
    with qlora.checkpoint.AtomicFolder(folder) as tmp:  # a merged folder: files + COMPLETE.json, as merge.py leaves it
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copy(src, tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    p = run("tools/export_gguf.py", "--model_dir", folder, "--types", "f16")
    assert "warning: tokenizer_config.json has no chat_template" in p.stdout
    assert "tokenizer: the GGUF metadata reproduces tokenizer.model's ids" in p.stdout
    r = gguf.GGUFReader(folder / "llama2-vocab-f16.gguf")
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == 32000 and tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[13] == "<0x0A>"
    counts = {t: types.count(t) for t in set(types)}
    assert counts == {gguf.TokenType.UNKNOWN: 1, gguf.TokenType.CONTROL: 2, gguf.TokenType.BYTE: 256,
                      gguf.TokenType.NORMAL: 32000 - 259}
    assert "tokenizer.chat_template" not in r.fields


def test_preset_picks_the_merge_stage_output(tmp_path):
    """--preset demo means MergeConfig's demo output_dir (models/demo-merged), read only; the
    files go to tmp_path. Without a demo merge in the checkout it must stop naming the fix."""
    p = run("tools/export_gguf.py", "--preset", "demo", "--out_dir", tmp_path, "--verify", "off", check=False)
    assert "models/demo-merged" in p.stdout.splitlines()[1]
    assert p.returncode == 0 or "make train" in p.stdout
