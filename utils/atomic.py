"""Write a folder aside, then swap it in: an interrupted save never leaves a half-written adapter or model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def staging_path(path: Path, tag: str = "writing") -> Path:
    """The hidden sibling ``.NAME.TAG`` of ``path`` (same parent, so the final rename stays on one file system)."""
    path = Path(path)
    return path.parent / f".{path.name}.{tag}"


def swap_in(staging: Path, path: Path) -> Path:
    """Replace ``path`` by ``staging``: the old version is moved aside first and deleted only after the rename."""
    staging, path = Path(staging), Path(path)
    old = staging_path(path, "old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists() or path.is_symlink():
        path.rename(old)
    staging.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty hidden sibling folder to write into; it replaces ``path`` only when the block succeeds.

    On any exception (a ``KeyboardInterrupt`` included) the sibling is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(path)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, path)
