"""Which runtime serves an artifact: ``autoglm serve --engine auto|torch|llama.cpp``."""

from __future__ import annotations

from pathlib import Path

import pytest

import autoglm_inference.artifact as artifact
from autoglm_inference.artifact import ArtifactError, choose_engine, gguf_weights
from tests.support.tiny_models import tiny_glm


@pytest.fixture
def safetensors_folder(tmp_path: Path) -> Path:
    return tiny_glm(tmp_path / "st")


@pytest.fixture
def gguf_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF")  # only its name matters to the choice
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("installed", [True, False])
def test_auto_serves_gguf_on_llama_cpp_where_installed_and_everything_else_on_torch(
    gguf_folder: Path, safetensors_folder: Path, installed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artifact, "llama_cpp_available", lambda: installed)
    assert choose_engine(gguf_folder, "auto") == ("llama.cpp" if installed else "torch")
    assert choose_engine(gguf_folder / "model.gguf", "auto") == ("llama.cpp" if installed else "torch")
    assert choose_engine(safetensors_folder, "auto") == "torch"
    assert choose_engine(gguf_folder, "auto", device="cuda") == "torch"  # llama.cpp here is a CPU build
    assert choose_engine(gguf_folder, "torch") == "torch"


def test_llama_cpp_asked_for_a_safetensors_artifact_names_what_it_serves(safetensors_folder: Path) -> None:
    with pytest.raises(
        ArtifactError, match=r"--engine llama\.cpp serves GGUF weights; this artifact has none"
    ):
        choose_engine(safetensors_folder, "llama.cpp")


def test_llama_cpp_asked_for_without_the_package_says_how_to_install_it(
    gguf_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artifact, "llama_cpp_available", lambda: False)
    with pytest.raises(ArtifactError, match="make install-llamacpp"):
        choose_engine(gguf_folder, "llama.cpp")


def test_llama_cpp_on_a_gpu_is_refused(gguf_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifact, "llama_cpp_available", lambda: True)
    with pytest.raises(ArtifactError, match=r"runs on the CPU here; --device is cuda"):
        choose_engine(gguf_folder, "llama.cpp", device="cuda")


def test_a_folder_with_safetensors_beside_a_gguf_is_not_a_gguf_artifact(gguf_folder: Path) -> None:
    assert gguf_weights(gguf_folder) == gguf_folder / "model.gguf"
    (gguf_folder / "model.safetensors").write_bytes(b"")
    assert gguf_weights(gguf_folder) is None
