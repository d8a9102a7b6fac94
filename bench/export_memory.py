"""Host RAM of chapter 07's largest step on Phi-3 Mini: the model builder's int4 export of a 16-bit checkpoint.

    .venv/bin/python bench/export_memory.py              # 1- and 2-layer stand-ins, a few minutes on 2 cores
    .venv/bin/python bench/export_memory.py -p int4 fp32
    .venv/bin/python bench/export_memory.py --builder-own     # the builder's own quantization step, for comparison

Each export runs in a fresh Python (``utils.deployment.export_onnx``, as the chapter calls it) on the bf16
stand-ins of ``utils/standin.py`` (Phi-3 Mini's width and vocabulary, 1 and 2 decoder layers), and reports that
process's peak resident memory. The peak grows linearly with depth: ``peak(L) = fixed + L * per_layer``, fitted on
L = 1, 2 and extrapolated to Phi-3 Mini's 32 layers. By default the quantization step is
``utils.onnx_quantize``'s, one weight at a time; ``--builder-own`` measures the builder's own step, which keeps the
loaded 16-bit model, serializes the whole graph with its weights in fp32 and then quantizes it.
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
import re, resource, sys, threading, time
sys.path.insert(0, sys.argv[4])
from utils.deployment import export_onnx
anon = [0]
def sample():  # RssAnon: memory the process allocated, without the file pages it maps (safetensors weights)
    while True:
        status = open("/proc/self/status").read()
        anon[0] = max(anon[0], int(re.search(r"RssAnon:\\s+(\\d+)", status).group(1)))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
export_onnx(sys.argv[1], sys.argv[2], sys.argv[3], one_weight_at_a_time=sys.argv[5] == "1")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, anon[0] // 1024)
"""


def export_peak_mib(source: Path, precision: str, one_weight_at_a_time: bool = True) -> tuple[int, int]:
    """Peak resident and peak allocated memory (MiB) of a fresh Python exporting ``source`` at ``precision``."""
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run([sys.executable, "-c", CHILD, str(source), str(Path(scratch) / "onnx"), precision,
                                 str(config.PROJECT_ROOT), "1" if one_weight_at_a_time else "0"],
                                capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the {precision} export of {source} failed:\n{result.stderr[-2000:]}")
    resident, allocated = result.stdout.strip().splitlines()[-1].split()
    return int(resident), int(allocated)


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
    parser.add_argument("--builder-own", action="store_true",
                        help="the builder's own quantization step (the whole graph in fp32), not one weight at a time")
    args = parser.parse_args()
    step = "the builder's own" if args.builder_own else "one weight at a time"
    rows = {}
    for precision in args.precisions:
        resident, allocated = {}, {}
        for layers in DEPTHS:
            source = standin_dir(layers)
            if not (source / "config.json").is_file():
                build_standin(source, layers)
            resident[layers], allocated[layers] = export_peak_mib(source, precision, not args.builder_own)
            print(f"{precision} export ({step}), {layers}-layer stand-in: peak {resident[layers]:,} MiB resident, "
                  f"{allocated[layers]:,} MiB allocated", flush=True)
        rows[precision] = {"quantization": step, "measured_mib": resident, **extrapolate(resident),
                           "allocated": {"measured_mib": allocated, **extrapolate(allocated)}}
        gib = rows[precision]["phi3_mini_gib"]
        fits = "fits" if gib <= FREE_COLAB_RAM_GIB else "does not fit"
        print(f"{precision}: {rows[precision]['per_layer_mib']} MiB per layer -> Phi-3 Mini about {gib} GiB of host "
              f"RAM resident ({fits} a free Colab's {FREE_COLAB_RAM_GIB} GiB), "
              f"{rows[precision]['allocated']['phi3_mini_gib']} GiB allocated (without the mapped weight files)")
    out = config.outputs_dir() / "bench" / ("export_memory_builder_own.json" if args.builder_own
                                            else "export_memory.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python bench/export_memory.py", *sys.argv[1:]]),
                               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "depths": DEPTHS, "exports": rows}, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
