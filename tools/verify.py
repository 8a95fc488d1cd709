"""
Check the folder against its manifest before training: every downloaded (or generated) file
is there, whole, and the one that was recorded. Offline; run automatically by `make train`.

    python tools/verify.py                    # fast: each file exists with its recorded size (seconds)
    python tools/verify.py --full             # also the sha256 of every file (~2 min for 26 GB)
    python tools/verify.py --manifest data/demo/manifest.json   # the demo's generated assets

A problem is reported per file, with the command that repairs just that file; the exit code
is 1 if anything is wrong. The root manifest.json (written by download.py) must also cover
every file config.py pins, at the pinned revision: a pin changed in config.py after the
download is caught here, not 20 hours into training.

Like download.py, this does not import qlora/ or torch: it must run in a second.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as tools/x.py: config.py and qlora/ live at the root

import argparse
import json

import config

parser = argparse.ArgumentParser(description="Check models/, data/ and wheels/ against the manifest (offline).")
parser.add_argument("--manifest", default="manifest.json", help="manifest to check, relative to --root")
parser.add_argument("--root", default=str(config.ROOT), help="folder the manifest's paths are relative to")
parser.add_argument("--full", action="store_true", help="hash every file too (slow), not only sizes")
args = parser.parse_args()

root = Path(args.root).resolve()
manifest_path = root / args.manifest
if not manifest_path.is_file():
    fix = "make demo-assets" if "demo" in args.manifest else "make download-datasets-and-models"
    sys.exit(f"verify: no {args.manifest} under {root}: nothing to check against. Create it with: {fix}")
try:
    entries = json.loads(manifest_path.read_text())["files"]
except (ValueError, KeyError, TypeError) as e:
    sys.exit(f"verify: {manifest_path} is unreadable ({e}); re-create it with: make download-datasets-and-models")


def repair_command(entry):
    """The smallest command that brings back exactly this file."""
    kind = entry.get("repo_type")
    if kind == "wheel":
        return "python download.py --only wheels"
    if kind == "generated":
        return "make clean-demo && make demo-assets"
    return f"python download.py --files {entry['path']}"


problems, total = [], 0
for e in entries:
    path = root / e["path"]
    if not path.is_file():
        problems.append((e, "missing"))
        continue
    size = path.stat().st_size
    total += size
    if size != e["size"]:
        problems.append((e, f"size {size:,} bytes, manifest says {e['size']:,} (truncated or replaced)"))
    elif args.full and config.sha256_file(path) != e["sha256"]:
        problems.append((e, f"sha256 differs from the manifest ({e['sha256'][:16]}...): corrupted"))

# The download manifest must cover what config.py pins today, at today's revision.
if manifest_path == root / "manifest.json":
    recorded = {e["path"]: e for e in entries}
    for key, src in config.SOURCES.items():
        for name in src.files:
            rel = f"{src.local_dir}/{name}"
            e = recorded.get(rel)
            if e is None:
                problems.append(({"path": rel}, f"pinned in config.py ({key}) but never downloaded"))
            elif e.get("revision") != src.revision:
                problems.append(({"path": rel}, f"downloaded at revision {e.get('revision', '?')[:12]}, "
                                                f"config.py pins {src.revision[:12]}"))

if problems:
    print(f"verify: {len(problems)} problem(s) in {root} against {args.manifest}:")
    for e, why in problems:
        print(f"  {e['path']}: {why}\n    repair: {repair_command(e)}")
    sys.exit(1)
print(f"verify: ok, {len(entries)} files ({total / 1e9:.2f} GB) match {args.manifest}"
      f" ({'sizes and sha256' if args.full else 'sizes; --full also hashes'})")
