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



# `make test` runs pytest with pytest-xdist (`-n 2`): the notebooks must still run one after another in collection
# order in one kernel-per-notebook chain (each chapter reads what the earlier ones wrote under outputs/), so they are
# one unit of work that a single worker runs, queued first because it is the longest; the other worker takes the unit
# tests meanwhile, and both share what is left at the end. A plain `pytest` (no -n) runs everything in one process.
NOTEBOOKS_UNIT = "notebooks, in order"


def _is_notebook(nodeid: str) -> bool:
    return ".ipynb::" in nodeid


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: the notebooks first in the queue
        items[:] = sorted(items, key=lambda item: not _is_notebook(item.nodeid))  # stable: order kept within each


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's scheduler by scope, with every notebook cell in one scope and each other test in its own."""
    from xdist.scheduler import LoadScopeScheduling

    class NotebooksInOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return NOTEBOOKS_UNIT if _is_notebook(nodeid) else nodeid

    return NotebooksInOneWorker(config, log)
