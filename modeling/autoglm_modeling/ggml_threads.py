"""A persistent ggml thread pool for one llama.cpp context, as llama.cpp's own tools attach one.

Without one, every ``llama_decode`` starts its worker threads and joins them at the end (ggml's
"disposable" pool); with one, the workers stay and poll for the next graph (``poll``: llama.cpp's
``--poll``, default 50), which is what llama-server does. Measured on SmolLM2-135M, 2 threads, batch
1, in-process, 8 alternations: 1.055x the tokens/s at Q4_0, 1.023x at Q8_0, 1.018x at F16 (README).

llama-cpp-python binds neither ``ggml_threadpool_new`` nor ``llama_attach_threadpool``, so this
calls them through ctypes. Its wheel ships each library three times (``libggml-cpu.so``, ``.so.0``,
``.so.0.25.3``: wheels hold no symbolic links) and the package itself loads some of the copies
beside the ones ``libllama`` links. A pool made by one copy and computed with another's kernels
decodes NaN (each copy has its own tables), so the pool's functions are looked up the way llama.cpp
does it: through the CPU backend's registry in the ``libggml`` that ``libllama`` is linked against
(by its soname, already loaded), and the attach is the ``llama_cpp`` module's own ``libllama``.
Where any of that is missing (another platform, another build), there is no pool and decoding is as
before; the reason is logged.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger(__name__)

#: ``GGML_MAX_N_THREADS`` in ggml.h: the size of ``ggml_threadpool_params.cpumask``.
_MAX_THREADS = 512
_CPU_DEVICE = 0  # GGML_BACKEND_DEVICE_TYPE_CPU
#: llama.cpp's default polling level (``--poll``): 0 sleeps between graphs, 100 spins the longest.
DEFAULT_POLL = 50


class _Params(ctypes.Structure):
    """``struct ggml_threadpool_params`` (ggml.h)."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * _MAX_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),  # enum ggml_sched_priority
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


class ThreadPool:
    """``threads`` ggml workers attached to one llama.cpp context until ``detach``."""

    def __init__(self, llama: Any, ctx: Any, threads: int, *, poll: int = DEFAULT_POLL) -> None:
        if not 0 <= poll <= 100:
            raise ValueError(f"poll is 0 to 100, got {poll}")
        self._lib = llama.llama_cpp._lib  # the libllama the context was made by
        ggml = ctypes.CDLL("libggml.so.0")  # the copy libllama links (loaded already: its soname)
        base = ctypes.CDLL("libggml-base.so.0")
        ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        ggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        device = ggml.ggml_backend_dev_by_type(_CPU_DEVICE)
        if not device:
            raise OSError("ggml has no CPU backend")
        registry = ggml.ggml_backend_dev_backend_reg(device)

        def function(name: str, restype: Any, *argtypes: Any) -> Any:
            address = base.ggml_backend_reg_get_proc_address(registry, name.encode())
            if not address:
                raise OSError(f"the CPU backend does not export {name}")
            return ctypes.CFUNCTYPE(restype, *argtypes)(address)

        new = function("ggml_threadpool_new", ctypes.c_void_p, ctypes.POINTER(_Params))
        self._free = function("ggml_threadpool_free", None, ctypes.c_void_p)
        # ``ggml_threadpool_pause`` is not in the registry: it is taken from the CPU backend by its
        # soname, once that proves to be the copy the registry gave (the same ``ggml_threadpool_new``).
        cpu = ctypes.CDLL("libggml-cpu.so.0")
        if (
            ctypes.cast(cpu.ggml_threadpool_new, ctypes.c_void_p).value
            != ctypes.cast(new, ctypes.c_void_p).value
        ):
            raise OSError("libggml-cpu.so.0 is not the CPU backend llama.cpp decodes with")
        self._pause = cpu.ggml_threadpool_pause
        self._pause.restype = None
        self._pause.argtypes = [ctypes.c_void_p]
        base.ggml_threadpool_params_init.restype = None
        base.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(_Params), ctypes.c_int]
        params = _Params()
        base.ggml_threadpool_params_init(ctypes.byref(params), threads)
        params.poll = poll
        self._pool = new(ctypes.byref(params))
        if not self._pool:
            raise OSError(f"ggml_threadpool_new failed for {threads} threads")
        self._lib.llama_attach_threadpool.restype = None
        self._lib.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self._lib.llama_detach_threadpool.restype = None
        self._lib.llama_detach_threadpool.argtypes = [ctypes.c_void_p]
        self._ctx = ctx
        self._lib.llama_attach_threadpool(ctx, self._pool, self._pool)  # decode and prompt batches

    def pause(self) -> None:
        """Let the workers sleep instead of polling (about 85 ms after each graph at poll 50 here):
        the next decode wakes them (ggml resumes a paused pool itself)."""
        if self._pool is not None:
            self._pause(self._pool)

    def detach(self) -> None:
        """Detach from the context (before it is freed) and stop the workers."""
        if self._pool is None:
            return
        self._lib.llama_detach_threadpool(self._ctx)
        pool, self._pool = self._pool, None
        self._free(pool)


def attach_threadpool(llama: Any, ctx: Any, threads: int, *, poll: int = DEFAULT_POLL) -> ThreadPool | None:
    """A pool attached to ``ctx``, or ``None`` (logged) where this llama.cpp build cannot make one."""
    try:
        return ThreadPool(llama, ctx, threads, poll=poll)
    except (OSError, AttributeError) as exc:
        log.info("llama.cpp: no persistent thread pool (%s); each decode starts its own threads", exc)
        return None
