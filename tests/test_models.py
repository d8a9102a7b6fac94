"""Hardware report: the precision the chapters train in follows what the GPU computes natively."""

from __future__ import annotations

import pytest
import torch

from utils.models import hardware_report


@pytest.mark.parametrize("native_bf16, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_bf16_only_where_the_gpu_computes_it_natively(monkeypatch: pytest.MonkeyPatch, native_bf16: bool,
                                                       dtype: torch.dtype) -> None:
    """A T4 emulates bf16 (``is_bf16_supported()`` says True), so it must train in fp16 with loss scaling."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0) if native_bf16 else (7, 5))
    hw = hardware_report()
    assert hw.device == "cuda" and hw.bf16 is native_bf16 and hw.dtype == dtype


def test_release_memory_hands_freed_heap_blocks_back_to_the_system() -> None:
    """Activations and logits of a few MB each come from the C library's heap, which keeps them after they are freed:
    the process looks 1.5 GB bigger than what it holds, and the next model may not fit beside it. Run in a fresh
    Python, so that no earlier test's heap is measured."""
    import subprocess
    import sys

    from utils import config

    code = """
import ctypes, ctypes.util, gc, psutil, torch
from utils.models import release_memory
rss = lambda: psutil.Process().memory_info().rss >> 20
big = torch.ones(5_000_000); del big  # freeing a 20 MB mapped block raises glibc's mmap threshold to 20 MB
blocks = [torch.ones(1_000_000) for _ in range(400)]  # 4 MB each, from the heap now
kept = blocks[-1]  # still in use, at the top of the heap: the blocks below it cannot be handed back by themselves
del blocks
gc.collect()
freed = rss()
release_memory()
print(freed, rss(), hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim"))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=config.PROJECT_ROOT,
                          check=True)
    freed, after, trimmed = done.stdout.split()
    if trimmed == "False":  # not glibc (macOS): nothing to hand back this way
        return
    assert int(freed) - int(after) >= 1000, (freed, after)


def test_merges_are_saved_as_a_gpu_run_saves_them(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU run computes in fp32 but saves a merge in its base checkpoint's dtype (bf16 for Phi-3 Mini, fp32 for the
    miniature), so that chapter 07 exports a 16-bit checkpoint as it would after a GPU run; a GPU run saves what it
    computes in."""
    from transformers import Phi3Config

    from utils.models import merge_save_dtype

    for dtype in (torch.bfloat16, torch.float32):
        folder = tmp_path / str(dtype)
        Phi3Config(dtype=dtype).save_pretrained(folder)
        assert merge_save_dtype(hardware_report(), str(folder)) == dtype
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert merge_save_dtype(hardware_report(), str(tmp_path / str(torch.float32))) == torch.float16
