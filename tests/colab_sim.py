"""Run one notebook's Colab bootstrap cell under a simulated Colab, then its first ``utils`` import; print a JSON report.

    python tests/colab_sim.py NOTEBOOK [--drive mount|refuse] [--pip record|fail|run] [--no-repo]
                                       [--preload numpy,pandas] [--fake-upgrade loaded|unloaded] [--ipython] [--chapter-imports]

Used by ``tests/test_colab_bootstrap.py`` and ``tests/test_colab_install.py`` in a fresh process (the cell changes
``sys.path``, the working folder and the environment). ``PHI3_LAB_REPO`` (a local bare repository) and
``PHI3_LAB_HOME`` (where to clone) come from the caller. A stand-in ``google.colab`` sits in ``sys.modules``;
``git clone`` runs for real; the cell's ``pip install`` is recorded (``record``), made to fail as without a network
(``fail``), or run for real into the Python running this script (``run``). ``os.kill`` (the cell's runtime
restart) is recorded and ends the cell. ``--fake-upgrade`` loads a tiny distribution that the recorded install
"upgrades", as an install that changes a library the running kernel has loaded. ``--ipython`` runs the cell in
IPython and reports what IPython prints for a failure. Only the standard library is needed, unless ``--ipython``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path


class Killed(BaseException):
    """Raised by the stand-in ``os.kill``: the runtime restarts, so nothing after it runs."""


def code_cells(notebook: str) -> list[str]:
    cells = json.loads(Path(notebook).read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def fake_distribution(load: bool) -> Path:
    """A distribution ``labfakepkg`` 1.0 on ``sys.path``, imported if ``load``; returns its METADATA file."""
    site = Path(tempfile.mkdtemp(prefix="labfake-"))
    (site / "labfakepkg").mkdir()
    (site / "labfakepkg" / "__init__.py").write_text("")
    info = site / "labfakepkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: labfakepkg\nVersion: 1.0\n")
    (info / "RECORD").write_text("labfakepkg/__init__.py,,\nlabfakepkg-1.0.dist-info/METADATA,,\n")
    sys.path.insert(0, str(site))
    if load:
        import labfakepkg  # noqa: F401

    return info / "METADATA"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("notebook")
    parser.add_argument("--drive", choices=["mount", "refuse"], default="mount")
    parser.add_argument("--pip", choices=["record", "fail", "run"], default="record")
    parser.add_argument("--no-repo", action="store_true", help="blank the cell's LAB_REPO setting")
    parser.add_argument("--preload", default="", help="modules a running Colab kernel has imported already")
    parser.add_argument("--fake-upgrade", choices=["loaded", "unloaded"])
    parser.add_argument("--ipython", action="store_true")
    parser.add_argument("--chapter-imports", action="store_true",
                        help="after the cell, run the notebook's first utils imports (else only utils.config)")
    args = parser.parse_args()

    mounts: list[str] = []

    def mount(path: str, *a: object, **k: object) -> None:
        mounts.append(path)
        if args.drive == "refuse":
            raise ValueError("mount failed: credential propagation was unsuccessful")

    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mount)
    google = types.ModuleType("google")
    google.colab = colab
    sys.modules.update({"google": google, "google.colab": colab, "google.colab.drive": colab.drive})
    for name in filter(None, args.preload.split(",")):
        __import__(name)
    metadata = fake_distribution(args.fake_upgrade == "loaded") if args.fake_upgrade else None

    commands: list[list[str]] = []
    kills: list[int] = []
    real_run = subprocess.run

    def run(cmd, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        cmd = [str(c) for c in cmd]
        commands.append(cmd)
        if cmd[1:4] == ["-m", "pip", "install"] and args.pip != "run":
            if args.pip == "fail":
                return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying ...\nERROR: Could not find a "
                                                   "version that satisfies the requirement transformers==5.24.0")
            if metadata is not None:
                metadata.write_text(metadata.read_text().replace("Version: 1.0", "Version: 2.0"))
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return real_run(cmd, *a, **k)

    def kill(pid: int, sig: int) -> None:
        kills.append(sig)
        raise Killed

    subprocess.run = run
    os.kill = kill

    cells = code_cells(args.notebook)
    cell = cells[0]
    if args.no_repo:
        cell = re.sub(r'^LAB_REPO = ".*?"', 'LAB_REPO = ""', cell, count=1, flags=re.M)
    report: dict = {"bootstrap_ok": False, "import_ok": False, "error": None, "rendered": None, "killed": False}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if args.ipython:
            from IPython.core.interactiveshell import InteractiveShell

            shell = InteractiveShell.instance()
            result = shell.run_cell(cell)
            report["bootstrap_ok"] = result.success
            if not result.success:
                report["error"] = repr(result.error_in_exec)
        else:
            namespace: dict = {"__name__": "__main__"}
            try:
                exec(compile(cell, f"{args.notebook}:bootstrap", "exec"), namespace)
                report["bootstrap_ok"] = True
            except Killed:
                report["killed"] = True
            except Exception as err:  # noqa: BLE001 - the report says what it was
                report["error"] = repr(err)
                if hasattr(err, "_render_traceback_"):
                    report["rendered"] = err._render_traceback_()
    printed = out.getvalue()
    if args.ipython:
        report["rendered"] = printed.strip().splitlines()
    elif report["bootstrap_ok"]:
        imports = ""
        if args.chapter_imports:
            first_import = next(s for s in cells[1:] if "from utils" in s or "import utils" in s)
            imports = "\n".join(line for line in first_import.splitlines()
                                if line.startswith(("from utils", "import utils")))
        try:
            exec(imports + "\nimport utils\nfrom utils import config\n", namespace)
            report.update(import_ok=True, utils=namespace["utils"].__file__,
                          outputs=str(namespace["config"].outputs_dir()), cwd=os.getcwd())
        except Exception as err:  # noqa: BLE001
            report["error"] = repr(err)
    report.update(commands=commands, kills=kills, mounts=mounts, printed=printed,
                  pythonpath=os.environ.get("PYTHONPATH", ""))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
