"""Benchmarks and the GPU scripts' harnesses; :func:`write_json` is their one way to write a result file, and
:func:`pack_results` hands a results folder to a place that takes only a few files."""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any, Sequence


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` under a temporary name, then rename it: a run killed mid-write leaves
    the previous version whole. The benchmarks rewrite their JSON after every row this way, so a time limit
    keeps every row measured before it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def pack_results(src: Path, dest: Path, archive: str, summaries: Sequence[str] = (),
                 skip: Sequence[Path] = ()) -> list[Path]:
    """Copy the files ``summaries`` (paths relative to ``src``, where present) into ``dest`` under their base
    names, then write all of ``src`` but the folders ``skip`` (data, checkpoints) as the gzipped tar
    ``dest/archive``; each file goes under a temporary name first and is renamed. A GPU device call returns at most 8 files from its output folder: the summaries to
    read at once, and the archive for everything else (logs, per-stage JSON, tables). Returns the files written."""
    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for rel in summaries:
        f = src / rel
        if f.is_file():
            tmp = dest / (f.name + ".partial")
            shutil.copyfile(f, tmp)
            tmp.replace(dest / f.name)
            written.append(dest / f.name)
    tmp = dest / (archive + ".partial")
    left_out = {Path(p).resolve() for p in skip}
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(src, arcname=".", filter=lambda info: None if (src / info.name).resolve() in left_out else info)
    tmp.replace(dest / archive)
    written.append(dest / archive)
    return written
