"""``autoglm serve --event-loop``: the loop kserve's ``asyncio.run`` creates is the one asked for.

kserve's own ``--event-loop`` never reaches uvicorn (its ``start`` runs the servers in
``asyncio.run``), so the server sets the event loop policy itself before it starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import uvloop

from autoglm_inference.server import use_event_loop


@pytest.fixture(autouse=True)
def default_policy() -> Iterator[None]:
    yield
    asyncio.set_event_loop_policy(None)


async def running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


@pytest.mark.parametrize(
    ("choice", "expected"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")]
)
def test_the_loop_asyncio_run_creates_is_the_one_chosen(choice: str, expected: str) -> None:
    assert use_event_loop(choice) == expected  # type: ignore[arg-type]
    if expected == "uvloop":  # kserve's start() asks for the current loop before asyncio.run
        assert isinstance(asyncio.get_event_loop_policy().get_event_loop(), uvloop.Loop)
    loop = asyncio.run(running_loop())
    assert isinstance(loop, uvloop.Loop) == (expected == "uvloop")


def test_uvloop_asked_for_but_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    with pytest.raises(ValueError, match="uvloop is not installed"):
        use_event_loop("uvloop")
    assert use_event_loop("auto") == "asyncio"
