"""FFCV's page-cache reader, typed without changing numba's shared types.

FFCV 1.0.2's ``OSCacheManager`` builds its reader's signature by setting ``mutable = False`` on the array type
that ``numba.uint8[::1]`` returns. numba interns its types (one object per type), so that line turns every
writable 1-D C-contiguous uint8 array type of the process read-only, and it changes the hash of that object while
numba's dispatchers hold it as part of their signature keys. Each loader after the first did it again: a
dispatcher whose signature held such an array (FFCV's ``imdecode``, for one) could no longer list its own
signatures, so freeing it printed a ``KeyError`` from numba's finalizer, and compiling a new caller of it failed.

:func:`type_os_cache_reader_apart` gives ``OSCacheManager`` a reader of the same code and the same signature
(the file's bytes read-only, the offset tables writable, a read-only slice back) made of types of its own.
"""
from __future__ import annotations

import numba as nb
import numpy as np


def _state_type(_manager=None):
    """The page-cache state the reader takes: (the file's bytes, read-only; the sorted sample addresses; their
    sizes)."""
    data = nb.types.Array(nb.uint8, 1, "C", readonly=True)
    table = nb.types.Array(nb.uint64, 1, "C")
    return nb.types.Tuple([data, table, table])


def _compile_reader(manager):
    """``read(address, state)``: the stored bytes of the sample at ``address`` (a read-only view)."""
    from ffcv.pipeline.compiler import Compiler

    state = _state_type()

    def read(address, mem_state):
        size = mem_state[2][np.searchsorted(mem_state[1], address)]
        return mem_state[0][address:address + size]

    return Compiler.compile(read, state.types[0](nb.uint64, state))


def type_os_cache_reader_apart() -> None:
    """Replace ``OSCacheManager``'s ``state_type`` and ``compile_reader`` (see the module doc); doing it again
    changes nothing."""
    try:
        from ffcv.memory_managers.os_cache import OSCacheManager
    except ImportError:  # without FFCV no loader is built (the loaders say so); a host that only benchmarks runs on
        return

    OSCacheManager.state_type = property(_state_type)
    OSCacheManager.compile_reader = _compile_reader
