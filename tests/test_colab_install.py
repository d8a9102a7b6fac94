"""The Colab bootstrap's real install, into an environment built from what Colab preinstalls (``make test-colab``).

``colab/preinstalled.txt`` records Colab's versions of every package the bootstrap installs or depends on. This test
builds a virtual environment from that list, then runs a chapter's bootstrap cell (``tests/colab_sim.py --pip run``)
in it with numpy, pandas and matplotlib already imported, as in a running kernel: the cell's own
``pip install -r requirements.txt`` runs for real. Then: torch is untouched (version and files), the install broke
no dependency that was intact before (``pip check``), Colab's general libraries keep their versions (so no runtime
restart), and every library the chapters import imports, in a fresh process as after a restart.

Not Colab itself, and where it differs: **torch 2.13.0 (CPU) stands in for Colab's torch 2.11.0+cu128**, which has
no CPU build on this machine (a CUDA build is gigabytes); the test's claim about torch is that the install does
not touch it, whatever its version. Python is this machine's 3.11 (Colab: 3.12). Colab's setuptools and ipywidgets
stack are left out (see ``LEFT_OUT``). Needs PyPI; 8 min 26 s on 2026-12-03 with a warm pip cache that
also held the llama-cpp-python wheel pip had built before (2-core machine, shared with another run); from a cold
cache pip compiles llama.cpp first (README).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.colab_install

ROOT = Path(__file__).resolve().parent.parent
PREINSTALLED = ROOT / "colab" / "preinstalled.txt"
STAND_IN_TORCH = "torch==2.13.0"
LEFT_OUT = {
    "torch": "Colab's is a CUDA build; torch==2.13.0 (CPU, on this machine's disk) stands in",
    "setuptools": "the stand-in torch 2.13.0 needs a newer one than Colab's 75.2.0",
    "ipywidgets": "Colab's ipywidgets 7 pulls in the classic notebook server; requirements-deploy.txt's range "
                  "keeps Colab's 7.7.1 (tests/test_colab_bootstrap.py checks every range against Colab's versions)",
    "widgetsnbextension": "part of Colab's ipywidgets 7",
    "jupyterlab-widgets": "part of Colab's ipywidgets 7",
}
UNCHANGED = ["torch", "numpy", "pandas", "matplotlib", "tqdm", "tensorboard"]  # Colab's own must stay
WORKSHOP_IMPORTS = ["torch", "transformers", "tokenizers", "safetensors", "datasets", "accelerate", "peft", "trl",
                    "bitsandbytes", "loralib", "rouge_score", "matplotlib.pyplot", "pandas", "tensorboard", "tqdm",
                    "utils.models", "utils.training", "utils.quantization", "utils.metrics", "utils.evaluation",
                    "utils.loralib_tools", "utils.experiments", "utils.plots"]
DEPLOY_IMPORTS = ["onnx", "onnx_ir", "onnxruntime", "onnxruntime_genai", "onnxruntime_genai.models.builder",
                  "utils.deployment"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def colab_pins() -> dict[str, str]:
    """``{normalised name: 'Name==version'}`` from colab/preinstalled.txt."""
    lines = [line.strip() for line in PREINSTALLED.read_text().splitlines() if line.strip() and line[0] != "#"]
    return {norm(line.split("==")[0]): line for line in lines}


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def freeze(python: Path) -> dict[str, str]:
    out = run([str(python), "-m", "pip", "list", "--format=json"]).stdout
    return {norm(p["name"]): p["version"] for p in json.loads(out)}


def pip_check(python: Path) -> set[str]:
    return set(run([str(python), "-m", "pip", "check"]).stdout.strip().splitlines()) - {"No broken requirements found."}


def torch_fingerprint(python: Path) -> tuple[str, str, str]:
    """torch's version, its package folder and a hash of its RECORD (every installed file and its hash)."""
    code = ("import importlib.metadata as m, torch, hashlib; d = m.distribution('torch'); "
            "print(torch.__version__, torch.__file__, hashlib.sha256(d.read_text('RECORD').encode()).hexdigest())")
    done = run([str(python), "-c", code])
    assert done.returncode == 0, done.stderr[-2000:]
    version, path, record = done.stdout.split()
    return version, path, record


@pytest.fixture(scope="module")
def colab(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A Colab-like environment, a published-repository stand-in, and what they held before any bootstrap ran."""
    base = tmp_path_factory.mktemp("colab")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True)
    python = base / "venv" / "bin" / "python"
    pins = [pin for name, pin in colab_pins().items() if name not in LEFT_OUT]
    (base / "colab.txt").write_text("\n".join(pins + [STAND_IN_TORCH]) + "\n")
    built = run([str(python), "-m", "pip", "install", "--quiet", "-r", str(base / "colab.txt")])
    assert built.returncode == 0, built.stderr[-3000:]
    print(f"\nColab-like environment built in {time.perf_counter() - started:.0f} s")
    repo = base / "remote" / "phi3-lora-lab.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(ROOT), str(repo)], check=True)
    return {"python": python, "repo": repo, "home": base / "content" / "phi3-lora-lab",
            "versions": freeze(python), "check": pip_check(python), "torch": torch_fingerprint(python)}


def bootstrap(colab: dict, notebook: str) -> dict:
    """Run ``notebook``'s bootstrap cell in the Colab-like environment, installing for real; again after a restart."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PHI3_LAB_OUTPUTS", "VIRTUAL_ENV", "PHI3_LAB_SETUP_PID")}
    env.update(PHI3_LAB_REPO=str(colab["repo"]), PHI3_LAB_HOME=str(colab["home"]))
    colab["home"].parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(colab["python"]), str(ROOT / "tests" / "colab_sim.py"), str(ROOT / "notebooks" / notebook),
           "--pip", "run", "--preload", "numpy,pandas,matplotlib", "--chapter-imports"]
    started = time.perf_counter()
    done = run(cmd, env=env, cwd=colab["home"].parent, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n{notebook}: bootstrap install {time.perf_counter() - started:.0f} s; printed: {report['printed']!r}")
    if report["killed"]:  # the cell said why and restarted the runtime: a fresh process runs it again
        assert "restarting the runtime" in report["printed"] and "run this cell again" in report["printed"]
        done = run(cmd, env=env, cwd=colab["home"].parent, timeout=1800)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert not report["killed"], "a second run after the restart must not restart again"
    assert report["bootstrap_ok"] and report["import_ok"], report["error"]
    return report


def check_after(colab: dict, imports: list[str]) -> None:
    python = colab["python"]
    assert torch_fingerprint(python) == colab["torch"], "the install changed torch"
    new_problems = pip_check(python) - colab["check"]
    assert not new_problems, f"the install broke dependencies that were intact: {sorted(new_problems)}"
    now = freeze(python)
    for name in UNCHANGED:
        assert now[name] == colab["versions"][name], f"{name} changed: Colab would need a runtime restart"
    changed = {n: f"{colab['versions'].get(n, '-')} -> {v}" for n, v in now.items() if colab["versions"].get(n) != v}
    print("installed or changed:", json.dumps(changed, sort_keys=True))
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in imports)
    env = {**os.environ, "PYTHONPATH": str(colab["home"])}
    done = run([str(python), "-c", code], env=env, cwd=colab["home"] / "notebooks")
    assert done.returncode == 0, done.stderr[-3000:]


def test_workshop_install_into_colabs_stack(colab: dict) -> None:
    bootstrap(colab, "03_lora_finetuning.ipynb")
    check_after(colab, WORKSHOP_IMPORTS)


def test_deployment_install_on_top(colab: dict) -> None:
    bootstrap(colab, "07_deployment.ipynb")
    check_after(colab, WORKSHOP_IMPORTS + DEPLOY_IMPORTS)
