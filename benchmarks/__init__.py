"""Benchmarks and the GPU scripts' harnesses; :func:`write_json` is their one way to write a result file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` under a temporary name, then rename it: a run killed mid-write leaves
    the previous version whole. The benchmarks rewrite their JSON after every row this way, so a time limit
    keeps every row measured before it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)
