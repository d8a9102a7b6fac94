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
