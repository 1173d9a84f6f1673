"""The server's registry: engines it makes are measured one step at a time and leave no trace when released."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from autoglm_inference.artifact import ArtifactError
from autoglm_inference.revisions import SwapInProgressError
from autoglm_inference.server import Registry, ServerOptions
from autoglm_inference.telemetry import telemetry
from tests.support.tiny_models import published_tiny_glms


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return published_tiny_glms(tmp_path_factory.mktemp("registry"), {"a": 1, "b": 2})


@pytest.mark.asyncio
async def test_unload_and_a_refused_canary_release_models_and_their_metrics(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    registry = Registry(ServerOptions(cache_dir=tmp_path))
    sources_before = set(telemetry()._queue_sources)
    service = registry.create("m", str(folders["a"]))
    router = service.router
    serving = weakref.ref(router.table.stable.loaded.model)
    with pytest.raises(ArtifactError, match="already the stable revision"):
        await router.swap(str(folders["a"]), sha256=None, canary_weight=10)  # loaded, then refused
    canary = await router.swap(str(folders["b"]), sha256=None, canary_weight=10)
    canary_model = weakref.ref(canary.loaded.model)
    assert len(set(telemetry()._queue_sources) - sources_before) == 2  # stable and canary engines
    del canary
    await router.close()
    gc.collect()
    assert serving() is None
    assert canary_model() is None
    assert set(telemetry()._queue_sources) == sources_before
    assert router.table.stable.engine.in_flight == 0


def test_engines_of_one_registry_share_the_step_lock(folders: dict[str, Path], tmp_path: Path) -> None:
    registry = Registry(ServerOptions(cache_dir=tmp_path))
    a = registry.create("a", str(folders["a"])).router.table.stable.engine
    b = registry.create("b", str(folders["b"])).router.table.stable.engine
    try:
        assert a._step_lock is b._step_lock  # energy readings of one engine never include the other's steps
    finally:
        a.stop()
        b.stop()


def test_an_unknown_device_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="use cpu, cuda, cuda:N or auto"):
        Registry(ServerOptions(cache_dir=tmp_path, device="gpu"))


@pytest.mark.asyncio
async def test_a_second_repository_operation_on_a_name_is_refused_while_one_runs(tmp_path: Path) -> None:
    registry = Registry(ServerOptions(cache_dir=tmp_path))
    async with registry.exclusive("m", "a load of x"):
        with pytest.raises(SwapInProgressError, match="a load of x is in progress"):
            async with registry.exclusive("m", "an unload"):
                pass
        async with registry.exclusive("other", "a load of y"):  # other names are independent
            pass
    async with registry.exclusive("m", "an unload"):  # free again
        pass
