"""
The pieces sft.py, dpo.py and merge.py share, so each stage script can read as its recipe:

  offline switches and input checks | tokenizer and the prompt format | data readers
  with a drop report | best-fit packing | 4-bit model + LoRA | optimizer and LR schedule |
  crash-safe safetensors checkpoints (adapter, optimizer, RNG, data position) | training health |
  faults (Ctrl+C, SIGTERM, full disk) | logging

Importing this module switches the Hugging Face libraries to offline mode: the training
stages must never touch the network (download.py is the only online step). When a script of
this folder runs, it also turns Ctrl+C, SIGTERM and a full disk into one clear line.
"""

import os

# Must happen before transformers / huggingface_hub are imported: they read these at import.
for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_k] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bisect
import contextlib
import errno
import functools
import gzip
import hashlib
import itertools
import json
import math
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
import zlib
from pathlib import Path

# -----------------------------------------------------------------------------
# Faults at any moment. Ctrl+C / SIGTERM before the training loop (importing torch, data
# preparation, model load) ends with one line saying what was interrupted and what is safe,
# exit 128 + signal, never a KeyboardInterrupt traceback; the loop swaps in StopRequest
# (finish the step, save, exit). A full disk ends with one line naming the path. Installed
# here, before the heavy imports, so the seconds spent importing torch are covered too, and
# only when a script of this folder is the program: a test that imports common keeps pytest's.

_run = {"phase": "start-up", "stage": False, "checkpoint": None, "interrupted": False}
_saves = 0  # saves begun by this process, for fault injection


def _fault(point, at=None):
    """Test-only fault injection: QLORA_FAULT=<point>:<at>[,...] where <at> is a save number
    (default), a file name or a phase. Points: mid_write / before_marker / before_rename
    (SIGKILL inside the n-th save), enospc (a write fails as on a full disk), sigint /
    sigterm (the signal arrives as the phase begins). This is how the tests prove a kill -9,
    a full disk or a Ctrl+C at a chosen moment never costs the last good checkpoint."""
    if f"{point}:{_saves if at is None else at}" not in os.environ.get("QLORA_FAULT", "").split(","):
        return
    if point == "enospc":
        # exactly what safetensors raises on a full disk (checked on a full tmpfs): not an OSError
        from safetensors import SafetensorError
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) (injected)')
    if point in ("sigint", "sigterm"):
        os.kill(os.getpid(), signal.SIGINT if point == "sigint" else signal.SIGTERM)
        return
    print(f"[fault injection] SIGKILL at {point} of save {_saves}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def phase(name):
    """What the program is doing now, for the line an interrupt prints."""
    _run["phase"] = name
    _fault("sigint", name)
    _fault("sigterm", name)


def _next_step():
    if _run["checkpoint"]:
        return f"last good checkpoint: {_run['checkpoint']}; re-run the same command to resume"
    if _run["stage"]:
        return "no checkpoint yet; re-run the same command to start"
    return "nothing was written; re-run the same command"


def _on_interrupt(signum, frame):
    if _run["interrupted"]:
        os._exit(128 + signum)  # a second Ctrl+C while the first one unwinds
    _run["interrupted"] = True
    print(f"\ninterrupted ({signal.Signals(signum).name}) during {_run['phase']}: {_next_step()}", flush=True)
    # unwinds like KeyboardInterrupt (a half-written .tmp is removed on the way), but without a traceback
    raise SystemExit(128 + signum)


def _disk_full(e):
    # OSError carries errno; safetensors' SafetensorError only its text
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        f"(os error {n})" in str(e) for n in (errno.ENOSPC, errno.EDQUOT))


def write_error(path, e):
    """The one line a failed write ends the run with."""
    reason = getattr(e, "strerror", None) or str(e)
    what = ("disk full: free space" if _disk_full(e) else "fix that") + " and re-run the same command"
    if _run["checkpoint"]:
        what += f" (it resumes from {_run['checkpoint']}, which is intact)"
    return f"could not write {path}: {reason}; {what}"


@contextlib.contextmanager
def writing(path):
    """`with writing(path):` a failed write of path (a full disk above all) exits with write_error's line."""
    from safetensors import SafetensorError
    try:
        _fault("enospc", Path(path).name)
        yield
    except (OSError, SafetensorError) as e:
        sys.exit(write_error(path, e))


def _on_uncaught(kind, exc, tb):
    # last resort for a full disk at a write no `writing` wraps (mkdir, a library's cache)
    if _disk_full(exc):
        print(write_error(getattr(exc, "filename", None) or "a file", exc), file=sys.stderr)
    else:
        sys.__excepthook__(kind, exc, tb)


if sys.argv[0].endswith(".py") and Path(sys.argv[0]).resolve().parent == Path(__file__).resolve().parent:
    signal.signal(signal.SIGINT, _on_interrupt)
    signal.signal(signal.SIGTERM, _on_interrupt)
    sys.excepthook = _on_uncaught
phase("start-up")

import logging
import warnings

# Noise on every run that is not ours to act on, silenced where it is raised (nothing else is):
# - bitsandbytes on CPUs with AVX512-BF16 tries an optional kernel that `kernels` would fetch from
#   the Hub; offline it cannot, and load_base_model turns that CPU fast path off anyway (its
#   numerics would make an eval change later steps). Its own kernel runs; the warning says nothing.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# - peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` on every PeftModel
#   (peft_model.py:184); we call the current API (activation_checkpointing_enable) ourselves.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from config import ASSISTANT, HUMAN, ROOT, SOURCES, TURN_SEP, resolve, sha256_file, to_dict

IGNORE = -100  # label value that cross_entropy skips: prompt tokens and padding


# -----------------------------------------------------------------------------
# Inputs: fail in the first second, listing every missing file and the fix.


def require_files(paths, fix):
    """Every input file exists and opens; else stop listing each problem and the fix. Opened here,
    not first at its read after minutes of loading (a chmod 000 file, a folder named like the file)."""
    problems = []
    for p in map(Path, paths):
        try:
            open(p, "rb").close()
        except (FileNotFoundError, NotADirectoryError):
            # a --data_dir or --model_dir given as a file: say so, not only "missing"
            blocker = next((a for a in p.parents if a.is_file()), None)
            problems.append(f"{p}" + (f" ({blocker} is a file, not a folder)" if blocker else ""))
        except IsADirectoryError:
            problems.append(f"{p} (a folder, not a file)")
        except OSError as e:
            problems.append(f"{p} (cannot be read: {e.strerror})")
    if problems:
        sys.exit("missing input files:\n  " + "\n  ".join(problems) + f"\nfetch or build them with: {fix}")


def require_output_dirs(cfg, *names, whole=False):
    """Each cfg.<name> is a folder this process can write in, or can be created: checked now, not at
    the first save hours later. whole=True: the folder is replaced whole (common.AtomicFolder writes
    <folder>.tmp beside it and renames), so its parent is where the writing happens."""
    for name in names:
        value = getattr(cfg, name)
        if not value:
            continue  # cache_dir "" = off
        p, where = resolve(value), f"{type(cfg).__name__}.{name} = {value!r}"
        q = start = p.parent if whole else p
        try:
            q = next(a for a in (start, *start.parents) if a.exists())  # the folder that will be written in
            if p.exists() and not p.is_dir() or not q.is_dir():
                sys.exit(f"{where}: {p if p.exists() else q} is a file, not a folder; choose another --{name}")
            tempfile.TemporaryFile(dir=q).close()  # a real write: permissions, read-only disks, /proc
        except OSError as e:
            if _disk_full(e):  # the same line as a full disk anywhere later
                sys.exit(write_error(p, e))
            sys.exit(f"{where}: cannot write in {q} ({e.strerror}); choose another --{name} or fix its permissions")


def model_files(model_dir):
    d = resolve(model_dir)
    return [d / "config.json", d / "tokenizer.model"]


class BadFile(Exception):
    """A file that is there but is not what we need; the message says why (the caller names the file)."""


def shown(path):
    """A path as a user typed it: relative to the repo root when under it."""
    path = Path(path)
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def read_json(path, kind=dict):
    """The JSON in `path`, which must be a `kind`. Every way it can be bad is one BadFile: invalid
    UTF-8 or JSON, a 100,000-deep nesting (RecursionError), a 5,000-digit number (ValueError)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadFile("missing") from None
    except (OSError, ValueError, RecursionError) as e:
        raise BadFile(f"not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(obj, kind):
        raise BadFile(f"must hold a JSON {'object' if kind is dict else kind.__name__}, "
                      f"holds {json.dumps(obj)[:60] if isinstance(obj, (type(None), bool, int, float, str)) else type(obj).__name__}")
    return obj


# bytes per element of each safetensors dtype
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
                "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def safetensors_header(path):
    """({tensor name: shape}, metadata) of a .safetensors file from its header alone: 8 bytes of
    little-endian header length, then that much JSON. The tensors are never read (a 10 GB shard
    costs microseconds), yet the header must account for every byte of the file, so a copy cut
    short, an empty file or a garbage header is a BadFile here and not a traceback in a loader."""
    try:
        size = Path(path).stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8 or n > 100_000_000:  # safetensors' own header cap is 100 MB
                raise BadFile(f"{size:,} bytes: empty, cut short or not a safetensors file (header length "
                              f"{n:,})" if size >= 8 else f"{size:,} bytes: empty or cut short")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise BadFile("missing") from None
    except (OSError, ValueError, RecursionError) as e:
        raise BadFile(f"unreadable safetensors header ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise BadFile("safetensors header is not a JSON object")
    meta, shapes, end = header.pop("__metadata__", {}), {}, 0
    for name, t in header.items():
        try:
            shape, (a, b) = list(t["shape"]), t["data_offsets"]
            ok = all(type(d) is int and d >= 0 for d in shape + [a, b]) and b - a == math.prod(shape) * _ST_ITEMSIZE[t["dtype"]]
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise BadFile(f"safetensors header entry of tensor {name!r} is malformed: {json.dumps(t)[:100]}")
        shapes[name], end = tuple(shape), max(end, b)
    if 8 + n + end != size:
        raise BadFile(f"{size:,} bytes, but its header describes {8 + n + end:,} (truncated or damaged)")
    return shapes, meta


def repair_hint(path):
    """The command that brings back exactly this file of a model folder (verify.py's advice)."""
    path = Path(path)
    rel = shown(path)
    if (path.parent / "merge_config.json").is_file():  # an output of merge.py
        return f"delete {shown(path.parent)} and re-run `make merge`"
    if rel in {f"{s.local_dir}/{n}" for s in SOURCES.values() for n in s.files}:
        return f"python download.py --files {rel}"
    if "demo" in rel:
        return "make clean-demo && make demo-assets"
    return "replace it with an intact copy of the model's file"


# the config.json fields that size a Llama; each must be a positive integer
LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings")


def base_model_problems(model_dir, training=True, lengths=None):
    """(problems, model) for a Llama folder, WITHOUT loading a weight (milliseconds for 13B):
    config.json has the fields that size the model; every safetensors shard's header parses and
    accounts for the file's size; the index lists shards that exist and hold its tensors; the
    weights' shapes agree with config.json; tokenizer.model loads and fits the embedding; each of
    `lengths` ({"max_seq_len": 2048}) fits max_position_embeddings. training=False skips the
    shards and the lengths: --prepare_only reads only config.json and the tokenizer.
    model = SimpleNamespace(config, shapes {tensor: shape}, shards [file names])."""
    import types
    d = resolve(model_dir)
    problems, model = [], types.SimpleNamespace(config=None, shapes={}, shards=[])

    def bad(path, why):
        problems.append(f"{shown(path)}: {why}\n    repair: {repair_hint(path)}")

    try:
        c = read_json(d / "config.json")
        wrong = [f"{k} = {json.dumps(c.get(k))}" for k in LLAMA_FIELDS if not (type(c.get(k)) is int and c[k] > 0)]
        if wrong:
            raise BadFile("needs positive integers: " + ", ".join(wrong))
        heads = c["num_attention_heads"]
        kv = c.get("num_key_value_heads") or heads
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        if not (type(kv) is int and kv > 0 and heads % kv == 0 and type(head_dim) is int and head_dim > 0):
            raise BadFile(f"num_key_value_heads = {json.dumps(kv)} / head_dim = {json.dumps(head_dim)}: "
                          f"need positive integers, and kv heads dividing num_attention_heads {heads}")
        model.config = c
    except BadFile as e:
        bad(d / "config.json", e)
    for name, n in (lengths or {}).items():
        if training and model.config and n > c["max_position_embeddings"]:
            problems.append(f"--{name} {n} is longer than the model's max_position_embeddings "
                            f"{c['max_position_embeddings']} ({shown(d / 'config.json')}): it has no position "
                            f"beyond that; use --{name} {c['max_position_embeddings']} or less")

    if training:
        index, listed, held = d / "model.safetensors.index.json", {}, {}  # held: shard -> its tensors
        model.shards = ["model.safetensors"]
        if index.exists():
            try:
                listed = read_json(index).get("weight_map")
                if not (isinstance(listed, dict) and listed and all(isinstance(v, str) for v in listed.values())):
                    raise BadFile('needs a "weight_map" of tensor name -> shard file')
                model.shards = sorted(set(listed.values()))
            except BadFile as e:
                bad(index, e)
                listed, model.shards = {}, []
        for shard in model.shards:
            try:
                if Path(shard).name != shard:
                    raise BadFile(f"not a file name in the model folder (from {index.name})")
                held[shard], _ = safetensors_header(d / shard)
            except BadFile as e:
                bad(d / shard, f"{e}{f' (listed in {index.name})' if listed and str(e) == 'missing' else ''}")
        misplaced = [k for k, s in listed.items() if s in held and k not in held[s]]
        if misplaced:
            bad(index, f"places {len(misplaced)} tensor(s) in shards that do not hold them, "
                       f"e.g. {misplaced[0]} in {listed[misplaced[0]]}")
        where = {k: s for s, shapes in held.items() for k in shapes}
        model.shapes = {k: shape for shapes in held.values() for k, shape in shapes.items()}
        if model.config and held and len(held) == len(model.shards):
            h, v, inter = c["hidden_size"], c["vocab_size"], c["intermediate_size"]
            expect = {"model.embed_tokens.weight": (v, h),
                      "model.layers.0.self_attn.q_proj.weight": (heads * head_dim, h),
                      "model.layers.0.self_attn.k_proj.weight": (kv * head_dim, h),
                      "model.layers.0.mlp.gate_proj.weight": (inter, h)}
            if not c.get("tie_word_embeddings"):
                expect["lm_head.weight"] = (v, h)
            for name, shape in expect.items():
                got = model.shapes.get(name)
                if got != shape:
                    bad(d / "config.json", f"hidden_size {h}, vocab_size {v}, intermediate_size {inter}, "
                        f"{heads} heads ({kv} kv) give {name} the shape {list(shape)}, but "
                        + (f"{where[name]} holds {list(got)}" if got else "no shard holds that tensor")
                        + ": config.json and the weights are not of the same model")
                    break
            layers = {int(k.split(".")[2]) for k in model.shapes if k.startswith("model.layers.")
                      and k.split(".")[2].isdigit()}
            if layers != set(range(c["num_hidden_layers"])):
                bad(d / "config.json", f"num_hidden_layers = {c['num_hidden_layers']}, but the weights hold "
                    f"{len(layers)} layers: config.json and the weights are not of the same model")

    tok = d / "tokenizer.model"
    try:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(tok))
    except Exception as e:  # noqa: BLE001  (sentencepiece raises OSError, RuntimeError, ... for a bad file)
        bad(tok, "missing" if not tok.is_file() else f"sentencepiece cannot load it ({str(e)[:100]})")
    else:
        # the embedding's rows: from the weights when they were read, else from config.json
        rows, source = (model.shapes["model.embed_tokens.weight"][0], "model.embed_tokens.weight") \
            if "model.embed_tokens.weight" in model.shapes else (model.config and c["vocab_size"], "config.json vocab_size")
        if rows and sp.get_piece_size() > rows:
            bad(tok, f"{sp.get_piece_size():,} tokens, but the model's embedding has {rows:,} rows ({source}): "
                f"ids from {rows} on have no embedding (a tokenizer of another model)")
        if sp.bos_id() < 0 or sp.eos_id() < 0:
            bad(tok, "defines no BOS or no EOS token (the prompt format needs both)")
    return problems, model


def check_base_model(model_dir, training=True, lengths=None):
    """base_model_problems, or stop naming every bad file with its repair. Returns its model."""
    problems, model = base_model_problems(model_dir, training, lengths)
    if problems:
        sys.exit(f"the model in {shown(resolve(model_dir))} cannot be used ({len(problems)} problem(s)):\n  "
                 + "\n  ".join(problems)
                 + "\nto check every downloaded file against its sha256: make verify FULL=1 (python verify.py --full)")
    return model


def lora_target(key):
    """The base weight a LoRA tensor modifies: peft's
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight -> model.layers.0.self_attn.q_proj.weight"""
    return key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")


def lora_shape_problems(folder, model):
    """An adapter folder against the base model it will sit on (check_base_model's result),
    from the headers alone: every LoRA pair must fit its base weight, B [out, r] @ A [r, in] =
    W [out, in]. An adapter trained on another base is named here, not a size-mismatch
    traceback from peft after the model load."""
    path = Path(folder) / "adapter_model.safetensors"
    try:
        shapes, _ = safetensors_header(path)
    except BadFile as e:
        return [f"{shown(path)}: {e}"]
    bad = []
    for key, a in shapes.items():
        if ".lora_A." in key:
            b, w = shapes.get(key.replace(".lora_A.", ".lora_B.")), model.shapes.get(lora_target(key))
            if not (w and b and len(a) == len(b) == len(w) == 2 and a[1] == w[1] and b[0] == w[0] and a[0] == b[1]):
                bad.append(f"{lora_target(key)}: lora_A {list(a)}, lora_B {list(b) if b else None}, "
                           f"base {list(w) if w else 'no such tensor'}")
    if bad:
        return [f"{shown(path)}: {len(bad)} LoRA pair(s) do not fit the base model's weights, e.g. {bad[0]}: "
                f"an adapter of another base model (its folder's config.json names the model_dir it was trained on)"]
    return [] if any(".lora_A." in k for k in shapes) else [f"{shown(path)}: holds no LoRA tensors"]


def check_adapter(folder, model, what, stage=None):
    """Stop unless `folder` is a finished adapter (COMPLETE.json lists the adapter files, every
    hash verifies) whose LoRA shapes fit `model`. `what` starts the message; `stage` the fix."""
    fix = (f"run `make {stage}` first (a damaged one: delete it, rm -r {shown(folder)}, and the stage rebuilds "
           f"it from its newest checkpoint)" if stage else "point to a finished adapter folder (<stage>/final)")
    problems = verify_checkpoint(folder, ADAPTER_FILES)
    if problems:
        sys.exit(f"{what}: {shown(folder)} is not a complete, intact adapter:\n  " + "\n  ".join(problems) + f"\n{fix}")
    problems = lora_shape_problems(folder, model)
    if problems:
        sys.exit(f"{what}: {shown(folder)} does not fit the base model:\n  " + "\n  ".join(problems))


# Files each reader takes from a folder: every one must be listed (hashed) in its COMPLETE.json,
# or the folder is not usable for that purpose (a file the save never wrote is never trusted).
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # merge.py, chat.py, dpo.py's SFT adapter
FINAL_FILES = ADAPTER_FILES + ("config.json", "summary.json")  # a stage's final/ (eval.py reads all four)
RESUME_FILES = ("adapter_model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors",
                "trainer_state.json")  # find_resume + load_training_state


def is_complete(folder, fix=None, need=FINAL_FILES, full=True):
    """Is a stage's output done? False while `folder` has no COMPLETE.json (not built yet, or
    interrupted: the stage builds it); True once the marker and every file it lists verify. A
    marker over damaged files stops the run with `fix`: a truncated adapter must never count as
    "already complete", nor reach the next stage.
    full: sha256 of every file, not only sizes. Adapters are hashed: 13B at r=128 is 0.5B fp32
    params = 2 GB, ~1-2 s at sha256's ~1.8 GB/s, cheap next to what reads them. A merged model
    (26 GB: minutes) is checked by sizes, and its shards' headers by check_base_model."""
    if not (Path(folder) / "COMPLETE.json").is_file():
        return False
    problems = verify_checkpoint(folder, need, full)
    if problems:
        sys.exit(f"{shown(folder)} is marked complete but damaged:\n  " + "\n  ".join(problems) + "\n"
                 + (fix or f"delete it (rm -r {shown(folder)}) and re-run the same command: a stage without "
                            f"final/ rebuilds it from its newest checkpoint"))
    return True


def pick_device():
    # under a launcher (make train NPROC=N), each process drives the GPU of its LOCAL_RANK
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")


class Distributed:
    """Data parallelism for `make train NPROC=N` (accelerate launch / torchrun set RANK, WORLD_SIZE).

    The scheme is plain and explicit: every process holds the same model and optimizer; each
    optimizer step's micro-batches are dealt out round-robin (rank r takes items r, r+N, ...);
    after backward the LoRA gradients are summed across processes (the loss is already
    normalised by the WHOLE step's token count), so every replica takes the identical optimizer
    step and stays in sync without broadcasting weights. Rank 0 alone writes checkpoints, logs
    and prints. With one process every method is a no-op: the single-GPU path is unchanged."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.main = self.rank == 0
        if self.world > 1:
            import torch.distributed as dist
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # gloo: CPU (tests)
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            if not self.main:
                sys.stdout = open(os.devnull, "w")  # one voice: rank 0 prints; errors still reach stderr

    def _reduce(self, t, op="sum"):
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t

    def sum(self, x):
        """A Python number summed over processes."""
        if self.world == 1:
            return x
        return self._reduce(torch.tensor(float(x), dtype=torch.float64, device=pick_device())).item()

    def any(self, flag):
        """True on every process if it is True on one (a Ctrl+C reaches them at slightly different steps)."""
        if self.world == 1:
            return bool(flag)
        return bool(self._reduce(torch.tensor(int(bool(flag)), device=pick_device()), "max").item())

    def sum_grads(self, params):
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # a rank without a micro-batch still takes part
            self._reduce(p.grad)

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()



def pick_dtype(name, device):
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        # Ampere+ (3090/4090) has bf16: same range as fp32, no loss scaling needed
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU: fp32 is the fast and exact path


# -----------------------------------------------------------------------------
# Tokenizer: sentencepiece directly on tokenizer.model. These are exactly the ids of
# Llama-2's tokenizer, without the wrapper's special-token parsing: a "</s>" inside a
# record stays text, it can never inject a real EOS.


class Tokenizer:
    def __init__(self, model_dir):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(resolve(model_dir) / "tokenizer.model"))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # Llama-2 has no pad token (added_tokens.json's id 32000 is past the embedding).
        # Padding uses unk (0) and is never in the loss, so pad can never be confused with EOS.
        self.pad_id = self.sp.unk_id()
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, texts):
        return self.sp.encode(list(texts), out_type=int, num_threads=os.cpu_count() or 1)

    def decode(self, ids):
        return self.sp.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])


def format_prompt(turns):
    """turns = [human, assistant, human, ..., human] -> the prompt the model must answer,
    ending with the contract's "### Assistant:\\n" (one newline, the reply follows)."""
    parts = []
    for i, text in enumerate(turns):
        parts.append((HUMAN if i % 2 == 0 else ASSISTANT) + text)
    return TURN_SEP.join(parts) + TURN_SEP + ASSISTANT


# Bump when the rule that turns text into trained ids changes: it is part of every data-cache
# key, so a cache prepared by an older rule is never reused (2 = reply ids as a suffix of the
# joined text; 1 = reply encoded on its own, which trained a stray leading "▁").
TOKENIZATION_VERSION = 2


def encode_replies(tok, prompts, prompt_ids, replies, where):
    """The trained ids of each reply: encode(prompt + reply) minus the prompt's ids.

    The model must be trained on the prompt format AS IT TOKENIZES: `### Assistant:\nThe`
    is [..., <0x0A>, The], while `The` encoded on its own is [▁The] (sentencepiece's dummy
    prefix; a reply starting with a digit even gets a lone ▁ 29871 before it). Training on
    the separate encoding taught every reply to start with a space, and disagreed with how
    earlier assistant turns inside a multi-turn prompt are tokenized. So the whole text is
    encoded once and the reply is whatever follows the prompt's ids. That split is exact
    because every prompt ends with "\n", Llama's byte token <0x0A>, which never merges with
    what follows; a tokenizer where it does is refused, naming the row."""
    joined = tok.encode(p + r for p, r in zip(prompts, replies))  # batched, C++ threads
    out = []
    for p_ids, j_ids, w in zip(prompt_ids, joined, where):
        if j_ids[:len(p_ids)] != p_ids:
            sys.exit(f"{w}: the prompt's tokens are not a prefix of prompt + reply's tokens (the tokenizer "
                     f"merged across the end of the prompt), so the label mask cannot be exact. The prompt must "
                     f"end with a newline that the tokenizer keeps as its own token (Llama-2's <0x0A> does).")
        out.append(j_ids[len(p_ids):])
    return out


def build_example(prompt_ids, reply_ids, eos_id, bos_id, max_len):
    """ids = BOS + prompt + reply + EOS, labels = IGNORE over BOS + prompt, the reply + EOS.

    reply_ids come from encode_replies (the suffix of the joined text), so ids are exactly
    [BOS] + encode(prompt + reply) + [EOS], and the mask is exact by construction: no string
    offsets. If too long, the reply is cut (its start is kept) and gets no EOS: the model must
    not learn to stop where the text did not. A prompt that alone fills max_len leaves no
    trained token (the caller drops the row); it is cut, never allowed to eat into the reply.
    Returns (ids, labels, truncated)."""
    ids = ([bos_id] + prompt_ids)[:max_len]
    room = max_len - len(ids)  # >= 0
    reply = reply_ids + [eos_id]
    truncated = len(reply) > room
    reply = reply[:room]
    return ids + reply, [IGNORE] * len(ids) + reply, truncated


# --show_examples: "what exactly is my model trained on?" answered with the prepared ids
# themselves (the same function that builds the training data), not a re-rendering of text.


def render_example(tok, ids, labels, width=600):
    """One example as text with the trained tokens inside [[ ]], plus the token pieces around the
    prompt/reply boundary (where the stray "▁" used to hide). Spans are cut from the decode of the
    whole prefix: a span decoded on its own would lose its leading space to sentencepiece."""
    trained = [l != IGNORE for l in labels]
    cuts = [0] + [k for k in range(1, len(ids)) if trained[k] != trained[k - 1]] + [len(ids)]
    texts = [tok.decode(ids[:k]) for k in cuts]  # decode() drops BOS/EOS; shown as pieces below
    parts = []
    for a, b, t0, t1 in zip(cuts, cuts[1:], texts, texts[1:]):
        span = t1[len(t0):] + ("</s>" if ids[b - 1] == tok.eos_id else "")
        if len(span) > width:
            span = span[:width // 2] + f" …[{len(span) - width} chars]… " + span[-width // 2:]
        parts.append(f"[[{span}]]" if trained[a] else span)
    first = trained.index(True) if any(trained) else len(ids)
    pieces = [tok.sp.id_to_piece(i) for i in ids[max(first - 3, 0):first + 3]]
    boundary = " ".join(repr(x) for x in pieces[:min(first, 3)]) + " | " + " ".join(
        repr(x) for x in pieces[min(first, 3):])
    return "".join(parts), f"boundary (prompt | first trained tokens): {boundary}"


def write_examples(path, examples, tok, n_print=3):
    """examples: dicts with "where" and either input_ids/labels (SFT) or chosen/rejected holding
    them (DPO). Written as JSON (labels -100 where untrained, the HF convention); the first
    n_print are printed with the trained tokens marked. Streamed, one compact example per line
    (still one JSON list): `--show_examples all` on 160k pairs is ~240M ids, which an indented
    json.dumps would first build as one string of several GB."""
    with replacing(path) as f:
        f.write("[\n")
        for i, ex in enumerate(examples):
            f.write((",\n" if i else "") + json.dumps(ex, separators=(",", ":")))
        f.write("\n]\n")
    for ex in examples[:n_print]:
        for side in ("chosen", "rejected") if "chosen" in ex else (None,):
            e = ex[side] if side else ex
            n_trained = sum(l != IGNORE for l in e["labels"])
            text, boundary = render_example(tok, e["input_ids"], e["labels"])
            print(f"--- {ex['where']}{f' ({side})' if side else ''}: {len(e['input_ids'])} tokens, "
                  f"{n_trained} trained (inside [[ ]])\n{text}\n{boundary}")
    print(f"{len(examples)} prepared examples written to {path}")


# -----------------------------------------------------------------------------
# Data reading with an exact account of every row: bad rows are counted with their line
# numbers, never a traceback; too many of them stops the run.


class DataReport:
    def __init__(self, name):
        self.name, self.read, self.kept, self.truncated = name, 0, 0, 0
        self.dropped = {}  # reason -> [count, first line numbers]
        self.bad = 0  # unreadable / malformed rows (the share checked against max_bad_fraction)
        self.files = {}  # file label -> [rows read, bad rows, first bad lines]: the share is per FILE
        self.lengths_before, self.lengths_after = [], []
        self.extra = {}

    def drop(self, reason, where, bad=False):
        entry = self.dropped.setdefault(reason, [0, []])
        entry[0] += 1
        if len(entry[1]) < 5:
            entry[1].append(where)
        if bad:
            self.bad += 1
            f = self.files.setdefault(where.rsplit(":", 1)[0], [0, 0, []])
            f[1] += 1
            if len(f[2]) < 5:
                f[2].append(f"{reason} at line {where.rsplit(':', 1)[1]}")

    def check_bad_share(self, max_fraction, folder):
        """Stop if any ONE file has more than max_fraction bad rows: judged over all files together, a
        ruined small subset would hide under the big ones' good rows."""
        for label, (read, bad, first) in self.files.items():
            if read and bad / read > max_fraction:
                sys.exit(f"{Path(folder) / label}: {bad} of {read} rows are malformed ({bad / read:.1%} > "
                         f"max_bad_fraction {max_fraction:.1%}); first ones: {'; '.join(first)}. "
                         f"Restore the file (make verify FULL=1 finds damaged downloads and prints the command "
                         f"that re-fetches them) or raise --max_bad_fraction.")


    def to_dict(self):
        def pct(xs):
            if not xs:
                return {}
            a = np.asarray(xs)
            return {f"p{q}": int(np.percentile(a, q)) for q in (50, 90, 99)} | {"max": int(a.max())}
        return {"name": self.name, "rows_read": self.read, "rows_kept": self.kept,
                "rows_dropped": {r: {"count": n, "first_lines": ls} for r, (n, ls) in self.dropped.items()},
                "rows_truncated": self.truncated, "tokens_before_truncation": pct(self.lengths_before),
                "tokens_after_truncation": pct(self.lengths_after), **self.extra}



def print_report(d):
    """The data report as a table (from its dict, so a cached report prints the same)."""
    print(f"data report: {d['name']}")
    print(f"  rows read {d['rows_read']:,} | kept {d['rows_kept']:,} | truncated {d['rows_truncated']:,}")
    for r, v in d["rows_dropped"].items():
        print(f"  dropped {v['count']:>7,}  {r:<34} first at {v['first_lines']}")
    for k in ("tokens_before_truncation", "tokens_after_truncation"):
        if d[k]:
            print(f"  {k:<26} " + " ".join(f"{q} {v:,}" for q, v in d[k].items()))
    known = ("name", "rows_read", "rows_kept", "rows_dropped", "rows_truncated",
             "tokens_before_truncation", "tokens_after_truncation")
    for k, v in d.items():
        if k not in known:
            print(f"  {k:<26} {v}")


def read_jsonl(path, report, label=None):
    """Yield (line_number, dict) for each JSON-object line of a .jsonl or .jsonl.gz file.

    Rows and files fail differently. A bad ROW (invalid UTF-8, invalid or absurd JSON, not an
    object, a lone surrogate sentencepiece cannot encode) is counted with its line number and
    skipped; the share of them is judged later (check_bad_share). A bad FILE (unreadable, not
    gzip, a gzip cut short, empty) stops the run naming it: counting a ruined file as one bad
    row would silently drop a whole subset. Lines are decoded one by one from bytes: a decode
    error in a text-mode stream surfaces per 8 KB chunk, naming the wrong line and losing the
    good rows around it. `label` is how the file is named in the report (subset/file.jsonl.gz)."""
    path, label = Path(path), label or Path(path).name
    counts = report.files.setdefault(label, [0, 0, []])
    fix = "restore it (make verify FULL=1 finds damaged downloads and prints the command that re-fetches them)"
    try:
        raw = open(path, "rb")
    except OSError as e:
        sys.exit(f"{path}: cannot be read ({e.strerror}); {fix}")
    with raw:
        lines = iter(gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw)
        lineno, rows = 0, 0
        while True:
            try:
                line = next(lines)
            except StopIteration:
                break
            except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                if isinstance(e, EOFError):
                    what = f"is cut short after line {lineno} (the gzip ends early: an interrupted download or copy)"
                elif lineno == 0:
                    what = "is not a gzip file"
                else:
                    what = f"is damaged after line {lineno} (corrupt gzip data)"
                sys.exit(f"{path}: {what}: {e}; {fix}")
            lineno += 1
            if lineno == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark from an editor is not data
            if not line.strip():
                continue
            where = f"{label}:{lineno}"
            rows += 1
            report.read += 1
            counts[0] += 1
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                report.drop("invalid UTF-8", where, bad=True)
                continue
            try:
                row = json.loads(text)
            except (ValueError, RecursionError):  # + 100,000-deep nesting and 5,000-digit ints
                report.drop("invalid JSON", where, bad=True)
                continue
            if not isinstance(row, dict):
                report.drop("not a JSON object", where, bad=True)
                continue
            if "\\ud" in text.lower():  # only an escape can make a lone surrogate: check just those lines
                try:
                    json.dumps(row, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError:
                    report.drop("invalid unicode (lone surrogate escape)", where, bad=True)
                    continue
            yield lineno, row
    if rows == 0:
        sys.exit(f"{path}: the file is empty (no rows); {fix}")


def split_hh(transcript):
    """hh-rlhf transcript -> (turns before the final reply, final reply); ValueError(reason) if it
    is not one.

    The transcript is "\n\nHuman: ...\n\nAssistant: ...". The preference is only in the
    FINAL assistant turn: everything up to the last "\n\nAssistant:" is the prompt
    (the 2023 recipe made a pair of every turn; 60% of them had chosen == rejected)."""
    cut = transcript.rfind("\n\nAssistant:")
    if cut < 0:
        raise ValueError("not a Human/Assistant transcript")
    head, reply = transcript[:cut], transcript[cut + len("\n\nAssistant:"):]
    if "\n\nHuman:" in reply:
        # the text after the last assistant turn holds a human turn: the transcript ends on the
        # human's words, and "the reply" would teach the model to write the user's next turn
        raise ValueError("transcript ends on a Human turn")
    turns = []
    for chunk in head.split("\n\nHuman:")[1:]:
        human, *assistant = chunk.split("\n\nAssistant:")
        turns.append(human.strip())
        turns.extend(a.strip() for a in assistant)
    if not turns or not head.startswith("\n\nHuman:") or len(turns) % 2 == 0:
        raise ValueError("not a Human/Assistant transcript")  # must start with a human turn and alternate
    return turns, reply.strip()


# -----------------------------------------------------------------------------
# Prepared-data cache: tokenizing 160k pairs costs seconds to a minute; a resumed or
# repeated run loads the result instead. The key is a fingerprint of everything the
# result depends on, so a stale entry can never be used:
#   the CONTENT of every input file and of tokenizer.model (not paths or mtimes: a folder
#   copied to another box still hits), every setting that shapes the data, and the source
#   of the code that prepares it (the stage script, common.py, config.py: an edit there
#   costs one re-preparation, never a silently different dataset).


def data_fingerprint(files, settings):
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode() + b"\0" + sha256_file(f).encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for src in (Path(sys.argv[0]), Path(__file__), Path(__file__).with_name("config.py")):
        h.update(src.read_bytes() if src.is_file() else b"")
    return h.hexdigest()[:20]


def load_cached(cache_dir, key):
    """(tensors, report dict) from a previous preparation, or None. A damaged entry (a crash
    can't make one: it is renamed into place complete, but a disk can) is ignored and rebuilt."""
    if not cache_dir:
        return None
    path = resolve(cache_dir) / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            report = json.loads(f.metadata()["report"])
            tensors = {k: f.get_tensor(k).long() for k in f.keys()}  # stored int32, used as int64
        return tensors, report
    except Exception as e:  # noqa: BLE001  (any damage: rebuild)
        print(f"data cache {path.name} unreadable ({type(e).__name__}), preparing again")
        return None


def save_cached(cache_dir, key, tensors, report):
    if not cache_dir:
        return
    folder = resolve(cache_dir)
    tmp = folder / f"{key}.safetensors.{os.getpid()}.tmp"  # per process: N launched ranks may race here
    # int32 halves the file (ids < 32000, positions < 4096); tmp + fsync + rename: never half an entry
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _fault("enospc", "cache")
        save_file({k: v.to(torch.int32).contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"report": json.dumps(report)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / f"{key}.safetensors")
    except Exception as e:  # noqa: BLE001  (the cache is an optimisation: a full disk must not stop the run)
        print(f"warning: could not write the data cache in {folder} ({type(e).__name__}: {e}); continuing without it")
    finally:
        tmp.unlink(missing_ok=True)  # after a failure or a Ctrl+C: never a stray partial file


def load_or_prepare(cache_dir, key, prepare):
    """(data, report, seconds, hit): the cached preparation under `key`, or prepare() run and
    cached. The report gets the key and the digest of the data (what a resume checks)."""
    phase("data preparation")
    t0 = time.time()
    cached = load_cached(cache_dir, key)
    if cached is None:
        data, report = prepare()
        save_cached(cache_dir, key, data, report)
    else:
        data, report = cached
    report |= {"cache_key": key, "data_digest": data_digest(data)}
    return data, report, time.time() - t0, cached is not None


def flatten_sequences(seqs):
    """list of int lists -> (flat tensor, lengths tensor): how variable-length data is cached.
    np.fromiter over a chain is ~5x faster than torch.tensor on a nested list (50M tokens: 1 s)."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(flat), torch.from_numpy(lengths)


def unflatten_sequences(flat, lengths):
    return [x.tolist() for x in torch.split(flat, lengths.tolist())] if len(lengths) else []


def pairs_from_cache(data, name):
    """DPO pairs (chosen ids, chosen labels, rejected ids, rejected labels) from the flat cached
    tensors: labels are IGNORE over BOS + prompt (its length is cached), then the reply."""
    chosen = unflatten_sequences(data[f"{name}_chosen"], data[f"{name}_chosen_len"])
    rejected = unflatten_sequences(data[f"{name}_rejected"], data[f"{name}_rejected_len"])
    return [(c, [IGNORE] * n + c[n:], r, [IGNORE] * n + r[n:])
            for c, r, n in zip(chosen, rejected, data[f"{name}_prompt_len"].tolist())]


def pack_pairs(batch):
    """Pairs -> one padding-free row [chosen_0, rejected_0, chosen_1, ...] with per-sequence
    position ids (no cross-sequence attention) and the sequence index of every token."""
    ids, labels, pos, seq = [], [], [], []
    for k, (c_ids, c_lab, r_ids, r_lab) in enumerate(batch):
        for j, (x, y) in enumerate(((c_ids, c_lab), (r_ids, r_lab))):
            ids += x
            labels += y
            pos += range(len(x))
            seq += [2 * k + j] * len(x)
    return [torch.tensor([v]) for v in (ids, labels, pos, seq)]


def stage_data(stage_out_dir, stage):
    """The exact prepared tensors a finished stage used (for eval.py): looked up in the data cache
    by the key in its data_report.json, and accepted only if their digest is the one it trained on."""
    out = Path(stage_out_dir)
    rebuild = f"python {stage}.py --prepare_only --preset ... (the flags in {out / 'config.json'})"
    files = {}
    for name in ("data_report.json", "config.json", "final/summary.json"):
        try:
            files[name] = read_json(out / name)
        except BadFile as e:
            sys.exit(f"{shown(out / name)}: {e}; rewrite it (seconds, no training) with the run's settings: {rebuild}")
    report, cfg = files["data_report.json"], files["config.json"]
    # the digest the FINAL adapter was trained on (a later --prepare_only may have rewritten the report)
    want = files["final/summary.json"].get("data_digest", report.get("data_digest"))
    hit = load_cached(cfg.get("cache_dir"), report.get("cache_key"))
    if hit is None or data_digest(hit[0]) != want:
        sys.exit(f"the prepared data of {out} is not in its cache ({cfg.get('cache_dir') or 'cache off'}); "
                 f"rebuild it (seconds, no training) with the run's settings: {rebuild}")
    return hit[0], report, cfg


# -----------------------------------------------------------------------------
# Hours before the first step. An ESTIMATE from arithmetic, printed with the data report so a
# user sees the cost of a setting (epochs, pair budget) before committing a day to it:
#   hours = tokens x FLOPs per token / (GPU bf16 peak x utilisation)
# FLOPs per token for LoRA training with gradient checkpointing: forward 2N + recomputed
# forward 2N + backward through activations 2N (the frozen base gets no weight gradient) +
# the adapters' share ~0.5N = ~6.5N (84.6 GFLOP for 13B). DPO adds the reference forward: 8.5N.
# Utilisation 35% is the 2023 recipe's MEASURED speed (683 tok/s on a 4090 = 683 x 84.6 GFLOP
# = 35% of 165 TFLOP/s), so this is "as fast as the old recipe", not a promise; `make bench`
# on a GPU gives the real tokens/s.

GPU_PEAK_TFLOPS = {"RTX 4090": 165.0, "RTX 3090": 71.0}  # dense bf16 tensor-core peaks (REFERENCE.md)
ASSUMED_MFU = 0.35


def model_params(model_dir):
    """Parameter count from config.json (Llama layout): 13.0e9 for Llama-2-13B."""
    c = json.loads((resolve(model_dir) / "config.json").read_text())
    h, i, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h * c.get("num_key_value_heads", c["num_attention_heads"]) // c["num_attention_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + 2 * v * h


def hours_estimate(tokens, flops_per_token):
    return {f"{gpu} at {ASSUMED_MFU:.0%} MFU": round(tokens * flops_per_token / (peak * 1e12 * ASSUMED_MFU) / 3600, 1)
            for gpu, peak in GPU_PEAK_TFLOPS.items()}


# -----------------------------------------------------------------------------
# Packing: best-fit decreasing into fixed-length rows. Each example keeps its own
# position ids (0..n-1); transformers turns position-id restarts into a block-diagonal
# causal mask (SDPA) or varlen attention (flash), so examples never attend to each other.


def pack_best_fit(lengths, capacity):
    """Indices grouped into bins whose lengths sum <= capacity, longest first, each into the
    fullest bin that still fits it. O(n log n). Deterministic for the same lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, free = [], []  # free: sorted list of (remaining, bin index)
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, b = free.pop(j)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def make_packed_row(examples, capacity, pad_id):
    """examples = [(ids, labels)] -> (ids, labels, position_ids), each `capacity` long.
    Padding forms its own 'document' (positions restart at 0) with IGNORE labels."""
    ids, labels, pos = [], [], []
    for x, y in examples:
        ids += x
        labels += y
        pos += range(len(x))
    pad = capacity - len(ids)
    return ids + [pad_id] * pad, labels + [IGNORE] * pad, pos + list(range(pad))


@functools.lru_cache(maxsize=2)
def _epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def stream_indices(n, seed, start, count):
    """Items start..start+count of the endless stream epoch 0, epoch 1, ... over n items, each
    epoch a permutation that is a pure function of (seed, epoch): the data position after a
    resume is just the step count, no sampler state to save. Cached: one permutation per epoch."""
    return [_epoch_order(n, seed, p // n)[p % n] for p in range(start, start + count)]


# -----------------------------------------------------------------------------
# Model: the base in NF4 (QLoRA), LoRA adapters on top.


def load_base_model(model_dir, cfg, device):
    phase("model load")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    dtype = pick_dtype(cfg.dtype, device)
    quant = None
    if cfg.quantize_4bit:
        # NF4 (normal-float 4-bit, information-optimal for normally distributed weights) plus
        # double quantization of the block scales: 13B -> ~7.2 GB instead of 26 GB in fp16.
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        resolve(model_dir), dtype=dtype, quantization_config=quant, device_map={"": str(device)},
        attn_implementation="sdpa")
    model.config.use_cache = False  # a KV cache is useless in training, and its presence disables packed masks
    if quant and device.type == "cpu":
        # bitsandbytes repacks 4-bit weights for a faster CPU kernel the first time a layer
        # runs in eval mode without grad, and uses that kernel from then on. Its numerics
        # differ slightly, so an eval would change every later training step (and a resumed
        # run, which had no eval yet, would drift from the original). Keep one kernel.
        import bitsandbytes as bnb
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        # non-reentrant checkpointing works with frozen inputs; the reentrant one needs the
        # "enable_input_require_grads" hack ("None of the inputs have requires_grad")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def lora_config(cfg):
    from peft import LoraConfig
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_targets.split(","), bias="none", task_type="CAUSAL_LM")


def set_active_adapters(model, names):
    """Choose which LoRA adapters take part in the forward pass, without touching
    requires_grad (peft's own set_adapter would mark them all trainable)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m._active_adapter = list(names)


def adapter_state(model, name):
    from peft import get_peft_model_state_dict
    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def adapter_files(model, name):
    """The adapter as checkpoint files in PEFT's standard layout (adapter_model.safetensors +
    adapter_config.json), so it also loads with PeftModel.from_pretrained(base, folder)."""
    config = model.peft_config[name].to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = None  # no absolute path: the folder can move machines
    config = json.loads(json.dumps(config, default=str))
    return {"adapter_model.safetensors": adapter_state(model, name)}, {"adapter_config.json": config}


def load_adapter_weights(model, name, folder):
    """Adapter `name` from folder/adapter_model.safetensors, its tensor names and shapes checked
    against the model first (from the header): peft loads a partial state dict without a word
    (a missing tensor keeps its fresh init) and a wrong shape fails deep inside torch."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    path = Path(folder) / "adapter_model.safetensors"
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    try:
        have, _ = safetensors_header(path)
        diff = [f"{k}: file {list(have[k]) if k in have else 'none'}, model {list(want[k]) if k in want else 'none'}"
                for k in sorted(want.keys() | have.keys()) if have.get(k) != want.get(k)]
        if diff:
            raise BadFile(f"{len(diff)} tensor(s) do not fit this model's {name} adapter, e.g. {diff[0]}")
    except BadFile as e:
        cannot_resume(folder, path, e)
    set_peft_model_state_dict(model, load_file(str(path)), adapter_name=name)


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def _chunk_logps(hidden, weight, targets):
    # logits of this chunk only, upcast to fp32 for the log-softmax (bf16 loses ~3 digits there)
    logits = (hidden @ weight.t()).float()
    return -torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten(),
                                              reduction="none").view(targets.shape)


def token_logps(model, ids, pos, labels, chunk):
    """log p(label_t | tokens before t) at every position, 0 where the label is IGNORE: [B, T-1].

    The full [tokens, 32000] logits are never materialised: the decoder runs once, then the
    lm_head and log-softmax run `chunk` tokens at a time, each chunk under activation
    checkpointing so backward recomputes its logits instead of keeping them. For 2048 tokens
    that is 2048 x 32000 x 4 B = 262 MB of fp32 logits, plus as much for the log-softmax and its
    gradient, reduced to chunk/2048 of it (1024: half). chunk 0 = one chunk (no saving).
    Same numbers as the plain loss (tested: loss to 1e-7, gradients identical)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper -> HF model
    hidden = base.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[:, :-1]
    targets = labels[:, 1:]  # token t is predicted from position t-1
    weight, step = base.lm_head.weight, chunk if chunk > 0 else targets.shape[1]
    parts = []
    for s in range(0, targets.shape[1], step):
        h, t = hidden[:, s:s + step], targets[:, s:s + step]
        if hidden.requires_grad:
            lp = torch.utils.checkpoint.checkpoint(_chunk_logps, h, weight, t, use_reentrant=False)
        else:
            lp = _chunk_logps(h, weight, t)
        parts.append(lp * (t != IGNORE))
    return torch.cat(parts, 1)


def sequence_logps(token_lp, seq_ids, n_seqs):
    """Sum of the scored token log-probs of each sequence of a packed row.
    token_lp [1, T-1] from token_logps, seq_ids [1, T] (which packed sequence each token is)."""
    return torch.zeros(n_seqs, device=token_lp.device).index_add(0, seq_ids[0, 1:], token_lp[0])


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7), per pair:

        loss = -log sigmoid( beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))] )

    Inputs are summed reply log-probs [pairs]. Returns (loss [pairs], chosen reward,
    rejected reward), rewards = beta * (log pi - log ref), the implicit reward DPO learns."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = -torch.nn.functional.logsigmoid(chosen_reward - rejected_reward)
    return loss, chosen_reward.detach(), rejected_reward.detach()


# -----------------------------------------------------------------------------
# Optimizer and LR: the LR is a pure function of the step (nanoGPT style), so resuming
# needs no scheduler state at all.


def make_optimizer(params, cfg):
    kw = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kw)
    import bitsandbytes as bnb
    # 8-bit block-wise Adam states: 0.5B LoRA params -> 1 GB instead of 4 GB of moments.
    # "paged" puts them in CUDA unified memory that spills to CPU RAM on a spike instead of OOM.
    cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, **kw)


def lr_at(step, cfg, total_steps):
    """Linear warmup for warmup_steps, then cosine from lr down to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------
# Training health: a step whose loss or gradient norm is NaN/inf stops the run before
# optimizer.step, so neither the weights nor any checkpoint ever hold it (a NaN adapter
# found 20 hours later is the worst way a run can end).


def check_health(step, loss, grad_norm, cfg):
    """Once per optimizer step, between clip_grad_norm_ and optimizer.step. loss is the step's
    loss (already a Python float), grad_norm the tensor clip_grad_norm_ returned; returns it
    as a float: the one host sync, which the log line needed anyway. Both are checked: a NaN
    in the forward makes every gradient NaN, but an infinite loss can have finite gradients
    (cross-entropy at a -inf logit: softmax - onehot; DPO's logsigmoid at -inf: sigmoid)."""
    norm = float(grad_norm)
    if math.isfinite(loss) and math.isfinite(norm):
        return norm
    knobs = [f"a lower --lr (now {cfg.lr:g})",
             f"a lower --grad_clip (now {cfg.grad_clip:g})" if cfg.grad_clip > 0 else "--grad_clip > 0 (now off)"]
    if hasattr(cfg, "beta"):
        knobs.append(f"a smaller --beta (now {cfg.beta:g})")
    sys.exit(f"step {step}: loss {loss:.4g}, gradient norm {norm:.4g}: not finite, training diverged; stopped "
             f"before this step changed the weights, nothing of it was saved.\n" + _diverged_advice(knobs))


def _diverged_advice(knobs):
    text = f"likely fixes: {', '.join(knobs)}; check the data for extreme rows (data_report.json)\n"
    if _run["checkpoint"]:
        return text + (f"last good checkpoint: {_run['checkpoint']}; re-run with a fix and it resumes from there "
                       f"(if the loss was already climbing, delete the newest step_ folders to resume earlier)")
    return text + "no checkpoint was written yet; re-run with a fix"


# -----------------------------------------------------------------------------
# Checkpoints: only .safetensors and .json, written to step_XXXXXX.tmp/, fsynced, hashed,
# marked COMPLETE.json last, then renamed into place. A kill at any instant leaves either
# the old set or the old set plus a *.tmp that resume ignores.


def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flatten_optimizer(optimizer):
    """optimizer.state_dict() -> (tensors, json). Works for torch AdamW and bitsandbytes'
    8-bit / paged optimizers alike: bnb nests its quantized moments and block scales in a
    dict per parameter, so nested dicts are walked; their path is joined with '/'."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}

    def walk(prefix, obj):
        for k, v in obj.items():
            path = f"{prefix}/{k}"
            if isinstance(v, dict):
                walk(path, v)
            elif torch.is_tensor(v):
                # a copy: bnb shares one quantization map between all params (safetensors refuses aliases)
                tensors["state." + path] = v.detach().to("cpu", copy=True).contiguous()
            else:
                scalars[path] = v

    for idx, state in sd["state"].items():
        walk(str(idx), state)
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors, meta):
    state = {}
    items = [(k.removeprefix("state."), v) for k, v in tensors.items()] + list(meta["scalars"].items())
    for path, v in items:
        idx, *keys = path.split("/")
        node = state.setdefault(int(idx), {})
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state():
    """Every RNG stream, as (tensors, json)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors, meta):
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    v, s, g = meta["python"]
    random.setstate((v, tuple(s), g))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


class AtomicFolder:
    """`with AtomicFolder(final) as tmp:` write files into tmp; on success every file is
    fsynced and hashed into COMPLETE.json (written last), then tmp is renamed to `final`.
    Crash anywhere -> `final` is either absent, the previous complete version, or the new
    complete version. A full disk ends the run with one line; older folders are untouched."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.tmp = self.folder.with_name(self.folder.name + ".tmp")

    def __enter__(self):
        global _saves
        _saves += 1
        phase(f"writing {self.folder}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)  # leftover of a save that was killed: never trusted
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._commit()
        except OSError as e:
            exc_type, exc = OSError, e
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            # safetensors reports a full disk as SafetensorError, which is not an OSError
            if issubclass(exc_type, OSError) or exc_type.__name__ == "SafetensorError":
                sys.exit(write_error(self.folder, exc))
        return False

    def _commit(self):
        hashes = {}
        for p in sorted(self.tmp.iterdir()):
            _fsync_path(p)
            hashes[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        _fault("before_marker")
        marker = self.tmp / "COMPLETE.json"
        marker.write_text(json.dumps({"files": hashes, "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
        _fsync_path(marker)
        _fault("before_rename")
        if self.folder.exists():  # e.g. a rewritten final/: swap in, then delete the old one
            old = self.folder.with_name(self.folder.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            # no Ctrl+C between the two renames: it would leave neither the old folder nor the new
            # one under the name (a signal that arrives now is delivered right after them)
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            try:
                self.folder.rename(old)
                self.tmp.rename(self.folder)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            shutil.rmtree(old)
        else:
            self.tmp.rename(self.folder)
        _fsync_path(self.folder.parent)


def write_checkpoint(folder, tensor_files, json_files, metadata=None):
    """Atomically create `folder` from {"x.safetensors": {key: tensor}} and {"y.json": obj};
    `metadata` ({str: str}) goes into every safetensors header. A NaN/inf tensor is refused
    before anything is written (check_health stops a diverging run earlier; this guards every
    other way a non-finite value could reach a checkpoint)."""
    for name, tensors in tensor_files.items():
        bad = next((k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if bad is not None:
            sys.exit(f"refusing to write {folder}: {name} tensor {bad} has NaN/inf values (training diverged)\n"
                     + _diverged_advice(["a lower --lr", "--grad_clip > 0", "a smaller --beta (DPO)"]))
    with AtomicFolder(folder) as tmp:
        for name, tensors in tensor_files.items():
            save_file(tensors, str(tmp / name), metadata=metadata)
            _fault("mid_write")
            _fault("enospc")
        for name, obj in json_files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2))


def save_training_state(folder, model, adapter, optimizer, state):
    """A resumable checkpoint: adapter + full optimizer state + every RNG stream + the JSON
    state (step, data position, metric history, config). Saved only between optimizer
    steps, so the gradient-accumulation position is always 0 here."""
    tensors, jsons = adapter_files(model, adapter)
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    rng_tensors, rng_meta = rng_state()
    tensors |= {"optimizer.safetensors": opt_tensors, "rng.safetensors": rng_tensors}
    # one random id per save, in every file, binds them together (see resume_problems);
    # secrets draws from the OS, so no RNG stream of the run moves
    bind = {"checkpoint_id": secrets.token_hex(8), "step": str(state["step"])}
    jsons |= {"optimizer.json": opt_meta,
              "trainer_state.json": dict(state, rng=rng_meta, checkpoint_id=bind["checkpoint_id"])}
    write_checkpoint(folder, tensors, jsons, metadata=bind)
    _run["checkpoint"] = Path(folder)  # what an interrupt or a later failure names as the last good one


def load_training_state(folder, model, adapter, optimizer):
    """Inverse of save_training_state; returns the JSON state. Nothing goes through pickle, and
    nothing is loaded before its names and shapes are checked against this model."""
    phase("checkpoint load")
    folder = Path(folder)
    load_adapter_weights(model, adapter, folder)
    path = folder / "optimizer.json"
    try:
        meta = read_json(path)
        path = folder / "optimizer.safetensors"
        names = [n for n, p in model.named_parameters() if p.requires_grad]  # make_optimizer's order
        state_dict = checked_optimizer_state(optimizer, load_file(str(path)), meta, names)
    except BadFile as e:
        cannot_resume(folder, path, e)
    optimizer.load_state_dict(state_dict)
    state = json.loads((folder / "trainer_state.json").read_text())
    set_rng_state(load_file(str(folder / "rng.safetensors")), state["rng"])
    return state


def cannot_resume(folder, path, why):
    sys.exit(f"cannot resume from {shown(folder)}: {shown(path)}: {why}\n"
             f"this checkpoint does not fit the model built now. Move it aside (mv {shown(folder)} "
             f"{shown(folder)}.bad) to resume from the one before it, or use a new --output_dir to start afresh")


def checked_optimizer_state(optimizer, tensors, meta, names):
    """The saved optimizer state (unflatten_optimizer) after checking it against the parameters
    it is about to be loaded into: torch's and bitsandbytes' load_state_dict compare only the
    group sizes, so moments of another shape load and fail (or broadcast) at the first step, and
    moments of another dtype are silently cast. BadFile names the parameter."""
    try:
        sd = unflatten_optimizer(tensors, meta)
        saved = [len(g["params"]) for g in sd["param_groups"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadFile(f"not an optimizer state this code wrote ({type(e).__name__}: {e})") from None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if saved != [len(g["params"]) for g in optimizer.param_groups] or sorted(sd["state"]) != list(range(len(params))):
        raise BadFile(f"holds state for {len(sd['state'])} parameters in groups of {saved}; this model trains "
                      f"{len(params)} in groups of {[len(g['params']) for g in optimizer.param_groups]}")
    for i, p in enumerate(params):
        # bitsandbytes nests its moments one level down (state1/2 + qmaps + absmax)
        state = sd["state"][i]
        state = state.get("__bnb_optimizer_quant_state__", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise BadFile(f"the state of {names[i]} is not a mapping")
        for key, v in state.items():
            # torch AdamW: exp_avg(_sq) shaped and typed like the parameter; bitsandbytes:
            # state1/2 shaped like it, uint8 (8-bit) or fp32 (small tensors)
            dtypes = (p.dtype,) if key.startswith("exp_avg") else (torch.uint8, torch.float32)
            if key in ("exp_avg", "exp_avg_sq", "state1", "state2") and (
                    not torch.is_tensor(v) or v.shape != p.shape or v.dtype not in dtypes):
                got = f"{list(v.shape)} {v.dtype}" if torch.is_tensor(v) else repr(v)[:40]
                raise BadFile(f"{key} of {names[i]} is {got}, the parameter is {list(p.shape)} {p.dtype}")
    return sd


def marker_files(folder):
    """COMPLETE.json's {file name: {"sha256", "bytes"}}, as AtomicFolder writes it, or BadFile:
    `null`, a list, "files" as a list or an empty map, a non-hex hash, a name with a path in it
    (it would check a file outside the folder) are a corrupt marker, never a traceback."""
    files = read_json(Path(folder) / "COMPLETE.json").get("files")
    if not isinstance(files, dict) or not files:
        raise BadFile(f'needs a non-empty "files" map of file name -> {{"sha256", "bytes"}}, has {json.dumps(files)[:60]}')
    for name, want in files.items():
        sha, size = (want.get("sha256"), want.get("bytes")) if isinstance(want, dict) else (None, None)
        if (Path(name).name != name or name in ("", ".", "..") or not isinstance(sha, str) or len(sha) != 64
                or set(sha) - set("0123456789abcdef") or type(size) is not int or size < 0):
            raise BadFile(f'entry {json.dumps(name)[:60]}: {json.dumps(want)[:100]} is not '
                          f'{{"sha256": 64 hex digits, "bytes": size}} of a file in the folder')
    return files


def verify_checkpoint(folder, need=(), full=True):
    """Return a list of problems (empty = good) by checking every file against the hashes
    recorded in COMPLETE.json: a truncated or flipped-bit tensor file is named, never used.
    need: files the caller will read, which must be listed too. full=False: sizes only."""
    folder = Path(folder)
    if not (folder / "COMPLETE.json").is_file():
        return [f"{folder}: no COMPLETE.json (the save was interrupted)"]
    try:
        files = marker_files(folder)
    except BadFile as e:
        return [f"{folder}/COMPLETE.json: corrupt marker: {e}"]
    problems = [f"{folder / n}: not listed in COMPLETE.json, so never verified (it is not from this save)"
                for n in need if n not in files]
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != want["bytes"] or (full and sha256_file(p) != want["sha256"]):
            problems.append(f"{p}: contents do not match the sha256 recorded at save time (corrupt or truncated: "
                            f"{p.stat().st_size:,} bytes, {want['bytes']:,} when saved)")
    return problems


def resume_problems(folder):
    """verify_checkpoint for a resume (every file it reads listed and intact) + the binding of
    the files. Hashes prove each file is the one COMPLETE.json lists, not that the files belong
    together: an optimizer state of the same shapes copied in from another run, with
    COMPLETE.json rewritten, would resume silently with foreign moments. So every save draws a
    random checkpoint_id and writes it, with the step, into each safetensors header and into
    trainer_state.json; all must agree. Per save, not per run: a file of another step of the
    same run is caught too."""
    folder = Path(folder)
    problems = verify_checkpoint(folder, RESUME_FILES)
    if problems:
        return problems
    try:
        state = read_json(folder / "trainer_state.json")
        if not (type(state.get("step")) is int and isinstance(state.get("history"), list)
                and isinstance(state.get("config"), dict) and isinstance(state.get("rng"), dict)):
            raise BadFile("lacks the step, history, config or rng of a training state")
    except BadFile as e:
        return [f"{folder / 'trainer_state.json'}: {e}"]
    if "checkpoint_id" not in state:  # saved before checkpoints carried ids (a run begun on older code)
        print(f"note: {folder.name} predates checkpoint ids: its files are checked by their hashes only")
        return []
    want = (state["checkpoint_id"], str(state["step"]))
    for name in ("adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        try:
            got = tuple(safetensors_header(folder / name)[1].get(k) for k in ("checkpoint_id", "step"))
        except BadFile as e:
            got = str(e)
        if got != want:
            problems.append(f"{folder / name}: not written by the save of trainer_state.json (checkpoint_id, "
                            f"step: {got} here, {want} there): copied in from another run or step")
    return problems


def step_folders(output_dir):
    return sorted(p for p in Path(output_dir).glob("step_*") if p.is_dir() and p.name[5:].isdigit())


def latest_checkpoint(output_dir):
    """Newest step folder a resume can use; incomplete, corrupt or mismatched ones are reported
    and skipped, and a fall-back to an older one is said out loud."""
    for tmp in sorted(Path(output_dir).glob("*.tmp")):
        print(f"ignoring incomplete save {tmp.name} (interrupted while writing; it is replaced by the next save)")
    skipped = []
    for folder in reversed(step_folders(output_dir)):
        problems = resume_problems(folder)
        if not problems:
            if skipped:
                print(f"resuming from {folder.name}, the newest checkpoint that verifies (skipped: {', '.join(skipped)})")
            return folder
        print("skipping checkpoint: " + "; ".join(problems))
        skipped.append(folder.name)
    if skipped:
        print(f"no checkpoint in {output_dir} verifies: starting from step 0 (the damaged ones are replaced as the run passes them)")
    return None


def prune_checkpoints(output_dir, keep_last, step):
    """Delete the oldest step folders beyond keep_last; called only after step `step` is complete.
    Only folders up to `step` count: after a resume fell back past damaged newer folders, those
    are not "the newest" (counting them would delete the good ones); the run replaces each when
    it saves that step again."""
    folders = [f for f in step_folders(output_dir) if int(f.name[5:]) <= step]
    for old in folders[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# Fields whose change makes a resumed run a different experiment: refuse. Anything else
# (max_steps, logging cadence, keep_last, ...) may change and is reported.
FROZEN_ON_RESUME = ("model_dir", "data_dir", "sft_dir", "seed", "max_seq_len", "max_len", "max_prompt_len",
                    "eval_fraction", "subsets", "split", "max_pairs", "eval_pairs", "lora_r", "lora_alpha",
                    "lora_dropout", "lora_targets", "quantize_4bit", "dtype", "optimizer", "micro_batch_size",
                    "grad_accum")


def find_resume(output_dir, cfg):
    """The checkpoint to resume from (or None), its config checked against cfg up front:
    a wrong setting stops the run in the first second, not after loading 13B weights."""
    ckpt = latest_checkpoint(output_dir)
    if ckpt is not None:
        check_resume_config(json.loads((ckpt / "trainer_state.json").read_text())["config"], cfg)
    _run.update(stage=True, checkpoint=ckpt)
    return ckpt


def data_digest(tensors):
    """sha256 of the prepared data itself. Saved in every checkpoint and compared on resume:
    what must not change is the data, not the code that made it (a fixed log line in sft.py
    changes the cache key but not a single token, and must not block a resume)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode() + tensors[k].to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def check_resume_data(ckpt, key):
    """Same settings but different data (a re-downloaded or edited file): continuing would
    mix two datasets under one data position. Refuse, naming both digests."""
    state = json.loads((Path(ckpt) / "trainer_state.json").read_text())
    saved = state.get("data_digest")
    if state.get("world_size", 1) != int(os.environ.get("WORLD_SIZE", 1)):
        print(f"resume: {state.get('world_size', 1)} process(es) wrote this checkpoint, now {os.environ.get('WORLD_SIZE', 1)}: "
              f"same data and gradients, but dropout masks differ from here on (not bit-exact)")
    if saved is not None and saved != key:
        sys.exit(f"cannot resume from {ckpt}: the prepared data changed since it was written "
                 f"(data digest {saved} -> {key}: input files, tokenizer or preparation changed).\n"
                 f"restore the original data, or use a new --output_dir to start a fresh run")


def check_resume_config(saved, cfg):
    now = to_dict(cfg)
    frozen = [k for k in FROZEN_ON_RESUME if k in now and saved.get(k) != now[k]]
    if frozen:
        sys.exit("cannot resume: these settings differ from the checkpoint's and would change the run:\n"
                 + "\n".join(f"  {k}: checkpoint {saved.get(k)!r} -> now {now[k]!r}" for k in frozen)
                 + "\nuse the original values, or a new --output_dir to start a fresh run")
    for k in now:
        if k in saved and saved[k] != now[k]:
            print(f"resume: {k} changed {saved[k]!r} -> {now[k]!r} (allowed)")


# -----------------------------------------------------------------------------
# Ctrl+C / SIGTERM: finish the optimizer step, save, exit. A second Ctrl+C exits at once
# (safe: checkpoints are atomic, so the last complete one is intact).


class StopRequest:
    def __init__(self):
        self.signum = None
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        phase("training")

    def _handle(self, signum, frame):
        if self.signum is not None:
            print(f"\nsecond interrupt: exiting now; {_next_step()}", flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this optimizer step, then saving a checkpoint "
              f"(press Ctrl+C again to quit at once)", flush=True)

    @property
    def requested(self):
        return self.signum is not None

    def exit(self, command):
        print(f"stopped. resume with the same command:\n  {command}", flush=True)
        sys.exit(128 + (self.signum or signal.SIGTERM))  # a rank told by another rank has no signum


# -----------------------------------------------------------------------------
# Logging: one fixed-format line per logged step, and metrics.jsonl for machines.


class MetricLog:
    def __init__(self, output_dir, history=(), write=True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.history, self.write = list(history), write  # write: rank 0 only under NPROC > 1
        # rewrite from the checkpoint's history: lines logged after it (by the run that was
        # interrupted) describe steps that are about to be redone
        if write:
            with writing(self.path):
                self.path.write_text("".join(json.dumps(h) + "\n" for h in self.history))
        self.t0 = time.time()

    def log(self, record):
        self.history.append(record)
        if self.write:
            with writing(self.path), open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def fmt_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def preflight(step, params, cfg, device, what):
    """Run one worst-case micro-step (forward + backward, no optimizer step) before a long GPU
    run and stop, within a minute or two, if the peak would pass cfg.max_vram_gib: an OOM at
    hour 3 of a 30-hour run is the failure this prevents. Nothing of the training run changes:
    the RNG streams are restored and the gradients dropped. The optimizer state, not allocated
    before the first real step, is added by arithmetic (8-bit Adam: 2 bytes per parameter,
    32-bit: 8)."""
    if device.type != "cuda" or cfg.max_vram_gib <= 0:
        return None
    phase("preflight")
    knobs = ("Knobs, cheapest first: --micro_batch_size (more --grad_accum keeps the step size), "
             "--logits_chunk 512, --optimizer paged_adamw_8bit, --max_seq_len / --max_len, --lora_r.")
    tensors, meta = rng_state()
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    try:
        step()
    except torch.OutOfMemoryError:
        sys.exit(f"preflight: the worst-case {what} ran out of GPU memory on this card. " + knobs)
    for p in params:
        p.grad = None
    set_rng_state(tensors, meta)
    n = sum(p.numel() for p in params)
    opt_gib = n * (2 if "8bit" in cfg.optimizer else 8) / 2**30
    # what the card must hold: everything outside PyTorch's allocator (CUDA context, cuBLAS and
    # NCCL workspaces) + the allocator's reserved peak (fragmentation included) + the optimizer state
    free, total = torch.cuda.mem_get_info(device)
    outside = max((total - free) - torch.cuda.memory_reserved(device), 0) / 2**30
    peak = outside + torch.cuda.max_memory_reserved(device) / 2**30 + opt_gib
    budget = min(cfg.max_vram_gib, total / 2**30)
    torch.cuda.reset_peak_memory_stats(device)
    print(f"preflight: worst-case {what}: {peak:.1f} GiB (reserved peak + {outside:.1f} GiB outside torch + "
          f"{opt_gib:.1f} GiB optimizer state) of {budget:.1f} GiB ({time.time() - t0:.0f}s)", flush=True)
    if peak > budget:
        sys.exit(f"preflight: the worst-case step needs {peak:.1f} GiB > {budget:.1f} GiB "
                 f"(max_vram_gib {cfg.max_vram_gib}, card {total / 2**30:.1f} GiB). " + knobs)
    return peak


def memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: peak RSS (KiB on Linux)
    except ImportError:
        return float("nan")


@contextlib.contextmanager
def replacing(path):
    """`with replacing(path) as f:` writes a text file beside path and renames it over path only
    when complete; a failure (a full disk above all) exits with write_error's line and leaves no
    half-written file behind."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")  # per process: launched ranks may write the same file
    with writing(path):
        try:
            with open(tmp, "w") as f:
                yield f
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)


def save_json(path, obj):
    with replacing(path) as f:
        f.write(json.dumps(obj, indent=2))
