"""The Colab path: every chapter's and solutions notebook's first code cell clones the project, installs what that
notebook needs keeping Colab's torch, mounts Drive, and makes ``utils`` importable from the clone; each bad setting
(no repository address, no network, refused Drive) ends in one clear line, and an install that changes a library
the running kernel has loaded restarts the runtime. The real install into Colab's stack: ``test_colab_install.py``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bootstrap_cell  # noqa: E402

NOTEBOOKS = bootstrap_cell.notebooks()
DRIVE_OUTPUTS = "/content/drive/MyDrive/phi3-lora-lab-outputs"


@pytest.fixture(scope="module")
def bare_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare clone of this repository's committed state, standing in for the published repository."""
    path = tmp_path_factory.mktemp("remote") / "phi3-lora-lab.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(ROOT), str(path)], check=True)
    return path


def simulate(notebook: Path, repo: Path | str, tmp_path: Path, *flags: str, **extra_env: str) -> dict:
    """Run ``colab_sim.py`` on one notebook in a fresh process; its JSON report (``home``: where it clones)."""
    home = tmp_path / "content" / "phi3-lora-lab"
    home.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PHI3_LAB_OUTPUTS", "PHI3_LAB_REPO", "PHI3_LAB_SETUP_PID")}
    env.update(PHI3_LAB_REPO=str(repo), PHI3_LAB_HOME=str(home), **extra_env)
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "colab_sim.py"), str(notebook), *flags],
                         capture_output=True, text=True, env=env, cwd=home.parent, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return {**json.loads(run.stdout.strip().splitlines()[-1]), "home": home}


def test_every_notebook_opens_with_its_bootstrap_cell() -> None:
    assert bootstrap_cell.problems() == []
    assert len(NOTEBOOKS) == len(bootstrap_cell.chapters()) * 2, "every chapter has a solutions notebook"


def test_the_cells_differ_only_in_their_settings_line() -> None:
    sources = {bootstrap_cell.cell_for(p) for p in NOTEBOOKS}
    assert len({re.sub(r"^LAB_NOTEBOOK, .*$", "", s, flags=re.M) for s in sources}) == 1


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_bootstrap_on_simulated_colab(notebook: Path, bare_repo: Path, tmp_path: Path) -> None:
    report = simulate(notebook, bare_repo, tmp_path)
    home = report["home"]
    assert report["bootstrap_ok"] and report["import_ok"], report["error"]
    clone, pip = report["commands"]
    assert clone[:2] == ["git", "clone"] and clone[-2:] == [str(bare_repo), f"{home}.partial"]
    assert not Path(f"{home}.partial").exists(), "the clone is written aside and renamed"
    assert Path(report["utils"]).resolve().is_relative_to(home.resolve()), "utils was not imported from the clone"
    assert report["pythonpath"].split(os.pathsep)[0] == str(home), "child processes (run_series.py) find utils"
    assert Path(report["cwd"]).resolve() == (home / "notebooks").resolve()
    assert report["mounts"] == ["/content/drive"] and report["outputs"] == DRIVE_OUTPUTS
    assert report["kills"] == [] and report["printed"].strip().startswith("Colab setup done")

    assert pip[:5] == [sys.executable, "-m", "pip", "install", "--quiet"]
    assert not {"--force-reinstall", "-U", "--upgrade", "--no-deps"} & set(pip)
    files = pip[5:][1::2]
    extras = ["requirements-deploy.txt"] if notebook.name.startswith("07") else []
    assert files == [str(home / name) for name in ["requirements.txt", *extras]]
    for file in files:
        pins = [line for line in Path(file).read_text().splitlines() if re.match(r"\s*(torch|-c)\b", line)]
        assert pins == [], f"{file} must keep Colab's torch and constrain nothing else: {pins}"


def test_workshop_requirements_leave_out_the_deployment_libraries() -> None:
    workshop = (ROOT / "requirements.txt").read_text().lower()
    assert not re.search(r"^\s*onnx", workshop, flags=re.M)
    assert re.search(r"^onnxruntime-genai==", (ROOT / "requirements-deploy.txt").read_text(), flags=re.M)


def one_line(report: dict, *expected: str) -> str:
    """The failure's one rendered line, checked to contain ``expected``."""
    assert not report["bootstrap_ok"] and report["rendered"] and len(report["rendered"]) == 1, report
    line = report["rendered"][0]
    assert line.startswith("Colab setup stopped: ") and all(e in line for e in expected), line
    return line


def test_no_repository_address_says_what_to_set(tmp_path: Path) -> None:
    report = simulate(NOTEBOOKS[0], "", tmp_path, "--no-repo")
    one_line(report, "no repository address", "LAB_REPO", "PHI3_LAB_REPO")
    assert report["commands"] == [] and not report["home"].exists()


def test_ipython_shows_the_failure_as_one_line(tmp_path: Path) -> None:
    report = simulate(NOTEBOOKS[3], "", tmp_path, "--no-repo", "--ipython")
    one_line(report, "no repository address")


def test_unreachable_repository_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "phi3-lora-lab.git"
    report = simulate(NOTEBOOKS[2], missing, tmp_path)
    one_line(report, "could not clone", str(missing), "internet")
    assert not report["home"].exists() and not Path(f"{report['home']}.partial").exists()


def test_no_network_for_pip_says_so(bare_repo: Path, tmp_path: Path) -> None:
    report = simulate(NOTEBOOKS[3], bare_repo, tmp_path, "--pip", "fail")
    one_line(report, "pip could not install", "transformers==5.24.0", "internet")


def test_refused_drive_names_the_chapters_to_run_first(bare_repo: Path, tmp_path: Path) -> None:
    notebook = next(p for p in NOTEBOOKS if p.name.startswith("05"))
    report = simulate(notebook, bare_repo, tmp_path, "--drive", "refuse")
    assert report["bootstrap_ok"] and report["import_ok"], report["error"]
    assert Path(report["outputs"]) == (report["home"] / "outputs").resolve()
    refused = [line for line in report["printed"].splitlines() if "Google Drive is not mounted" in line]
    assert len(refused) == 1
    assert "chapters 01, 03, 04" in refused[0] and "run_series.py --only 01 03 04" in refused[0]
    assert "allow Drive" in refused[0]


def test_refused_drive_on_a_first_chapter_says_its_outputs_vanish(bare_repo: Path, tmp_path: Path) -> None:
    report = simulate(NOTEBOOKS[1], bare_repo, tmp_path, "--drive", "refuse")
    assert report["bootstrap_ok"] and report["import_ok"], report["error"]
    refused = [line for line in report["printed"].splitlines() if "Google Drive is not mounted" in line]
    assert len(refused) == 1 and "vanishes" in refused[0] and "allow Drive" in refused[0]


def test_notebooks_run_from_a_set_up_runtime_skip_the_setup(bare_repo: Path, tmp_path: Path) -> None:
    """run_series.py's kernels (the refused-Drive remedy) inherit the setup: no second clone, install or mount."""
    report = simulate(NOTEBOOKS[2], bare_repo, tmp_path, PHI3_LAB_SETUP_PID="1")
    assert report["bootstrap_ok"] and report["commands"] == [] and report["mounts"] == [] and not report["printed"]


def test_chains_name_every_chapter_whose_outputs_are_needed() -> None:
    assert bootstrap_cell.chain(bootstrap_cell.SOLUTION_READS["07"]) == ["01", "02", "03", "04", "06", "07"]
    assert bootstrap_cell.chain(bootstrap_cell.READS["00"]) == []


def test_an_install_that_changes_a_loaded_library_restarts_the_runtime(bare_repo: Path, tmp_path: Path) -> None:
    report = simulate(NOTEBOOKS[4], bare_repo, tmp_path, "--fake-upgrade", "loaded")
    assert report["killed"] and report["kills"] == [9], report
    assert "labfakepkg" in report["printed"] and "run this cell again" in report["printed"]
    assert report["mounts"] == [], "nothing runs after the restart"
    again = simulate(NOTEBOOKS[4], bare_repo, tmp_path)  # after the restart: the clone is there, nothing changes
    assert again["bootstrap_ok"] and again["import_ok"] and again["kills"] == [], again["error"]
    assert [c[:2] for c in again["commands"]] == [[sys.executable, "-m"]], "the second run does not clone again"


def test_an_install_that_changes_only_unloaded_libraries_needs_no_restart(bare_repo: Path, tmp_path: Path) -> None:
    report = simulate(NOTEBOOKS[4], bare_repo, tmp_path, "--fake-upgrade", "unloaded")
    assert report["bootstrap_ok"] and report["kills"] == [] and "restarting" not in report["printed"], report


def test_a_chapters_own_imports_work_from_the_clone(bare_repo: Path, tmp_path: Path) -> None:
    notebook = next(p for p in NOTEBOOKS if p.name.startswith("04"))
    report = simulate(notebook, bare_repo, tmp_path, "--chapter-imports")
    assert report["bootstrap_ok"] and report["import_ok"], report["error"]
    assert Path(report["utils"]).resolve().is_relative_to(report["home"].resolve())


def test_ranges_keep_colabs_own_versions() -> None:
    """Where a requirement is a range (not the lesson's exact pin), the version Colab preinstalls satisfies it, so
    the bootstrap leaves Colab's copy in place; and the constraints used locally satisfy it too."""
    from packaging.requirements import Requirement

    def pins(path: Path) -> dict[str, str]:
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and ln.strip()[0] not in "#-"]
        return {Requirement(ln).name.lower().replace("_", "-"): Requirement(ln).specifier for ln in lines}

    colab = {name.lower().replace("_", "-"): version for name, version in
             (ln.split("==") for ln in (ROOT / "colab" / "preinstalled.txt").read_text().splitlines()
              if ln.strip() and not ln.startswith("#"))}
    local = {name: str(spec).removeprefix("==") for name, spec in pins(ROOT / "constraints.txt").items()}
    ranges = {name: spec for f in ("requirements.txt", "requirements-deploy.txt")
              for name, spec in pins(ROOT / f).items() if not str(spec).startswith("==")}
    assert {"pandas", "matplotlib", "ipywidgets"} <= set(ranges)
    for name, spec in ranges.items():
        assert name in colab and spec.contains(colab[name]), f"{name}{spec} would replace Colab's {colab.get(name)}"
        assert name in local and spec.contains(local[name]), f"constraints.txt pins {name} outside {spec}"
