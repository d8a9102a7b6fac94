"""Run one chapter's Colab bootstrap under a simulated Colab, then its first ``utils`` import; print a JSON report.

    python tests/colab_sim.py NOTEBOOK {mount|refuse}

Used by ``tests/test_colab_bootstrap.py`` in a fresh process (the bootstrap changes ``sys.path`` and the working
folder). ``PHI3_LAB_REPO`` (a local bare repository) and ``PHI3_LAB_HOME`` (where to clone) come from the caller.
A stand-in ``google.colab`` module sits in ``sys.modules``; ``!`` commands run for real only when they are
``git clone``; ``%pip`` is recorded, not run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import nbformat
from IPython.core.interactiveshell import InteractiveShell


def main(notebook: str, drive_mode: str) -> None:
    mounts: list[str] = []

    def mount(path: str, *args: object, **kwargs: object) -> None:
        mounts.append(path)
        if drive_mode == "refuse":
            raise ValueError("mount failed: credential propagation was unsuccessful")

    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mount)
    google = types.ModuleType("google")
    google.colab = colab
    sys.modules.update({"google": google, "google.colab": colab, "google.colab.drive": colab.drive})

    shell = InteractiveShell.instance()
    system_calls: list[str] = []
    pip_calls: list[str] = []

    def system(cmd: str) -> None:
        cmd = shell.var_expand(cmd, depth=1)  # what IPython's own system() does with {names}
        system_calls.append(cmd)
        if cmd.split()[:2] == ["git", "clone"]:
            subprocess.run(cmd.split(), check=True, capture_output=True)

    shell.system = system
    shell.register_magic_function(lambda line: pip_calls.append(line), "line", "pip")

    nb = nbformat.read(notebook, as_version=4)
    cells = [c.source for c in nb.cells if c.cell_type == "code"]
    result = shell.run_cell(cells[0])
    first_import = next(s for s in cells[1:] if "from utils" in s or "import utils" in s)
    imports = "\n".join(line for line in first_import.splitlines()
                        if line.startswith(("from utils", "import utils")))
    probe = shell.run_cell(imports + "\nimport os, utils\nfrom utils import config\n"
                           "_report = {'utils': utils.__file__, 'outputs': str(config.outputs_dir()), "
                           "'cwd': os.getcwd()}")
    print(json.dumps({"bootstrap_ok": result.success, "import_ok": probe.success,
                      "error": repr(result.error_in_exec or probe.error_in_exec),
                      "system": system_calls, "pip": pip_calls, "mounts": mounts,
                      **shell.user_ns.get("_report", {})}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
