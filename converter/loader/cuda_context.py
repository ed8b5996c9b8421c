"""Create the CUDA primary context on a side thread, with the GIL released, while a load starts.

The first CUDA call of a process (``cuInit`` and the device's primary context: ~0.1 s on an H200 host)
runs inside torch's lazy initialization, which holds the GIL, so nothing else of the load's Python runs
meanwhile. Calling the driver through ``ctypes`` instead releases the GIL for the call: started as the
load begins, the context is made while the caller hashes, opens and parses the shards; torch's own
initialization then finds the primary context made and retains it too (the runtime API uses the
device's primary context). The extra reference is released when the load ends, after torch holds
its own.

Best effort: no driver library (another OS, no GPU) or any error: nothing is done and torch creates
the context itself as before.
"""

from __future__ import annotations

import ctypes
import threading
import time

import torch

from converter.loader import timing

DRIVER = "libcuda.so.1"


class PrimedContext:
    """The primary context of one CUDA device, retained on a side thread (:meth:`release` it once torch
    has initialized)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.retained = False
        self.error: str | None = None
        self._lib: ctypes.CDLL | None = None
        self._device = ctypes.c_int(-1)
        self._thread = threading.Thread(target=self._retain, name="qm-cuda-context", daemon=True)
        self._thread.start()

    def _retain(self) -> None:
        start = time.perf_counter()
        try:
            lib = ctypes.CDLL(DRIVER)  # a CDLL call releases the GIL while it runs
            if lib.cuInit(0) != 0:
                self.error = "cuInit failed"
                return
            if lib.cuDeviceGet(ctypes.byref(self._device), self.index) != 0:
                self.error = f"no CUDA device {self.index}"
                return
            context = ctypes.c_void_p()
            if lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), self._device) != 0:
                self.error = "cuDevicePrimaryCtxRetain failed"
                return
            self._lib, self.retained = lib, True
        except (OSError, AttributeError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            timing.add("context_prime", time.perf_counter() - start)

    def wait(self) -> None:
        """Until the context is made (or the attempt ended). A thread about to make torch's first CUDA
        call waits here: torch's device switch makes the context with the GIL held, which would stop
        every other thread's Python for as long."""
        self._thread.join()

    def release(self) -> None:
        """Drop this reference (after torch took its own, the context stays; otherwise it is freed)."""
        self._thread.join()
        if self.retained and self._lib is not None:
            release = getattr(self._lib, "cuDevicePrimaryCtxRelease_v2", None)
            release = release or self._lib.cuDevicePrimaryCtxRelease
            release(self._device)
            self.retained = False


def prime(device: torch.device) -> PrimedContext | None:
    """Start making ``device``'s primary context (None: not CUDA). Also when torch's CUDA is initialized
    already: that (importing bitsandbytes does it, for one) reads device properties and makes no
    context; a context already made only gains a reference, for the load's duration."""
    if device.type != "cuda":
        return None
    index = device.index
    if index is None:  # torch's current device; 0 (the first visible one) until torch initializes
        index = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
    return PrimedContext(index)
