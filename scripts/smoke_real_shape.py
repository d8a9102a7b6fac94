"""Run every chapter on a Phi-3-Mini-shaped stand-in, as a GPU user's ``PHI3_MODEL_ID`` run would, but short.

    python scripts/smoke_real_shape.py                 # 2-layer stand-in, 2 steps, 8 held-out conversations
    python scripts/smoke_real_shape.py --layers 1      # bench/memory_by_depth.py uses two depths

It builds the stand-in (``utils/standin.py``: Phi-3-mini-4k-instruct's shape, tokenizer layout and chat template,
random weights) unless it exists, then executes chapters 00-09 with

    PHI3_MODEL_ID=<the stand-in's folder>  PHI3_LAB_MAX_STEPS=2  PHI3_LAB_HELDOUT=8

into ``OUTPUTS/real-shape/<N>-layers/`` (the miniature's outputs are not touched), and prints each chapter's time
and peak memory. The numbers the chapters print are those of a random model after two steps: they show that the
path runs, not what it learns. ``tests/test_real_shape.py`` runs this in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils import config  # noqa: E402
from utils.standin import build_standin, standin_dir  # noqa: E402

SHORT_RUN = {"PHI3_LAB_MAX_STEPS": "2", "PHI3_LAB_HELDOUT": "8"}


def run(layers: int, only: list[str], short_run: dict[str, str]) -> dict:
    """Build the stand-in if needed, run the chapters on it; returns ``run_times.json`` (raises on a failure)."""
    model = standin_dir(layers)
    if not all((model / name).is_file() for name in ("config.json", "tokenizer.model")):  # older builds: no .model
        print(f"building the {layers}-layer stand-in into {model} ...", flush=True)
        build_standin(model, layers)
    outputs = config.outputs_dir() / "real-shape" / f"{layers}-layers"
    env = {**os.environ, **short_run, "PHI3_MODEL_ID": str(model), "PHI3_LAB_OUTPUTS": str(outputs),
           "PHI3_LAB_EXPERIMENTS": "reduced"}
    command = [sys.executable, str(config.PROJECT_ROOT / "scripts" / "run_series.py"),
               *(["--only", *only] if only else [])]
    subprocess.run(command, env=env, check=True)
    return json.loads((outputs / "run_times.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the stand-in (Phi-3 Mini: 32)")
    parser.add_argument("--only", nargs="*", default=[], help="chapter numbers, e.g. 03 04 (default: all)")
    args = parser.parse_args(argv)
    try:
        report = run(args.layers, args.only, SHORT_RUN)
    except subprocess.CalledProcessError as err:
        print(f"a chapter failed on the {args.layers}-layer stand-in (exit {err.returncode}); see above")
        return 1
    print(f"\n{args.layers}-layer stand-in, {' '.join(f'{k}={v}' for k, v in SHORT_RUN.items())}:")
    for chapter in report["chapters"]:
        peak = chapter["peak_memory_mib"]
        print(f"  {chapter['notebook']:<36} {chapter['seconds']:7.1f} s   peak {peak['process_mib']:>7,} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
