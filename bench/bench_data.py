"""
Data-preparation benchmark: how long `dpo.py --prepare_only` takes on a full-size hh-rlhf
train set, how long `sft.py --prepare_only` takes on an Airoboros-sized file, how much the
prepared-data cache saves, and how full the packed SFT rows are on an Airoboros-like
length mix. CPU only, no model, no download.

    python bench/bench_data.py                    # what `make bench-data` runs
    python bench/bench_data.py --scale 0.1        # a 10% run, for a quick look

Inputs are synthetic but shaped like the real thing, and written in the real on-disk formats:
  hh-rlhf   the 200 real rows of tests/fixtures (or the demo's rows when that folder is
            absent) repeated to the real subset sizes, 42,537 + 43,835 + 22,007 + 52,421 =
            160,800 train pairs, gzipped as upstream. Each copy gets a distinct number appended
            to its text so nothing is trivially identical.
  airoboros records whose token lengths follow a mix by category (see AIROBOROS_MIX: counts
            and (min, max) lengths per category are an assumption modelled on the dataset's
            categories, not a measurement of it: the real file cannot be fetched here).
Tokenizer: the real Llama-2 tokenizer from tests/fixtures if present, else the demo one.
Results: printed as a table and written to bench_data.json (machine, date, command, figures).
"""

import argparse
import gzip
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repo root (this file is bench/*.py)
sys.path.insert(0, str(ROOT))

from config import LLAMA2_13B_CONFIG  # noqa: E402
FIXTURES = ROOT / "tests" / "fixtures"  # ship with the repo (licences: tests/fixtures/NOTICE)
HH_TRAIN_ROWS = {"harmless-base": 42537, "helpful-base": 43835, "helpful-online": 22007,
                 "helpful-rejection-sampled": 52421}  # the real train sizes (REFERENCE.md)

# category: (share of rows, min reply words, max reply words, instruction words). A guess at
# Airoboros' shape: many short trivia/multiple-choice replies, long writing/coding/contextual
# ones, contextual prompts carrying whole documents. Lengths are drawn log-uniform in the range.
AIROBOROS_MIX = {
    "general": (0.20, 40, 400, 30), "coding": (0.14, 60, 900, 60), "contextual": (0.10, 20, 300, 700),
    "writing": (0.14, 150, 1100, 60), "orca": (0.10, 30, 500, 50), "trivia": (0.10, 3, 40, 20),
    "multiple_choice": (0.05, 2, 20, 60), "roleplay": (0.05, 100, 600, 50), "cot": (0.04, 80, 500, 80),
    "agent": (0.03, 60, 300, 200), "joke": (0.02, 15, 60, 15), "riddle": (0.03, 10, 80, 30),
}

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--scale", type=float, default=1.0, help="fraction of the real sizes to generate")
ap.add_argument("--airoboros_rows", type=int, default=40000, help="SFT records at scale 1 (an estimate of the real file)")
ap.add_argument("--out", default=str(ROOT / "bench/bench_data.json"), help="where the JSON result goes (the committed record)")
args = ap.parse_args()
rng = random.Random(0)
work = Path(tempfile.mkdtemp(prefix="bench_data_"))

# -----------------------------------------------------------------------------
# A model folder with just the tokenizer and a config: prepare-only never loads weights.

model_dir = work / "model"
model_dir.mkdir()
if (FIXTURES / "llama2-tokenizer.model").is_file():
    shutil.copy(FIXTURES / "llama2-tokenizer.model", model_dir / "tokenizer.model")
    tokenizer_name = "Llama-2 (real)"
else:
    subprocess.run([sys.executable, str(ROOT / "tools/demo_assets.py"), "--out", str(work / "demo")], check=True,
                   stdout=subprocess.DEVNULL)
    shutil.copy(work / "demo/models/demo-llama/tokenizer.model", model_dir / "tokenizer.model")
    tokenizer_name = "demo 512-piece BPE (tests/fixtures absent)"
(model_dir / "config.json").write_text(json.dumps(LLAMA2_13B_CONFIG))  # sizes the hours estimate

# -----------------------------------------------------------------------------
# hh-rlhf at full size.

fixture = FIXTURES / "hh-rlhf-harmless-base-test-head200.jsonl.gz"
if fixture.is_file():
    with gzip.open(fixture, "rt", encoding="utf-8") as f:
        seed_rows = [json.loads(line) for line in f]
else:
    with gzip.open(work / "demo/data/demo/hh-rlhf/harmless-base/train.jsonl.gz", "rt", encoding="utf-8") as f:
        seed_rows = [json.loads(line) for line in f]
hh_dir = work / "hh-rlhf"
t0 = time.time()
for subset, n in HH_TRAIN_ROWS.items():
    n = max(1, int(n * args.scale))
    for split, rows in (("train", n), ("test", max(1, n // 20))):
        (hh_dir / subset).mkdir(parents=True, exist_ok=True)
        with gzip.open(hh_dir / subset / f"{split}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1) as f:
            for i in range(rows):
                r = seed_rows[i % len(seed_rows)]
                # the copy number goes into the first human turn: prompts differ, the replies stay real
                tag = f" (#{i})"
                f.write(json.dumps({"chosen": r["chosen"].replace("\n\nAssistant:", tag + "\n\nAssistant:", 1),
                                    "rejected": r["rejected"].replace("\n\nAssistant:", tag + "\n\nAssistant:", 1)}) + "\n")
hh_rows = sum(max(1, int(n * args.scale)) for n in HH_TRAIN_ROWS.values())
print(f"wrote {hh_rows:,} hh-rlhf train pairs in {time.time() - t0:.1f}s")

# -----------------------------------------------------------------------------
# Airoboros-like records.

words = ("the model learns to answer questions about code data history science and writing with "
         "care because every token of a reply carries the loss").split()


def text(n_words):
    return " ".join(rng.choice(words) for _ in range(n_words))


ab_dir = work / "airoboros"
ab_dir.mkdir()
n_records = max(10, int(args.airoboros_rows * args.scale))
cats, weights = list(AIROBOROS_MIX), [v[0] for v in AIROBOROS_MIX.values()]
with open(ab_dir / "instructions.jsonl", "w", encoding="utf-8") as f:
    for _ in range(n_records):
        c = rng.choices(cats, weights)[0]
        _, lo, hi, ins_words = AIROBOROS_MIX[c]
        reply_words = int(round(lo * (hi / lo) ** rng.random()))  # log-uniform in [lo, hi]
        f.write(json.dumps({"instruction": text(max(3, int(ins_words * (0.5 + rng.random())))),
                            "response": text(reply_words), "category": c}) + "\n")


# -----------------------------------------------------------------------------
# Timed runs: each stage's real --prepare_only, cold (fresh cache) then warm (cache hit).

def timed(script, *extra):
    t = time.time()
    p = subprocess.run([sys.executable, str(ROOT / script), "--prepare_only", *extra], cwd=ROOT, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        sys.exit(f"{script} failed:\n{p.stdout[-3000:]}")
    return time.time() - t, p.stdout


results = {}
for stage, script, extra in (
        ("dpo", "dpo.py", ["--data_dir", hh_dir, "--split", "train", "--max_pairs", "0"]),
        ("sft", "sft.py", ["--data_dir", ab_dir])):
    common_args = ["--model_dir", model_dir, "--output_dir", work / f"out-{stage}", "--cache_dir", work / "cache"]
    cold, out = timed(script, *map(str, extra + common_args))
    warm, out_warm = timed(script, *map(str, extra + common_args))
    report = json.loads((work / f"out-{stage}" / "data_report.json").read_text())
    results[stage] = {"rows_read": report["rows_read"], "rows_kept": report["rows_kept"],
                      "cold_s": round(cold, 2), "warm_s": round(warm, 2),
                      "cache_hit_on_rerun": "cache hit" in out_warm,
                      "tokens_after_truncation": report["tokens_after_truncation"],
                      "estimate": report["estimate"]}
    if stage == "dpo":
        results[stage]["tokens_per_pair_mean"] = report["tokens_per_pair_mean"]
    if stage == "sft":
        results[stage]["packing_efficiency"] = report["packing_efficiency"]
        results[stage]["train_rows"] = report["train_rows"]

result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": platform.machine(),
          "cpus": os.cpu_count(), "processor": platform.processor() or platform.platform(),
          "command": "python " + " ".join(sys.argv), "tokenizer": tokenizer_name, "scale": args.scale,
          "airoboros_mix": "synthetic, see AIROBOROS_MIX in bench/bench_data.py", **results}
print(f"\n{'stage':<6}{'rows read':>12}{'kept':>10}{'cold s':>9}{'warm s':>9}  notes")
for stage, r in results.items():
    note = (f"packing {r['packing_efficiency']:.2%} of {r['train_rows']:,} rows" if stage == "sft"
            else f"{r['tokens_per_pair_mean']:.0f} tokens per pair (chosen + rejected)")
    print(f"{stage:<6}{r['rows_read']:>12,}{r['rows_kept']:>10,}{r['cold_s']:>9.1f}{r['warm_s']:>9.1f}  {note}")
Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
print(f"written: {args.out}")
if not os.environ.get("BENCH_KEEP"):
    shutil.rmtree(work, ignore_errors=True)
else:
    print(f"kept: {work}")
