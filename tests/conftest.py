"""Shared fixtures: a tiny, quickly pre-trained miniature Phi-3 built into a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from utils.miniature import TINY_SPEC, build_miniature


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small miniature saved with ``save_pretrained`` (built once per test session)."""
    path = tmp_path_factory.mktemp("tiny") / "phi3-miniature"
    build_miniature(path, TINY_SPEC, progress=False)
    return path


@pytest.fixture()
def outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the config's output folder at a temporary directory for one test."""
    monkeypatch.setenv("PHI3_LAB_OUTPUTS", str(tmp_path / "outputs"))
    return tmp_path / "outputs"
