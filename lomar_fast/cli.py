"""The command-line wrapper of the entry points."""
from __future__ import annotations

import sys
from typing import Callable

from lomar_fast.errors import InputError, NonFiniteLoss


def run_cli(main: Callable[[], object]) -> None:
    """Run an entry point. The project's own input errors (:class:`~lomar_fast.errors.InputError`: a flag,
    a file or a combination that cannot work) exit 2 with their one-line message; a non-finite loss exits
    3; anything else keeps its traceback."""
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
