"""
Memory and speed of the real training steps on the real Llama-2-13B architecture (random
weights: nothing to download), next to a conventional TRL QLoRA setup on the same machine.

    python bench/bench.py                    # what `make bench` runs: 13B on a GPU; the tiny model on a CPU (smoke test)
    python bench/bench.py --size 13b --micro_batch 2 --steps 5
    python bench/bench.py --no_baseline      # ours only

What runs, in order, each in its own process so one's memory never counts against the next:
  1. random fp16 weights for the architecture are written as sharded safetensors (26 GB for
     13B; config from config.LLAMA2_13B_CONFIG), then loaded EXACTLY as training loads them
     (qlora.modeling.load_base_model: NF4 + double quant, SDPA, non-reentrant checkpointing; LoRA r=128
     on all 7 projections; paged 8-bit AdamW);
  2. ours, SFT: warm-up + timed optimizer steps of sft.py's step (packed 2048-token rows,
     micro_batch rows per micro-step, loss = qlora.modeling.token_logps with chunked logits);
  3. ours, DPO: dpo.py's step on the worst case (chosen and rejected each max_len = 1536
     tokens, packed padding-free into one 3072-token row; reference = the SFT adapter alone
     under no_grad, policy = SFT + DPO adapters);
  4. baseline, SFT: TRL SFTTrainer with the usual QLoRA settings (NF4 via BitsAndBytesConfig,
     LoRA r=128 all-linear, paged AdamW 32-bit, gradient checkpointing, one 2048-token example
     per step, no packing);
  5. baseline, DPO: TRL DPOTrainer, same model settings, one 1536+1536-token pair per step.
For each: peak allocated and reserved GPU memory, seconds per step, tokens/s, and model FLOPs
utilisation against this GPU's MEASURED bf16 matmul peak:
    MFU = tokens/s x FLOPs per token / peak,  FLOPs per token = 6.5 N (SFT) or 8.5 N (DPO)
    (LoRA + checkpointing: forward 2N + recomputed forward 2N + backward through activations 2N,
     the frozen base gets no weight gradient; + ~0.5N for the adapters; DPO adds a 2N reference
     forward. N = parameters, 13.0e9 for Llama-2-13B.)
On a GPU with more than 24 GB the process is capped at --max_vram_gib (23.6) with
torch.cuda.set_per_process_memory_fraction, so the peaks mean what a 24 GB card would see.
Results: a table, and --out (bench/bench_gpu.json on CUDA, bench/bench_cpu_smoke.json on CPU)
with the GPU name, date and command.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repo root (this file is bench/*.py)
sys.path.insert(0, str(ROOT))

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--size", choices=["auto", "13b", "tiny"], default="auto", help="auto: 13b on CUDA, tiny on CPU")
ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run")
ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, kernels, paging)")
ap.add_argument("--micro_batch", type=int, default=2, help="packed 2048-token SFT rows per micro-step (ours)")
ap.add_argument("--sft_len", type=int, default=2048, help="SFT row length in tokens")
ap.add_argument("--dpo_len", type=int, default=1536, help="DPO tokens per side (prompt + reply)")
ap.add_argument("--max_vram_gib", type=float, default=23.6, help="cap on a bigger GPU, so peaks mean a 24 GB card")
ap.add_argument("--logits_chunk", type=int, default=1024, help="ours: tokens whose logits exist at once (0 = all)")
ap.add_argument("--no_baseline", action="store_true", help="skip the TRL baseline")
ap.add_argument("--out", default="", help="JSON result path (default under docs/)")
ap.add_argument("--_run", default="", help=argparse.SUPPRESS)  # internal: which run this child process does
ap.add_argument("--_model", default="", help=argparse.SUPPRESS)
args = ap.parse_args()


def tiny_config():
    # the architecture at toy size but the real vocabulary: the logits cost is the real one per token
    from config import LLAMA2_13B_CONFIG
    return dict(LLAMA2_13B_CONFIG, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4)


def write_random_model(folder, cfg, shard_bytes=5e9):
    """Random fp16 weights in Llama's names and shapes, sharded like the real download, without ever
    holding more than one shard in RAM. Norms are 1 (as trained models roughly are), the rest N(0, 0.02)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(LlamaConfig(**cfg)).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    shard, size, weight_map, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        n += 1
        save_file(shard, str(folder / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})
        weight_map.update({k: f"model-{n:05d}.safetensors" for k in shard})
        shard, size = {}, 0

    for k, shape in shapes.items():
        t = torch.ones(shape) if k.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
        shard[k] = t.half()
        size += shard[k].numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg))


def word_tokenizer(folder):
    """A word-level tokenizer ('w17' -> id 17) for the TRL baseline, which takes text: n words are
    exactly n tokens, so its sequences have the lengths ours have. Ids stay far below the vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 1000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")
    fast.save_pretrained(folder)


# -----------------------------------------------------------------------------
# Child process: one run, result as one JSON line on stdout.

def run_ours(kind, model_dir):
    import torch
    import qlora.data
    import qlora.modeling
    import qlora.packing
    import qlora.runtime
    from config import DPOConfig, SFTConfig
    from peft import get_peft_model
    device = qlora.runtime.pick_device()
    cap(device)
    cfg = SFTConfig(model_dir=str(model_dir), optimizer="paged_adamw_8bit" if device.type == "cuda" else "adamw",
                    logits_chunk=args.logits_chunk)
    torch.manual_seed(0)
    model = qlora.modeling.load_base_model(model_dir, cfg, device)
    model = get_peft_model(model, qlora.modeling.lora_config(cfg), adapter_name="sft")
    g = torch.Generator().manual_seed(0)
    if kind == "dpo":
        # dpo.py's model: the SFT adapter frozen, a DPO adapter trained, dropout off
        dcfg = DPOConfig(model_dir=str(model_dir), optimizer=cfg.optimizer)
        model.add_adapter("dpo", qlora.modeling.lora_config(dcfg))
        qlora.modeling.set_active_adapters(model, ["sft", "dpo"])
        for name, p in model.named_parameters():
            p.requires_grad_(".dpo." in name)
        half = args.dpo_len // 3  # prompt 1/3, reply 2/3 of each side: worst-case total length
        prompt = torch.randint(3, 32000, (half,), generator=g).tolist()
        pairs = [(prompt + torch.randint(3, 32000, (args.dpo_len - half,), generator=g).tolist(),
                  prompt + torch.randint(3, 32000, (args.dpo_len - half,), generator=g).tolist())]
        batch = [(c, [qlora.data.IGNORE] * (half + 1) + c[half + 1:], r, [qlora.data.IGNORE] * (half + 1) + r[half + 1:])
                 for c, r in pairs]
        ids, labels, pos, seq = (t.to(device) for t in qlora.packing.pack_pairs(batch))
        tokens = ids.numel()
        flops_per_token = 8.5 * qlora.modeling.model_params(model_dir)
    else:
        # sft.py's micro-step: micro_batch packed rows of 4 examples each, prompt masked
        rows = []
        for _ in range(args.micro_batch):
            lens = [args.sft_len // 4] * 4
            ex = []
            for n in lens:
                x = torch.randint(3, 32000, (n,), generator=g).tolist()
                ex.append((x, [qlora.data.IGNORE] * (n // 4) + x[n // 4:]))
            rows.append(qlora.packing.make_packed_row(ex, args.sft_len, 0))
        ids, labels, pos = (torch.tensor([r[k] for r in rows], device=device) for k in range(3))
        tokens = ids.numel()
        flops_per_token = 6.5 * qlora.modeling.model_params(model_dir)
    params = qlora.modeling.trainable_parameters(model)
    optimizer = qlora.modeling.make_optimizer(params, cfg)
    model.train()

    def step():
        if kind == "dpo":
            with torch.no_grad():
                qlora.modeling.set_active_adapters(model, ["sft"])
                ref = qlora.modeling.sequence_logps(qlora.modeling.token_logps(model, ids, pos, labels, cfg.logits_chunk), seq, 2)
                qlora.modeling.set_active_adapters(model, ["sft", "dpo"])
            pol = qlora.modeling.sequence_logps(qlora.modeling.token_logps(model, ids, pos, labels, cfg.logits_chunk), seq, 2)
            # dpo.py's loss, beta 0.1: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
            loss = -torch.nn.functional.logsigmoid(0.1 * ((pol[0::2] - ref[0::2]) - (pol[1::2] - ref[1::2]))).sum()
        else:
            loss = -qlora.modeling.token_logps(model, ids, pos, labels, cfg.logits_chunk).sum() / (labels != qlora.data.IGNORE).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, device, tokens, flops_per_token)


def run_baseline(kind, model_dir):
    """The conventional setup, as a typical QLoRA script writes it with TRL."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    import qlora.data
    import qlora.modeling
    import qlora.packing
    import qlora.runtime
    device = qlora.runtime.pick_device()
    cap(device)
    cuda = device.type == "cuda"
    tok = AutoTokenizer.from_pretrained(model_dir)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map={"": str(device)},
                                                 dtype=torch.bfloat16 if cuda else torch.float32)
    lora = LoraConfig(r=128, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    words = lambda n, s: " ".join(f"w{3 + (i * 7 + s) % 997}" for i in range(n))  # noqa: E731
    common_args = dict(output_dir=str(model_dir / f"trl-{kind}"), per_device_train_batch_size=1,
                       gradient_accumulation_steps=1, gradient_checkpointing=True,
                       gradient_checkpointing_kwargs={"use_reentrant": False}, learning_rate=2e-4,
                       optim="paged_adamw_32bit" if cuda else "adamw_torch", bf16=cuda, use_cpu=not cuda,
                       max_steps=args.warmup + args.steps, logging_steps=1, save_strategy="no", report_to=[],
                       lr_scheduler_type="constant", dataloader_num_workers=0)
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync(device)
            times.append([time.perf_counter()])

        def on_step_end(self, a, state, control, **kw):
            sync(device)
            times[-1].append(time.perf_counter())

    if kind == "sft":
        from trl import SFTConfig, SFTTrainer
        n = args.sft_len - 2  # + BOS + EOS = sft_len tokens
        data = Dataset.from_list([{"text": words(n, s)} for s in range(args.warmup + args.steps)])
        trainer = SFTTrainer(model=model, args=SFTConfig(**common_args, max_length=args.sft_len, packing=False),
                             train_dataset=data, processing_class=tok, peft_config=lora, callbacks=[Clock()])
        tokens = args.sft_len
        flops_per_token = 6.5 * qlora.modeling.model_params(model_dir)
    else:
        from trl import DPOConfig, DPOTrainer
        half = args.dpo_len // 3
        data = Dataset.from_list([{"prompt": words(half - 1, s), "chosen": " " + words(args.dpo_len - half - 1, s + 1),
                                   "rejected": " " + words(args.dpo_len - half - 1, s + 2)}
                                  for s in range(args.warmup + args.steps)])
        trainer = DPOTrainer(model=model, ref_model=None, args=DPOConfig(**common_args, max_length=2 * args.dpo_len,
                                                                         beta=0.1),
                             train_dataset=data, processing_class=tok, peft_config=lora, callbacks=[Clock()])
        tokens = 2 * args.dpo_len
        flops_per_token = 8.5 * qlora.modeling.model_params(model_dir)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    secs = [b - a for a, b in times[args.warmup:]]
    return summarize(secs, device, tokens, flops_per_token)


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def cap(device):
    import torch
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        if total > args.max_vram_gib * 2 ** 30:
            torch.cuda.set_per_process_memory_fraction(args.max_vram_gib * 2 ** 30 / total)


def timed(step, device, tokens, flops_per_token):
    for _ in range(args.warmup):
        step()
    secs = []
    for _ in range(args.steps):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        secs.append(time.perf_counter() - t)
    return summarize(secs, device, tokens, flops_per_token)


def summarize(secs, device, tokens, flops_per_token):
    import torch
    s = sorted(secs)[len(secs) // 2]  # median: one slow step (paging, GC) does not decide it
    out = {"s_per_step": round(s, 4), "tokens_per_step": tokens, "tok_s": round(tokens / s, 1),
           "flops_per_token": flops_per_token}
    if device.type == "cuda":
        out |= {"peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2 ** 30, 2)}
    else:  # CPU: the process's peak RSS (model + activations + logits), comparable between CPU runs only
        import resource
        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)
    return out


def torch_name():
    import torch
    return torch.cuda.get_device_name(0)


def matmul_peak():
    """bf16 TFLOP/s of a large square matmul on this GPU: the ceiling MFU is measured against."""
    import torch
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * n / (time.perf_counter() - t) / 1e12


if args._run:
    who, kind = args._run.split(":")
    if who == "peak":  # in a child too: the parent never holds a CUDA context the runs would lose
        result = {"tflops": matmul_peak(), "name": torch_name()}
    else:
        result = (run_ours if who == "ours" else run_baseline)(kind, Path(args._model))
    print("RESULT " + json.dumps(result), flush=True)
    sys.exit(0)

# -----------------------------------------------------------------------------
# Parent: build the model once, run each measurement in a fresh process, report.

import torch  # noqa: E402

cuda = torch.cuda.is_available()
size = args.size if args.size != "auto" else ("13b" if cuda else "tiny")
from config import LLAMA2_13B_CONFIG  # noqa: E402

arch = LLAMA2_13B_CONFIG if size == "13b" else tiny_config()
work = Path(tempfile.mkdtemp(prefix="bench_"))
model_dir = work / "model"
t0 = time.time()
write_random_model(model_dir, arch)
word_tokenizer(model_dir)
print(f"{size} architecture, random fp16 weights written in {time.time() - t0:.0f}s ({model_dir})", flush=True)
peak_tflops, gpu = None, f"CPU ({os.cpu_count()} cores, smoke test: no GPU figures)"
if cuda:
    p = subprocess.run([sys.executable, __file__, "--_run", "peak:-"], cwd=ROOT, capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"bench: measuring the bf16 matmul peak failed:\n{(p.stdout + p.stderr)[-2000:]}")
    info = json.loads(line.removeprefix("RESULT "))
    peak_tflops, gpu = info["tflops"], info["name"]
runs = [("ours", "sft"), ("ours", "dpo")] + ([] if args.no_baseline else [("trl", "sft"), ("trl", "dpo")])
results = {}
for who, kind in runs:
    cmd = [sys.executable, __file__, "--_run", f"{who}:{kind}", "--_model", str(model_dir)] + [
        a for a in sys.argv[1:] if not a.startswith("--_")]
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        oom = "OutOfMemoryError" in p.stdout or "out of memory" in p.stdout
        results[f"{who}_{kind}"] = {"error": "out of memory under the cap" if oom else f"exit {p.returncode}"}
        print(f"{who} {kind}: FAILED ({results[f'{who}_{kind}']['error']})\n{p.stdout[-2000:]}", flush=True)
        continue
    r = json.loads(line.removeprefix("RESULT "))
    if peak_tflops:
        r["mfu"] = round(r["tok_s"] * r["flops_per_token"] / (peak_tflops * 1e12), 4)
    results[f"{who}_{kind}"] = r
    print(f"{who} {kind}: {r}", flush=True)

print(f"\n{gpu} | bf16 matmul peak {peak_tflops:.0f} TFLOP/s" if peak_tflops else f"\n{gpu}")
print(f"{'run':<10}{'s/step':>9}{'tok/s':>10}{'MFU':>7}{'alloc GiB':>11}{'resv GiB':>10}")
for name, r in results.items():
    if "error" in r:
        print(f"{name:<10}  {r['error']}")
        continue
    print(f"{name:<10}{r['s_per_step']:>9.3f}{r['tok_s']:>10,.0f}{r.get('mfu', float('nan')):>7.1%}"
          f"{r.get('peak_alloc_gib', float('nan')):>11.2f}{r.get('peak_reserved_gib', float('nan')):>10.2f}")
ratios = {}
for kind in ("sft", "dpo"):
    a, b = results.get(f"ours_{kind}", {}), results.get(f"trl_{kind}", {})
    if "tok_s" in a and "tok_s" in b:
        ratios[kind] = {"tok_s_x": round(a["tok_s"] / b["tok_s"], 2)}
        if "peak_alloc_gib" in a and "peak_alloc_gib" in b:
            ratios[kind]["peak_alloc_x"] = round(a["peak_alloc_gib"] / b["peak_alloc_gib"], 2)
        print(f"ours vs TRL, {kind}: {ratios[kind]}")
out = Path(args.out or ROOT / "bench" / ("bench_gpu.json" if cuda else "bench_cpu_smoke.json"))
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps({"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": gpu,
                           "host": platform.node(), "command": "python " + " ".join(sys.argv), "size": size,
                           "bf16_matmul_peak_tflops": round(peak_tflops, 1) if peak_tflops else None,
                           "max_vram_gib_cap": args.max_vram_gib if cuda else None, "micro_batch": args.micro_batch,
                           "results": results, "ours_over_trl": ratios}, indent=2) + "\n")
print(f"written: {out}")
shutil.rmtree(work, ignore_errors=True)
