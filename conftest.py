"""How `make test` shares the notebooks and the unit tests between pytest-xdist workers (``pytest -n 2``).

The chapters run one after another, on one worker, in collection order: each reads what the earlier ones wrote under
outputs/. They are one unit of work, queued first because it is the longest; another worker takes the unit tests
meanwhile. The solutions come last in the queue, one unit each, for whichever worker is free, and wait until the
chapters are done (they read the chapters' results, and no solution should see a chapter half-run). A plain
``pytest`` (no ``-n``) runs everything in one process in collection order, as before.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

SYNC = "PHI3_LAB_TEST_SYNC"  # a folder that the workers share: one file per chapter notebook that has finished
CHAPTERS_UNIT = "chapters, in order"
WAIT_LIMIT_S = 3 * 3600


def _kind(nodeid: str) -> str:
    """'chapter', 'solution' or 'unit' for a test id (nbval's ids are ``notebooks/NN_x.ipynb::Cell N``)."""
    if ".ipynb::" not in nodeid:
        return "unit"
    return "solution" if "/solutions/" in nodeid.split("::")[0] else "chapter"


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput") and SYNC not in os.environ:
        os.environ[SYNC] = tempfile.mkdtemp(prefix="phi3-lab-test-sync-")  # the workers inherit it


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hasattr(config, "workerinput"):  # the queue: chapters, unit tests, solutions (order kept within each)
        rank = {"chapter": 0, "unit": 1, "solution": 2}
        items[:] = sorted(items, key=lambda item: rank[_kind(item.nodeid)])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's scheduling by scope: all chapter cells one scope, each solution notebook one, each other test one."""
    from xdist.scheduler import LoadScopeScheduling

    class ChaptersInOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            kind = _kind(nodeid)
            return CHAPTERS_UNIT if kind == "chapter" else nodeid.split("::")[0] if kind == "solution" else nodeid

    return ChaptersInOneWorker(config, log)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    sync = os.environ.get(SYNC)
    if sync and _kind(item.nodeid) == "chapter" and (nextitem is None or nextitem.path != item.path):
        (Path(sync) / item.path.name).touch()  # this chapter's last cell has run (passed or not)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A solution notebook's first cell waits (before its kernel starts) until every chapter of this run has run."""
    sync = os.environ.get(SYNC)
    if not sync or _kind(item.nodeid) != "solution" or getattr(item.parent, "_phi3_waited", False):
        return
    chapters = {i.path.name for i in item.session.items if _kind(i.nodeid) == "chapter"}
    started = time.monotonic()
    while not all((Path(sync) / name).exists() for name in chapters):
        if time.monotonic() - started > WAIT_LIMIT_S:
            pytest.fail(f"{item.path.name} waited {WAIT_LIMIT_S} s for the chapters to finish on another worker")
        time.sleep(1)
    item.parent._phi3_waited = True


def pytest_unconfigure(config: pytest.Config) -> None:
    sync = os.environ.get(SYNC)
    if sync and not hasattr(config, "workerinput") and Path(sync).name.startswith("phi3-lab-test-sync-"):
        shutil.rmtree(sync, ignore_errors=True)
