"""
Peak CPU RAM of merge.py, measured: a Llama scaled to be measurable here (default ~1.1 GB of
fp16 weights in 4 shards, like the 13B's 26 GB in 3) with two random rank-r adapters on all
seven projections, merged by the real merge.py in a child process whose peak RSS is read from
the kernel (getrusage: ru_maxrss of the waited-for child).

    python bench/bench_merge.py                          # what `make bench-merge` runs
    python bench/bench_merge.py --layers 4 --shard_gb 0.1

What to expect: merge.py streams one base tensor at a time into an output shard of at most
--max_shard_gb, so its peak is roughly  interpreter + torch (~0.4 GB)  +  both adapters in fp32
+ one output shard + one tensor in fp32, independent of the model's size. For Llama-2-13B with
max_shard_gb 5 and two r=128 adapters (2 x 2.0 GB in fp32) that is about 0.4 + 4 + 5 + 0.7 =
~10 GB: the figure printed under "13B projection" uses the same terms, with this run's measured
overhead. Results go to bench_merge.json (machine, date, command, figures).
"""

import argparse
import json
import os
import platform
import resource
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
ap.add_argument("--hidden", type=int, default=2048, help="hidden size of the scaled model")
ap.add_argument("--layers", type=int, default=8, help="decoder layers of the scaled model")
ap.add_argument("--base_shards", type=int, default=4, help="shards the base is written in")
ap.add_argument("--lora_r", type=int, default=64, help="rank of both random adapters")
ap.add_argument("--max_shard_gb", type=float, default=0.25, help="merge.py's output shard size")
ap.add_argument("--out", default=str(ROOT / "bench/bench_merge.json"), help="where the JSON result goes (the committed record)")
args = ap.parse_args()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import qlora.checkpoint

work = Path(tempfile.mkdtemp(prefix="bench_merge_"))
base, h, inter, vocab = work / "base", args.hidden, int(args.hidden * 2.7), 32000
base.mkdir()

# -----------------------------------------------------------------------------
# A base in Llama's layout and names, fp16, sharded with an index like the real download.

shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
for i in range(args.layers):
    p = f"model.layers.{i}."
    shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
               p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
               p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
               p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
               p + "post_attention_layernorm.weight": (h,)}
g = torch.Generator().manual_seed(0)
names = list(shapes)
weight_map, per_shard = {}, -(-len(names) // args.base_shards)
for s in range(args.base_shards):
    chunk = names[s * per_shard:(s + 1) * per_shard]
    fname = f"model-{s + 1:05d}-of-{args.base_shards:05d}.safetensors"
    save_file({k: (torch.randn(shapes[k], generator=g) * 0.02).half() for k in chunk}, str(base / fname),
              metadata={"format": "pt"})
    weight_map |= {k: fname for k in chunk}
(base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
(base / "config.json").write_text(json.dumps(dict(model_type="llama", hidden_size=h, intermediate_size=inter,
                                                  num_hidden_layers=args.layers, num_attention_heads=16,
                                                  vocab_size=vocab)))
(base / "tokenizer.model").write_bytes(b"placeholder: merge.py only copies it")
base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))

# Two adapters in PEFT's layout, written as complete checkpoints (merge.py verifies their hashes).
targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
adapter_bytes = 0
for stage in ("sft", "dpo"):
    tensors = {}
    for k, shape in shapes.items():
        if len(shape) == 2 and k.split(".")[-2] in targets:
            key = "base_model.model." + k.removesuffix(".weight")
            tensors[key + ".lora_A.weight"] = torch.randn(args.lora_r, shape[1], generator=g) * 0.01
            tensors[key + ".lora_B.weight"] = torch.randn(shape[0], args.lora_r, generator=g) * 0.01
    adapter_bytes += sum(t.numel() * 4 for t in tensors.values())
    qlora.checkpoint.write_checkpoint(work / stage, {"adapter_model.safetensors": tensors}, {"adapter_config.json": {
        "r": args.lora_r, "lora_alpha": 16, "target_modules": list(targets), "peft_type": "LORA"}})
print(f"scaled model: {base_bytes / 1e9:.2f} GB fp16 in {args.base_shards} shards, "
      f"adapters {adapter_bytes / 1e9:.2f} GB fp32 (r={args.lora_r}), output shards <= {args.max_shard_gb} GB")

# -----------------------------------------------------------------------------
# The real merge.py, in a child: its peak RSS is ours to read once it has been waited for.

cmd = [sys.executable, str(ROOT / "merge.py"), "--model_dir", str(base), "--sft_dir", str(work / "sft"),
       "--dpo_dir", str(work / "dpo"), "--output_dir", str(work / "merged"), "--max_shard_gb", str(args.max_shard_gb)]
t0 = time.time()
p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
wall = time.time() - t0
if p.returncode != 0:
    sys.exit(f"merge.py failed:\n{p.stdout[-3000:]}")
peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # Linux reports KiB

# Baseline: the same interpreter importing what merge.py imports, doing nothing.
idle = subprocess.run([sys.executable, "-c", "import resource, qlora.modeling, torch\n"
                       "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)"],
                      cwd=ROOT, capture_output=True, text=True)
idle_gb = float(idle.stdout.strip())
largest_fp32 = max(torch.Size(s).numel() for s in shapes.values()) * 4 / 1e9
overhead = peak_gb - idle_gb - adapter_bytes / 1e9 - args.max_shard_gb - largest_fp32
# 13B: two r=128 adapters on all 7 projections = 2 x 0.50B params in fp32; 5 GB shards; the
# largest tensor (embed / lm_head 32000 x 5120) in fp32 = 0.66 GB
proj_13b = idle_gb + 2 * 0.50e9 * 4 / 1e9 + 5.0 + 32000 * 5120 * 4 / 1e9 + max(overhead, 0)

result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": platform.machine(),
          "cpus": os.cpu_count(), "command": "python " + " ".join(sys.argv),
          "base_gb": round(base_bytes / 1e9, 3), "adapters_fp32_gb": round(adapter_bytes / 1e9, 3),
          "max_shard_gb": args.max_shard_gb, "merge_wall_s": round(wall, 1), "peak_rss_gb": round(peak_gb, 3),
          "idle_python_torch_rss_gb": round(idle_gb, 3), "unexplained_overhead_gb": round(overhead, 3),
          "projection_13b_peak_rss_gb": round(proj_13b, 1)}
print(f"\nmerge of a {base_bytes / 1e9:.2f} GB model: peak RSS {peak_gb:.2f} GB in {wall:.1f}s "
      f"(idle python+torch {idle_gb:.2f} GB, adapters {adapter_bytes / 1e9:.2f} GB, shard {args.max_shard_gb} GB, "
      f"largest tensor fp32 {largest_fp32:.2f} GB, rest {overhead:+.2f} GB)")
print(f"13B projection (max_shard_gb 5, two r=128 adapters): ~{proj_13b:.1f} GB peak RSS, of 64 GB")
Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
print(f"written: {args.out}")
shutil.rmtree(work, ignore_errors=True)
