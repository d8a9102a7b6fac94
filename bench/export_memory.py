"""Host RAM of chapter 07's largest step on Phi-3 Mini: the model builder's int4 export of a 16-bit checkpoint.

    .venv/bin/python bench/export_memory.py              # 1- and 2-layer stand-ins, a few minutes on 2 cores
    .venv/bin/python bench/export_memory.py -p int4 fp32

Each export runs in a fresh Python (``utils.deployment.export_onnx``, as the chapter calls it) on the bf16
stand-ins of ``utils/standin.py`` (Phi-3 Mini's width and vocabulary, 1 and 2 decoder layers), and reports that
process's peak resident memory. The builder keeps the loaded 16-bit model, serializes the whole graph with its
weights in the graph's float type (fp32 for a CPU export) and then quantizes it, so the peak grows linearly with
depth: ``peak(L) = fixed + L * per_layer``, fitted on L = 1, 2 and extrapolated to Phi-3 Mini's 32 layers.
Writes ``outputs/bench/export_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils import config  # noqa: E402
from utils.standin import build_standin, standin_dir  # noqa: E402

DEPTHS = (1, 2)
REAL_LAYERS = 32
FREE_COLAB_RAM_GIB = 12.7

CHILD = """
import resource, sys
sys.path.insert(0, sys.argv[4])
from utils.deployment import export_onnx
export_onnx(sys.argv[1], sys.argv[2], sys.argv[3])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def export_peak_mib(source: Path, precision: str) -> int:
    """Peak resident memory (MiB) of a fresh Python that exports ``source`` at ``precision`` with the builder."""
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run([sys.executable, "-c", CHILD, str(source), str(Path(scratch) / "onnx"), precision,
                                 str(config.PROJECT_ROOT)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the {precision} export of {source} failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.strip().splitlines()[-1])


def extrapolate(peaks: dict[int, int]) -> dict[str, float]:
    """The linear fit of ``{layers: peak MiB}`` on two depths, and its value at 32 layers in GiB."""
    (l1, p1), (l2, p2) = sorted(peaks.items())
    per_layer = (p2 - p1) / (l2 - l1)
    fixed = p1 - l1 * per_layer
    return {"per_layer_mib": round(per_layer), "fixed_mib": round(fixed),
            "phi3_mini_gib": round((fixed + REAL_LAYERS * per_layer) / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--precisions", nargs="+", default=["int4"], help="builder precisions to measure")
    args = parser.parse_args()
    rows = {}
    for precision in args.precisions:
        peaks = {}
        for layers in DEPTHS:
            source = standin_dir(layers)
            if not (source / "config.json").is_file():
                build_standin(source, layers)
            peaks[layers] = export_peak_mib(source, precision)
            print(f"{precision} export, {layers}-layer stand-in: peak {peaks[layers]:,} MiB", flush=True)
        rows[precision] = {"measured_mib": peaks, **extrapolate(peaks)}
        fits = "fits" if rows[precision]["phi3_mini_gib"] <= FREE_COLAB_RAM_GIB else "does not fit"
        print(f"{precision}: {rows[precision]['per_layer_mib']} MiB per layer -> Phi-3 Mini about "
              f"{rows[precision]['phi3_mini_gib']} GiB of host RAM ({fits} a free Colab's {FREE_COLAB_RAM_GIB} GiB)")
    out = config.outputs_dir() / "bench" / "export_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python bench/export_memory.py", *sys.argv[1:]]),
                               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "depths": DEPTHS, "exports": rows}, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
