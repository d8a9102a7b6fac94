"""Each chapter's peak memory on Phi-3 Mini, estimated from stand-ins of two depths, and the smallest GPU it fits.

    .venv/bin/python bench/memory_by_depth.py            # runs the series on 1- and 2-layer stand-ins (~40 min)
    .venv/bin/python bench/memory_by_depth.py --reuse    # only recompute from runs already under outputs/real-shape/
    .venv/bin/python bench/memory_by_depth.py --only 03  # re-measure chapter 03 at both depths, keep the others

Phi-3 Mini cannot be downloaded here, and no GPU is at hand, so this measures what can be measured: the series runs
(``scripts/smoke_real_shape.py``: short run, real batch sizes) on stand-ins with Phi-3 Mini's exact width,
vocabulary and tokenizer layout but 1 and 2 decoder layers, and ``scripts/run_series.py`` reports each chapter's
peak memory, cell by cell. Everything that grows with depth (weights, gradients, optimizer state, activations, KV
cache) grows linearly in the number of layers, so per chapter

    peak(L) = fixed + L * per_layer,   fitted on L = 1, 2,   extrapolated to L = 32.

The peak fitted is the kernel's resident peak, exact per cell. It is pessimistic for a GPU: it also counts the
page cache of a memory-mapped checkpoint while a CPU run casts it to fp32. The kernel's *allocated* memory
(anonymous pages, sampled every 0.05 s) leaves that out but also leaves out a model read in place from an fp32
checkpoint, which a GPU would hold; it is fitted too and kept in the JSON (``allocated_*``) and in the table's
brackets. Runs recorded before the allocated peak existed have only the resident one.

That is the chapter's peak on a CPU in fp32. On a GPU the chapters load the model in bf16 (fp16 on a T4): the
estimate halves everything above the process's baseline (the Python, torch and library code, measured as the peak
of chapter 01, which loads no model), and adds 1 GiB for the CUDA context and the allocator's slack. 4-bit weights
do not halve, so chapter 04's estimate is low by about 0.9 GiB per 4-bit model it holds. A GPU run of
``bench/gpu_shape.py`` and chapters 03-04 replaces these estimates by measurements where one is lent.

Chapter 07 runs the model builder, ONNX Runtime and llama.cpp on the CPU on any machine. Its cells that load a
transformers model (``load_model(``) give its GPU estimate; its other cells give the host RAM a GPU run needs
(``host_ram_gib``, the same resident peak, extrapolated the same way), which must stay within a free Colab's RAM.
Writes ``outputs/bench/memory_by_depth.json`` and prints a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils import config  # noqa: E402

DEPTHS = (1, 2)
REAL_LAYERS = 32
CUDA_OVERHEAD_MIB = 1024
GPUS = [("Colab T4", 15), ("L4", 24), ("A100 40 GB", 40), ("A100 80 GB", 80)]  # usable GiB as sold
HOST_RAM_CHAPTERS = {"07_deployment"}  # exports and runs ONNX and GGUF models on the CPU, whatever the hardware
TRANSFORMERS_CELL = "load_model("  # a cell that loads a transformers model, which a GPU run holds on the GPU
FREE_COLAB_HOST_GIB = 12  # of the 12.7 GiB a free Colab has, leaving room for the system


def chapter_peaks(layers: int, reuse: bool, only: list[str], allocated: bool = False) -> dict[str, int]:
    """``{chapter: peak MiB}`` of the series on the ``layers``-layer stand-in, resident (with ``allocated``, the
    allocated peak where the run recorded one): run now unless ``reuse``; with ``only``, those chapters are run
    again and replace their entries in the earlier run's report."""
    report = config.outputs_dir() / "real-shape" / f"{layers}-layers" / "run_times.json"
    earlier = json.loads(report.read_text()) if only else None
    if not reuse:
        # Chapter 08 resumes its grid from finished runs; a resumed grid trains nothing, so its peak says nothing.
        if not only or "08" in only:
            shutil.rmtree(report.parent / "experiments", ignore_errors=True)
        subprocess.run([sys.executable, str(config.PROJECT_ROOT / "scripts" / "smoke_real_shape.py"),
                        "--layers", str(layers), *(["--only", *only] if only else [])], check=True)
    chapters = json.loads(report.read_text())["chapters"]
    if earlier is not None:
        again = {c["notebook"]: c for c in chapters}
        chapters = [again.get(c["notebook"], c) for c in earlier["chapters"]]
        report.write_text(json.dumps({**earlier, "chapters": chapters}, indent=2))
    key = lambda peak: peak.get("anon_mib", peak["process_mib"]) if allocated else peak["process_mib"]  # noqa: E731
    return {c["notebook"].removesuffix(".ipynb"): key(c["peak_memory_mib"]) for c in chapters}


def peak_cells(key: str = "peak_mib", where: Callable[[dict], bool] | None = None) -> dict[str, dict]:
    """Per chapter, the cell whose resident peak is largest at 32 layers, read off the line through its peaks at the
    two depths: the step that sets the chapter's peak on Phi-3 Mini (index, first line, its peaks at 1 and 2 layers,
    MiB). ``key="anon_peak_mib"``: the same for the allocated peak; ``where``: among the cells it accepts (a cell's
    record, with its ``source``). Chapters run before per-cell peaks were recorded are left out."""
    shallow, deep = ({c["notebook"].removesuffix(".ipynb"): c for c in json.loads(
        (config.outputs_dir() / "real-shape" / f"{layers}-layers" / "run_times.json").read_text())["chapters"]}
        for layers in DEPTHS)
    found = {}
    for chapter in shallow.keys() & deep.keys():
        first, second = ({c["cell"]: c[key] for c in run[chapter]["cells"] if key in c and (where is None or where(c))}
                         for run in (shallow, deep))
        cells = first.keys() & second.keys()
        if not cells:
            continue
        per_layer = {i: (second[i] - first[i]) / (DEPTHS[1] - DEPTHS[0]) for i in cells}
        cell = max(cells, key=lambda i: first[i] + (REAL_LAYERS - DEPTHS[0]) * per_layer[i])
        starts = next(c["starts"] for c in deep[chapter]["cells"] if c["cell"] == cell)
        found[chapter] = {"cell": cell, "starts": starts, "peaks_mib": [first[cell], second[cell]]}
    return found


def at_32_layers(line: tuple[int, int] | list[int]) -> float:
    """The peak (MiB) at Phi-3 Mini's 32 layers on the line through the peaks at the two depths."""
    return line[0] + (REAL_LAYERS - DEPTHS[0]) * (line[1] - line[0]) / (DEPTHS[1] - DEPTHS[0])


def gpu_estimate_mib(cpu_fp32_mib: float, baseline_mib: float) -> float:
    """The 16-bit GPU estimate of a CPU fp32 peak: half of what lies above the process's baseline, plus CUDA's."""
    return max(cpu_fp32_mib - baseline_mib, 0) / 2 + CUDA_OVERHEAD_MIB


def cells_by_device(key: str = "peak_mib") -> dict[str, dict[str, dict]]:
    """For each chapter of ``HOST_RAM_CHAPTERS``: ``{"gpu": cell, "cpu": cell}`` (as :func:`peak_cells` finds them).
    Its cells that load a transformers model give the GPU estimate, since a GPU run holds that model on the GPU; the
    others run on the CPU whatever the hardware (the builder, ONNX Runtime, llama.cpp) and give the host RAM a GPU
    run needs, measured on the stand-in like every peak here."""
    on_gpu = peak_cells(key, where=lambda cell: TRANSFORMERS_CELL in cell.get("source", ""))
    on_cpu = peak_cells(key, where=lambda cell: TRANSFORMERS_CELL not in cell.get("source", ""))
    return {chapter: {"gpu": on_gpu[chapter], "cpu": on_cpu[chapter]}
            for chapter in HOST_RAM_CHAPTERS if chapter in on_gpu and chapter in on_cpu}


def smallest_gpu(gib: float) -> str:
    """The first GPU in ``GPUS`` whose memory holds ``gib``."""
    return next((name for name, size in GPUS if gib <= size), "more than 80 GB")


def estimate(peaks: dict[int, dict[str, int]], cell_lines: dict[str, list[int]] | None = None,
             by_device: dict[str, dict[str, dict]] | None = None) -> list[dict]:
    """Per chapter: the fit, the 32-layer fp32 extrapolation and the 16-bit GPU estimate (MiB and GiB).

    ``cell_lines`` gives, per chapter, the peaks at the two depths of the cell largest at 32 layers
    (:func:`peak_cells`). Where another cell sets the chapter's peak at 1 layer than at 2, the line through the
    chapter's peaks joins two different steps and runs below that cell's own line; the higher line is used.
    ``by_device`` (:func:`cells_by_device`): for a chapter whose other cells run on the CPU on any machine, the GPU
    estimate comes from its transformers cells alone, and ``host_ram_gib`` from the others."""
    (l1, p1), (l2, p2) = sorted(peaks.items())
    baseline = min(p1["01_data_preparation"], p2["01_data_preparation"])
    rows = []
    for chapter in p2:
        lines = [(p1[chapter], p2[chapter]), *([tuple(cell_lines[chapter])] if chapter in (cell_lines or {}) else [])]
        low, high = max(lines, key=at_32_layers)
        per_layer = (high - low) / (l2 - l1)
        fixed = low - l1 * per_layer
        cpu = fixed + REAL_LAYERS * per_layer
        gpu = gpu_estimate_mib(cpu, baseline)
        row = {"chapter": chapter, **{f"measured_{l}_layers_mib": p[chapter] for l, p in peaks.items()},
               "per_layer_mib": round(per_layer), "fixed_mib": round(fixed),
               "cpu_fp32_32_layers_gib": round(cpu / 1024, 1), "gpu_16bit_gib": round(gpu / 1024, 1),
               "smallest_gpu": smallest_gpu(gpu / 1024)}
        if chapter in (by_device or {}):
            gpu_cell, cpu_cell = by_device[chapter]["gpu"], by_device[chapter]["cpu"]
            gpu = gpu_estimate_mib(at_32_layers(gpu_cell["peaks_mib"]), baseline) / 1024
            host = at_32_layers(cpu_cell["peaks_mib"]) / 1024
            smallest = smallest_gpu(gpu)
            if host > FREE_COLAB_HOST_GIB and smallest == GPUS[0][0]:
                smallest = f"{GPUS[1][0]} (a free Colab has too little RAM)"
            row.update({"gpu_cell": gpu_cell, "gpu_16bit_gib": round(gpu, 1), "host_ram_cell": cpu_cell,
                        "host_ram_gib": round(host, 1), "smallest_gpu": smallest})
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """The README's table."""
    lines = ["| chapter | resident peak, 1 / 2 layers (CPU, fp32; allocated) | per layer | "
             "Phi-3 Mini, CPU fp32 (allocated) | Phi-3 Mini, GPU 16-bit (est.) | smallest GPU |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        gpu, smallest = f"{r['gpu_16bit_gib']} GiB", r["smallest_gpu"]
        if "host_ram_gib" in r:  # the builder, ONNX Runtime and llama.cpp run on the CPU on any machine
            gpu += f"; host RAM {r['host_ram_gib']} GiB"
        allocated = allocated_32 = ""
        if "allocated_measured_1_layers_mib" in r:
            allocated = (f" ({r['allocated_measured_1_layers_mib'] / 1024:.1f} / "
                         f"{r['allocated_measured_2_layers_mib'] / 1024:.1f})")
            allocated_32 = f" ({r['allocated_cpu_fp32_32_layers_gib']} GiB)"
        lines.append(f"| {r['chapter']} | {r['measured_1_layers_mib'] / 1024:.1f} / "
                     f"{r['measured_2_layers_mib'] / 1024:.1f} GiB{allocated} | {r['per_layer_mib']} MiB | "
                     f"{r['cpu_fp32_32_layers_gib']} GiB{allocated_32} | {gpu} | {smallest} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="use the runs already under outputs/real-shape/")
    parser.add_argument("--only", nargs="*", default=[],
                        help="re-measure these chapters (e.g. 03 after changing it), keep the others' earlier runs")
    args = parser.parse_args()
    peaks = {layers: chapter_peaks(layers, args.reuse, args.only) for layers in DEPTHS}
    cells = peak_cells()
    rows = estimate(peaks, {chapter: found["peaks_mib"] for chapter, found in cells.items()}, cells_by_device())
    allocated_lines = {chapter: found["peaks_mib"] for chapter, found in peak_cells("anon_peak_mib").items()}
    allocated = {r["chapter"]: r for r in estimate({l: chapter_peaks(l, True, [], allocated=True) for l in DEPTHS},
                                                   allocated_lines,
                                                   cells_by_device("anon_peak_mib"))}
    for row in rows:
        row.update({f"allocated_{k}": v for k, v in allocated[row["chapter"]].items() if k != "chapter"})
        if row["chapter"] in cells:
            row["peak_cell"] = cells[row["chapter"]]
    out = config.outputs_dir() / "bench" / "memory_by_depth.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python bench/memory_by_depth.py", "depths": DEPTHS,
                               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "cuda_overhead_mib": CUDA_OVERHEAD_MIB, "chapters": rows}, indent=2) + "\n")
    print(markdown(rows))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
