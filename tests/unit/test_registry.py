"""The server's registry: engines it makes are measured one step at a time and leave no trace when released."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import prometheus_client
import pytest

from autoglm_inference.artifact import ArtifactError
from autoglm_inference.engine import Job
from autoglm_inference.revisions import SwapInProgressError
from autoglm_inference.server import Registry, ServerOptions
from autoglm_inference.telemetry import telemetry
from tests.support.tiny_models import published_tiny_glms


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return published_tiny_glms(tmp_path_factory.mktemp("registry"), {"a": 1, "b": 2})


def queue_gauges(model: str) -> list[str]:
    """The ``autoglm_queue_depth`` samples of ``model`` a Prometheus scrape would see (one per engine)."""
    text = prometheus_client.generate_latest().decode()
    return [
        ln for ln in text.splitlines() if ln.startswith("autoglm_queue_depth") and f'model="{model}"' in ln
    ]


@pytest.mark.asyncio
async def test_unload_and_a_refused_canary_release_models_and_their_metrics(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    registry = Registry(ServerOptions(cache_dir=tmp_path))
    telemetry()  # the instruments exist before the first scrape
    service = registry.create("unload-me", str(folders["a"]))
    router = service.router
    serving = weakref.ref(router.table.stable.loaded.model)
    with pytest.raises(ArtifactError, match="already the stable revision"):
        await router.swap(str(folders["a"]), sha256=None, canary_weight=10)  # loaded, then refused
    canary = await router.swap(str(folders["b"]), sha256=None, canary_weight=10)
    canary_model = weakref.ref(canary.loaded.model)
    assert len(queue_gauges("unload-me")) == 2  # stable and canary engines
    revisions = router.revisions()
    await router.close()
    assert queue_gauges("unload-me") == []
    assert all(r.wait_released(30) for r in revisions)  # no request runs: their threads end at once
    del canary, revisions
    gc.collect()
    assert serving() is None
    assert canary_model() is None
    assert router.table.stable.engine.in_flight == 0


def test_engines_of_one_registry_never_step_at_the_same_time(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    """Energy readings are process-wide: a step measured while another engine steps would count both."""
    registry = Registry(ServerOptions(cache_dir=tmp_path))
    a = registry.create("a", str(folders["a"])).router.table.stable
    b = registry.create("b", str(folders["b"])).router.table.stable
    inside = threading.Semaphore(0)
    overlapped = threading.Event()
    first = threading.Event()

    def counting(forward: Callable[..., object], *, hold: bool) -> Callable[..., object]:
        def wrapped(*args: object, **kwargs: object) -> object:
            if inside.acquire(blocking=False):  # another forward is running right now
                inside.release()
                overlapped.set()
            inside.release()
            try:
                if hold and not first.is_set():
                    first.set()
                    overlapped.wait(1.0)  # give the other engine every chance to step meanwhile
                return forward(*args, **kwargs)
            finally:
                inside.acquire()

        return wrapped

    a.loaded.model.forward = counting(a.loaded.model.forward, hold=True)  # type: ignore[method-assign]
    b.loaded.model.forward = counting(b.loaded.model.forward, hold=False)  # type: ignore[method-assign]
    try:
        job_a = a.engine.submit(Job([5, 6, 7], 3))
        assert first.wait(30)
        job_b = b.engine.submit(Job([5, 6, 7], 3))
        assert job_a.wait(30)
        assert job_b.wait(30)
    finally:
        a.stop()
        b.stop()
    assert (job_a.finish_reason, job_b.finish_reason) == ("length", "length")
    assert not overlapped.is_set()


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


def test_a_model_is_loaded_by_kserve_load_and_a_failed_load_registers_nothing(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    from autoglm_inference.kserve_model import CausalLMModel
    from autoglm_inference.service import UnavailableError

    registry = Registry(ServerOptions(cache_dir=tmp_path))
    broken = CausalLMModel("broken", str(tmp_path / "missing"), registry)
    with pytest.raises(ArtifactError, match="does not exist"):
        broken.load()
    assert not broken.ready
    assert "broken" not in registry.services
    with pytest.raises(UnavailableError, match="not loaded"):
        _ = broken.service

    model = CausalLMModel("good", str(folders["a"]), registry)
    assert model.load() is True
    assert model.ready
    assert registry.get("good") is model.service
    assert model.service.router.table.stable.name == "rev-a"
    model.service.router.table.stable.engine.stop()


def test_every_server_error_is_one_base_class_with_its_status() -> None:
    """The server maps AutoGLMError alone: each kind carries its status (and headers)."""
    from autoglm_core.errors import AutoGLMError
    from autoglm_inference.access import AccessDeniedError
    from autoglm_inference.limits import BodyTooLargeError, QueueFullError
    from autoglm_inference.prompts import UnknownVariantError
    from autoglm_inference.revisions import NoCanaryError, UnknownRevisionError
    from autoglm_inference.service import BadRequestError, GenerationError, UnavailableError

    cases = [
        (BadRequestError("x"), 400),
        (UnknownVariantError("x"), 400),
        (AccessDeniedError("x", status=401), 401),
        (AccessDeniedError("x"), 403),
        (UnknownRevisionError("x"), 404),
        (SwapInProgressError("x"), 409),
        (NoCanaryError("x"), 409),
        (BodyTooLargeError(10, 5), 413),
        (ArtifactError("x"), 422),
        (QueueFullError(4, retry_after=2.4), 429),
        (GenerationError("x"), 500),
        (UnavailableError("x"), 503),
    ]
    for error, status in cases:
        assert isinstance(error, AutoGLMError)
        assert error.status == status, type(error).__name__
    assert QueueFullError(4, retry_after=2.4).headers() == {"Retry-After": "2"}
    assert UnavailableError("x").headers() == {"Retry-After": "1"}
    assert BodyTooLargeError(10, 5).to_json()["limit"] == "max_body_bytes"
