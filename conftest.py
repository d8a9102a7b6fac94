"""How `make test` shares the notebooks and the unit tests between pytest-xdist workers (``pytest -n 2``).

Most chapters run one after another, on one worker, in order: each reads what the earlier ones wrote under outputs/.
Chapters 08 and 09 read only chapter 01's results (``scripts/bootstrap_cell.py``'s ``READS``) and no chapter reads
theirs, so they are a second chain, queued next, for the other worker: it waits for chapter 01, runs them, then the
unit tests. The solutions come last in the queue, one unit each, for whichever worker is free; each waits until
its own chapter and the earlier ones are done (it reads their results, and no notebook should see a chapter
half-run). The queue keeps this order (xdist's reordering by size is off). A plain ``pytest`` (no ``-n``) runs
everything in one process in collection order, as before.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

SYNC = "PHI3_LAB_TEST_SYNC"  # a folder that the workers share: one file per chapter notebook that has finished
CHAPTERS_UNIT = "chapters, in order"
SIDE_CHAPTERS = ("08", "09")
SIDE_UNIT = "chapters 08-09, after 01"
CHAPTER_KINDS = ("chapter", "side chapter")
WAIT_LIMIT_S = 3 * 3600


def _reads() -> dict[str, list[str]]:
    """What each chapter reads from earlier chapters (``READS`` in scripts/bootstrap_cell.py)."""
    path = Path(__file__).parent / "scripts" / "bootstrap_cell.py"
    spec = importlib.util.spec_from_file_location("bootstrap_cell", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.READS


READS = _reads()
_outside = {(chapter, side) for chapter, reads in READS.items() for side in SIDE_CHAPTERS
            if side in reads and chapter not in SIDE_CHAPTERS}
assert not _outside, f"a chapter reads a side-chain chapter's results, so they cannot run beside it: {_outside}"


def _kind(nodeid: str) -> str:
    """'chapter', 'side chapter', 'solution' or 'unit' for a test id (nbval's: ``notebooks/NN_x.ipynb::Cell N``)."""
    if ".ipynb::" not in nodeid:
        return "unit"
    path = nodeid.split("::")[0]
    if "/solutions/" in path:
        return "solution"
    return "side chapter" if Path(path).name[:2] in SIDE_CHAPTERS else "chapter"


def _wait_for(item: pytest.Item, chapters: set[str]) -> None:
    """Block until each of ``chapters`` (notebook file names) has run in this session, if it is part of it."""
    sync = os.environ[SYNC]
    started = time.monotonic()
    while not all((Path(sync) / name).exists() for name in chapters):
        if time.monotonic() - started > WAIT_LIMIT_S:
            pytest.fail(f"{item.path.name} waited {WAIT_LIMIT_S} s for chapters {sorted(chapters)} on another worker")
        time.sleep(1)


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput") and SYNC not in os.environ:
        os.environ[SYNC] = tempfile.mkdtemp(prefix="phi3-lab-test-sync-")  # the workers inherit it


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hasattr(config, "workerinput"):  # the queue: chapters, chapters 08-09, unit tests, solutions (order kept)
        rank = {"chapter": 0, "side chapter": 1, "unit": 2, "solution": 3}
        items[:] = sorted(items, key=lambda item: rank[_kind(item.nodeid)])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's scheduling by scope, in queue order: the main chain of chapters one scope, chapters 08-09 one, each
    solution notebook one, each other test one."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # xdist would queue the scopes by size: keep the order above

    class ChaptersInOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            kind = _kind(nodeid)
            if kind in CHAPTER_KINDS:
                return CHAPTERS_UNIT if kind == "chapter" else SIDE_UNIT
            return nodeid.split("::")[0] if kind == "solution" else nodeid

    return ChaptersInOneWorker(config, log)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    sync = os.environ.get(SYNC)
    if sync and _kind(item.nodeid) in CHAPTER_KINDS and (nextitem is None or nextitem.path != item.path):
        (Path(sync) / item.path.name).touch()  # this chapter's last cell has run (passed or not)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before a notebook's first cell (before its kernel starts): a side chapter waits for the chapters it reads; a
    solution for its own chapter and every one before it. Solutions write only under outputs/tmp/ and read what
    their chapter and the earlier ones wrote, which no later chapter rewrites: solution 03 may run beside chapter 06."""
    kind = _kind(item.nodeid)
    if not os.environ.get(SYNC) or kind not in ("side chapter", "solution"):
        return
    if getattr(item.parent, "_phi3_waited", False):
        return
    own = item.path.name[:2]
    in_session = {i.path.name for i in item.session.items if _kind(i.nodeid) in CHAPTER_KINDS}
    if kind == "side chapter":
        needed = {name for name in in_session if name[:2] in READS.get(own, [])}
    else:
        needed = {name for name in in_session if name[:2] <= own}
    _wait_for(item, needed)
    item.parent._phi3_waited = True


def pytest_unconfigure(config: pytest.Config) -> None:
    sync = os.environ.get(SYNC)
    if sync and not hasattr(config, "workerinput") and Path(sync).name.startswith("phi3-lab-test-sync-"):
        shutil.rmtree(sync, ignore_errors=True)
