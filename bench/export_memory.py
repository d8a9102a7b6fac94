"""Host RAM of chapter 07's largest step on Phi-3 Mini: the model builder's int4 export of a 16-bit checkpoint.

    .venv/bin/python bench/export_memory.py              # 1- and 2-layer stand-ins, a few minutes on 2 cores
    .venv/bin/python bench/export_memory.py -p int4 fp32
    .venv/bin/python bench/export_memory.py --builder-own     # the builder's own quantization step, for comparison
    .venv/bin/python bench/export_memory.py --full-depth-within 12   # also Phi-3 Mini's size, in 12 GiB (~15 min)

Each export runs in a fresh Python (``utils.deployment.export_onnx``, as the chapter calls it) on the bf16
stand-ins of ``utils/standin.py`` (Phi-3 Mini's width and vocabulary, 1 and 2 decoder layers), and reports that
process's peak resident memory. The peak grows linearly with depth: ``peak(L) = fixed + L * per_layer``, fitted on
L = 1, 2 and extrapolated to Phi-3 Mini's 32 layers. By default the quantization step is
``utils.onnx_quantize``'s, one weight at a time; ``--builder-own`` measures the builder's own step, which keeps the
loaded 16-bit model, serializes the whole graph with its weights in fp32 and then quantizes it.

The resident peak counts the pages of the memory-mapped checkpoint, which the kernel can drop and read again
when memory is short, so it overstates what a machine must have. ``--full-depth-within GIB`` settles it by
trying: it builds a 32-layer stand-in (Phi-3 Mini's size, 7.6 GB in bf16) and exports it in a memory cgroup
limited to GIB, page cache included (the checkpoint's cached pages are dropped first, so that reading it is
charged to the group), as a machine with that much RAM would be (no swap here); it reports whether
the export finished, the group's peak and its OOM kills. That needs write access to the cgroup-v1
memory controller (``/sys/fs/cgroup/memory``), as on this project's build machine.
Writes ``outputs/bench/export_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils import config  # noqa: E402
from utils.standin import build_standin, standin_dir  # noqa: E402

DEPTHS = (1, 2)
REAL_LAYERS = 32
FREE_COLAB_RAM_GIB = 12.7
MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory")

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


def export_within(source: Path, precision: str, limit_gib: float) -> dict:
    """Export ``source`` at ``precision`` in a fresh Python inside a memory cgroup of ``limit_gib``: whether it
    finished, the group's peak (page cache included), its OOM kills, and the wall time."""
    group = MEMORY_CGROUPS / f"phi3-lab-export-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as err:
        raise SystemExit(f"--full-depth-within needs a writable memory cgroup: cannot create {group} "
                         f"({err.strerror}); run it where the cgroup-v1 memory controller is writable") from None
    try:
        limit = str(int(limit_gib * 2**30))
        (group / "memory.limit_in_bytes").write_text(limit)
        if (group / "memory.memsw.limit_in_bytes").exists():  # no escape into swap either
            (group / "memory.memsw.limit_in_bytes").write_text(limit)
        for file in (f for f in source.iterdir() if f.is_file()):  # else pages an earlier step cached count there
            with open(file, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with tempfile.TemporaryDirectory() as scratch:
            start = time.perf_counter()
            result = subprocess.run(["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"),
                                     sys.executable, "-c", CHILD, str(source), str(Path(scratch) / "onnx"),
                                     precision, str(config.PROJECT_ROOT), "1"], capture_output=True, text=True)
            seconds = time.perf_counter() - start
        oom = (group / "memory.oom_control").read_text()
        return {"limit_gib": limit_gib, "finished": result.returncode == 0, "returncode": result.returncode,
                "group_peak_mib": int((group / "memory.max_usage_in_bytes").read_text()) // 2**20,
                "oom_kills": int(next((l.split()[1] for l in oom.splitlines() if l.startswith("oom_kill ")), "0")),
                "process_peak_mib": [int(v) for v in result.stdout.split()[-2:]] if result.returncode == 0 else None,
                "seconds": round(seconds), "stderr_tail": result.stderr[-500:] if result.returncode else ""}
    finally:
        group.rmdir()


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
    parser.add_argument("--full-depth-within", type=float, metavar="GIB",
                        help="also export a 32-layer stand-in inside a memory cgroup of GIB and report if it finishes")
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
        if args.full_depth_within:
            source = standin_dir(REAL_LAYERS)
            if not (source / "config.json").is_file():
                print(f"building the {REAL_LAYERS}-layer stand-in (7.6 GB) ...", flush=True)
                build_standin(source, REAL_LAYERS)
            within = export_within(source, precision, args.full_depth_within)
            rows[precision]["full_depth"] = within
            print(f"{precision} export of the {REAL_LAYERS}-layer stand-in within {args.full_depth_within} GiB: "
                  f"{'finished' if within['finished'] else 'FAILED (exit ' + str(within['returncode']) + ')'} in "
                  f"{within['seconds']} s, group peak {within['group_peak_mib']:,} MiB (page cache included), "
                  f"{within['oom_kills']} OOM kills; process peak resident / "
                  f"allocated {within['process_peak_mib']} MiB", flush=True)
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
