"""The Colab path: every chapter's first code cell clones the project, installs its pins keeping Colab's torch,
mounts Drive (or says what to do when that is refused), and makes ``utils`` importable from the clone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def bare_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare clone of this repository's committed state, standing in for GitHub."""
    path = tmp_path_factory.mktemp("remote") / "phi3-lora-lab.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(ROOT), str(path)], check=True)
    return path


def simulate(notebook: Path, bare_repo: Path, home: Path, drive: str) -> dict:
    """Run ``colab_sim.py`` on one chapter in a fresh process; its JSON report plus everything it printed."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PHI3_LAB_OUTPUTS")}
    env.update(PHI3_LAB_REPO=str(bare_repo), PHI3_LAB_HOME=str(home))
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "colab_sim.py"), str(notebook), drive],
                         capture_output=True, text=True, env=env, cwd=home.parent, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return {**json.loads(run.stdout.strip().splitlines()[-1]), "stdout": run.stdout}


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.name[:2])
def test_bootstrap_on_simulated_colab(notebook: Path, bare_repo: Path, tmp_path: Path) -> None:
    home = tmp_path / "content" / "phi3-lora-lab"
    home.parent.mkdir(parents=True)
    report = simulate(notebook, bare_repo, home, "mount")
    assert report["bootstrap_ok"] and report["import_ok"], report["error"]
    assert [c.split()[:2] for c in report["system"]] == [["git", "clone"]] and str(bare_repo) in report["system"][0]
    assert Path(report["utils"]).resolve().is_relative_to(home.resolve()), "utils was not imported from the clone"
    assert Path(report["cwd"]).resolve() == (home / "notebooks").resolve()
    assert report["mounts"] == ["/content/drive"]
    assert report["outputs"] == "/content/drive/MyDrive/phi3-lora-lab-outputs"

    assert len(report["pip"]) == 1
    pip = report["pip"][0].split()
    assert "--force-reinstall" not in pip and "-U" not in pip and "--upgrade" not in pip
    assert not any(re.match(r"torch\b", arg) for arg in pip), "the install must keep Colab's torch"
    installed = (home / "requirements.txt").read_text().splitlines()
    assert pip[pip.index("-r") + 1] == f"{home}/requirements.txt"
    assert not [line for line in installed if re.match(r"\s*torch\b", line)], "requirements.txt must not pin torch"


def test_refused_drive_says_what_to_do(bare_repo: Path, tmp_path: Path) -> None:
    home = tmp_path / "content" / "phi3-lora-lab"
    home.parent.mkdir(parents=True)
    report = simulate(CHAPTERS[0], bare_repo, home, "refuse")
    assert report["bootstrap_ok"] and report["import_ok"], report["error"]
    assert Path(report["outputs"]) == (home / "outputs").resolve()
    assert "Google Drive is not mounted" in report["stdout"] and "vanish" in report["stdout"]
