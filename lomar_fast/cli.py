"""The command-line wrapper of the entry points."""
from __future__ import annotations

import gc
import sys
from typing import Callable

from lomar_fast.errors import InputError, NonFiniteLoss


def run_cli(main: Callable[[], object]) -> None:
    """Run an entry point. The project's own input errors (:class:`~lomar_fast.errors.InputError`: a flag,
    a file or a combination that cannot work) exit 2 with their one-line message; a non-finite loss exits
    3; anything else keeps its traceback.

    When ``main`` returns, or stops on a non-finite loss (which every rank raises at the same read-back), the
    ranks take their process group down together (:func:`~lomar_fast.distributed.shutdown_distributed`: left to
    the interpreter's exit, it could abort one rank, exit -6 in place of 0 or 3, and with it the launcher's other
    ranks); an input error, which other ranks may not share, leaves it. When ``main`` returns, every object left
    is then moved out of the cyclic collector's reach (``gc.freeze``): the interpreter's exit otherwise spends most
    of its time in the collector, walking every object of a process that holds torch, DeepSpeed and numba (a tiny
    CPU run's exit took 2.3-3 s, 0.6 s frozen, on 2 cores). Files and logs are closed by then; what is left is
    freed when the process ends."""
    from lomar_fast.distributed import shutdown_distributed

    try:
        main()
        shutdown_distributed()
        gc.freeze()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        shutdown_distributed()
        sys.exit(3)
