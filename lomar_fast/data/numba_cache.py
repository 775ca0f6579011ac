"""Keep numba's typed-dict helpers compiled on disk across processes.

Importing FFCV fills a module-level ``numba.typed.Dict``; numba compiles that dict's helpers (make, set, get,
...) on the first use in every process, which costs about 3.5 s of each rank's start on a desktop CPU. The
helpers are plain module-level functions without closures or global state, so numba's own on-disk cache
(the one ``@njit(cache=True)`` uses, in ``__pycache__`` or ``NUMBA_CACHE_DIR``) keeps them valid: after the
first start they load in well under a second. Call :func:`cache_typed_dict_helpers` before importing FFCV.
``LOMAR_NUMBA_DICT_CACHE=0`` leaves numba as it is; so does a machine where numba finds no writable cache
location (the helpers then compile in each process, as without this module).
"""
from __future__ import annotations

import os

_HELPERS = ("_make_dict", "_setitem", "_getitem", "_get", "_contains", "_length", "_delitem", "_setdefault",
            "_popitem", "_copy", "_iter")
_done = False


def cache_typed_dict_helpers() -> bool:
    """Turn on numba's disk cache for ``numba.typed.typeddict``'s helpers; returns whether it is on."""
    global _done
    if _done or os.environ.get("LOMAR_NUMBA_DICT_CACHE", "1") == "0":
        return _done
    try:
        import numba.typed.typeddict as typeddict
    except ImportError:  # numba moved its typed dict: FFCV's import just compiles as before
        return False
    try:
        for name in _HELPERS:
            helper = getattr(typeddict, name, None)
            if hasattr(helper, "enable_caching"):
                helper.enable_caching()
    except (RuntimeError, OSError):  # no writable cache location (read-only site-packages and home): compile
        return False
    _done = True
    return True
