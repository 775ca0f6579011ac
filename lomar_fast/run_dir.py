"""The run directory (``--output_dir``): DeepSpeed checkpoint tags, ``latest``, retention, the resume rule.

Tags are named by family and epoch: ``epoch0007`` (pretraining), ``last_epoch0007`` and ``best_epoch0005``
(fine-tuning). A save is committed in three steps, so a kill at any moment leaves a loadable run:

1. every rank writes its part of the new tag with DeepSpeed (``latest`` untouched);
2. after all ranks returned, rank 0 writes ``<tag>/complete.json`` and then replaces ``latest``
   atomically (a temporary file renamed over it) when the family is the run's resume family;
3. only then are the family's tags beyond the newest ``--keep_last`` deleted.

A tag without ``complete.json`` is never loaded. The resume rule (``--resume``, ``lomar_fast.export``):

* ``auto`` or a run directory: the tag ``latest`` names; if it is missing or incomplete, the newest
  complete tag of the resume family; ``auto`` on a directory without any starts afresh;
* ``DIR/<family>`` (e.g. ``out/best``, ``out/last``): the newest complete tag of that family;
* a tag directory: that tag.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lomar_fast.errors import ConfigError

LATEST = "latest"
COMPLETE = "complete.json"
_TAG = re.compile(r"^(?:(?P<family>[a-z]+)_)?epoch(?P<epoch>\d{4,})$")
# files and folders a run writes besides its tags: what makes a directory "hold a run"
RUN_FILES = ("log.jsonl", "summary.json", "checkpoint-best.pth", LATEST)
UNIVERSAL = "universal"  # a tag converted for another rank count lives here while it is loaded
RUN_FOLDERS = ("tensorboard", "data_order", UNIVERSAL)


def tag_name(family: str, epoch: int) -> str:
    """``epoch0007`` for the family ``epoch``, ``<family>_epoch0007`` for the others."""
    return f"epoch{epoch:04d}" if family == "epoch" else f"{family}_epoch{epoch:04d}"


def parse_tag(name: str) -> tuple[str, int] | None:
    """(family, epoch) of a tag name, or None for another name."""
    m = _TAG.match(name)
    if not m:
        return None
    return m.group("family") or "epoch", int(m.group("epoch"))


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file()


def tags(root: Path, family: str | None = None, complete_only: bool = True) -> list[str]:
    """Tag names under ``root`` (of ``family``, when given), oldest epoch first."""
    found = []
    if root.is_dir():
        for d in root.iterdir():
            parsed = parse_tag(d.name)
            if parsed and d.is_dir() and (family is None or parsed[0] == family) and (
                    not complete_only or is_complete(d)):
                found.append((parsed[1], d.name))
    return [name for _, name in sorted(found)]


def holds_run(root: Path) -> list[str]:
    """What in ``root`` belongs to an earlier run (empty when there is nothing)."""
    if not root.is_dir():
        return []
    found = [n for n in RUN_FILES + RUN_FOLDERS if (root / n).exists()]
    return found + tags(root, complete_only=False)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(root: Path, tag: str, info: dict[str, Any], update_latest: bool) -> None:
    """Rank 0, after every rank finished writing ``tag``: mark it complete, then point ``latest`` at it."""
    _atomic_write(root / tag / COMPLETE, json.dumps(info, indent=1, default=str))
    if update_latest:
        _atomic_write(root / LATEST, tag)


def uncommit(root: Path, tag: str) -> bool:
    """Rank 0, before ``tag`` is written again (a resumed run re-saving an epoch): drop its completion mark,
    so that a save cut short leaves an incomplete tag rather than one marked complete over mixed files.
    Returns whether there was a mark."""
    mark = root / tag / COMPLETE
    if not mark.is_file():
        return False
    mark.unlink()
    return True


def retire(root: Path, family: str, keep: int) -> list[str]:
    """Delete the family's tags beyond the newest ``keep`` complete ones, and incomplete leftovers older
    than the newest complete tag; never the tag ``latest`` names. Returns the deleted names."""
    complete = tags(root, family)
    keep_set = set(complete[-keep:])
    latest = root / LATEST
    if latest.is_file():
        keep_set.add(latest.read_text().strip())
    newest = parse_tag(complete[-1])[1] if complete else -1
    gone = []
    for name in tags(root, family, complete_only=False):
        if name not in keep_set and (name in complete or parse_tag(name)[1] < newest):
            shutil.rmtree(root / name, ignore_errors=True)
            gone.append(name)
    return gone


@dataclass
class ResumePoint:
    root: str
    tag: str

    def __str__(self) -> str:
        return f"{self.root}/{self.tag}"


def find_resume(resume: str | None, output_dir: str, family: str, flag: str = "--resume") -> ResumePoint | None:
    """Where to resume from, by the rule in the module doc; None to start afresh. ``flag`` names the option the
    path came from in the errors (export reads a run by the same rule through ``--checkpoint``)."""
    if not resume:
        return None
    auto = resume == "auto"
    root = Path(output_dir if auto else resume)
    or_auto = " or 'auto'" if flag == "--resume" else ""
    if not auto and root.is_dir() and parse_tag(root.name) and not (root / LATEST).exists():  # a tag directory
        if not is_complete(root):
            raise ConfigError(f"{flag} {root} is an incomplete checkpoint tag (its save was interrupted); pass the run "
                              f"folder {root.parent} to take its newest complete tag")
        return ResumePoint(str(root.parent), root.name)
    if not auto and not root.exists():
        if root.parent.is_dir() and re.fullmatch(r"[a-z]+", root.name):  # DIR/<family>
            return _newest(root.parent, root.name, resume, flag)
        raise ConfigError(f"{flag} {root} does not exist; pass a run's --output_dir, a tag directory{or_auto}")
    latest = root / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if is_complete(root / tag):
            return ResumePoint(str(root), tag)
    point = _newest(root, family, None, flag)
    if point is None and not auto:
        raise ConfigError(f"{flag} {root}: no complete checkpoint there; pass a run's --output_dir{or_auto}")
    return point


def _newest(root: Path, family: str, asked: str | None, flag: str) -> ResumePoint | None:
    found = tags(root, family)
    if found:
        return ResumePoint(str(root), found[-1])
    if asked is not None:
        families = sorted({parse_tag(t)[0] for t in tags(root)})
        if not families:  # most likely a mistyped folder name, not a family
            raise ConfigError(f"{flag} {asked} does not exist, and {root} holds no complete checkpoint; pass a run's "
                              f"--output_dir, a tag directory or DIR/<family> of a run")
        raise ConfigError(f"{flag} {asked}: no complete '{family}' checkpoint in {root} (tag families there: "
                          f"{', '.join(families) or 'none'})")
    return None


def saved_run(point: ResumePoint) -> dict[str, Any]:
    """What a complete tag's ``complete.json`` says of its run: ``world_size``, ``micro_batch``, ``accum_iter``,
    ``zero_stage`` and ``config`` (the run's settings); {} when it says nothing."""
    try:
        info = json.loads(Path(point.root, point.tag, COMPLETE).read_text())
    except (OSError, ValueError):
        return {}
    run = info.get("run") if isinstance(info, dict) else None
    return run if isinstance(run, dict) else {}


def saved_shapes(point: ResumePoint) -> dict[str, tuple[int, ...]]:
    """The shape of each model tensor a tag holds, from its ``*model_states.pt`` (the module's tensors, which
    ZeRO-3 leaves empty, and DeepSpeed's ``param_shapes``), read without loading the weights; {} when unreadable."""
    import torch

    files = sorted(Path(point.root, point.tag).glob("*model_states.pt"))
    if not files:
        return {}
    try:
        states = torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable: DeepSpeed's own load says why
        return {}
    if not isinstance(states, dict):
        return {}
    shapes = {k: tuple(v.shape) for k, v in (states.get("module") or {}).items() if isinstance(v, torch.Tensor)}
    for group in states.get("param_shapes") or []:
        shapes.update({k: tuple(v) for k, v in group.items()})
    return shapes


def _probe_writable(folder: Path, keep: bool = True) -> None:
    """Create ``folder`` if needed and write and delete a file in it; OSError if either fails. With ``keep``
    false the folders it created are removed again: the run creates them when it writes, and one made by a check
    would outlive a run stopped by a later input error (in --output_dir it would count as an earlier run)."""
    made = [d for d in (folder, *folder.parents) if not d.exists()]  # the deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    finally:
        for d in made if not keep else ():
            try:
                d.rmdir()
            except OSError:
                break


def _unwritable(folder: Path, e: OSError) -> str:
    """Why ``folder`` could not be created or written, in words."""
    blocking = next((d for d in (folder, *folder.parents) if d.exists() and not d.is_dir()), None)
    if blocking is not None:
        return f"{blocking} is a file, not a folder"
    where = f"cannot write in {folder}" if folder.is_dir() else f"cannot create the folder {folder}"
    return f"{where} ({e.strerror or e})"


def check_writable_later(path: str | os.PathLike, flag: str) -> None:
    """Check that ``path`` is or can become a folder this process writes, leaving behind no folder the check
    made (for a folder the run creates only when it starts writing, such as --log_dir)."""
    p = Path(path)
    try:
        _probe_writable(p, keep=False)
    except OSError as e:
        raise ConfigError(f"{flag} {p}: {_unwritable(p, e)}; pass a folder you can write to") from None


def writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create ``path`` if needed and prove it is writable; ConfigError naming ``flag`` otherwise."""
    p = Path(path)
    try:
        _probe_writable(p)
    except OSError as e:
        raise ConfigError(f"{flag} {p} is not writable ({e.strerror}); pass a directory you can write to") from e
    return p


def prepare_output_dir(path: str | os.PathLike, resume: str | None, overwrite: bool) -> Path:
    """Create ``path`` if needed, prove it is writable, and refuse a fresh start over an earlier run.

    Called before any work. With ``overwrite`` the earlier run's files are deleted later, by
    :func:`clear_run` on rank 0, once every check of the run's inputs has passed (just before its first write).
    """
    p = writable_dir(path, "--output_dir")
    found = holds_run(p)
    if found and not resume and not overwrite:
        shown = ", ".join(found[:6]) + (" ..." if len(found) > 6 else "")
        raise ConfigError(f"--output_dir {p} already holds a run ({shown}); continue it with --resume auto, start "
                          f"a new one with another --output_dir, or pass --overwrite to delete it and start afresh")
    return p


def prepare_output_file(path: str | os.PathLike, flag: str, example: str) -> Path:
    """Check an output file's path before any work: not a folder, and its folder writable (created to be probed,
    then removed again if the probe made it). ``flag`` and ``example`` (a file name to suggest) word the errors."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a folder; pass a file name such as {p / example}")
    try:
        _probe_writable(p.parent, keep=False)  # the writer creates the folder; a later input error leaves none
    except OSError as e:
        raise ConfigError(f"{flag} {p}: {_unwritable(p.parent, e)}; pass a path in a folder you can write to") from None
    return p


@contextmanager
def writing(path: str | os.PathLike, flag: str) -> Iterator[None]:
    """A failed write of the output file ``path`` (disk full, permissions) as one ConfigError naming ``flag``."""
    try:
        yield
    except OSError as e:
        raise ConfigError(f"{flag} {path} cannot be written ({e.strerror or e}); pass a path on a disk with room "
                          f"that you can write to") from None


def clear_run(root: Path) -> list[str]:
    """Delete what an earlier run wrote in ``root`` (``--overwrite``). Returns the names deleted."""
    gone = holds_run(root)
    for name in gone:
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    return gone


def check_resume(saved: dict[str, Any], now: dict[str, Any], model_keys: tuple[str, ...]) -> str | None:
    """Compare the shape of a saved run with this one.

    ``saved`` and ``now`` hold ``world_size``, ``micro_batch``, ``accum_iter``, ``zero_stage`` and ``config``
    (a dict of settings). A different model setting or global batch changes what a step means (the lr schedule
    keys on the epoch and the step in it, the window/mask stream on the step): ConfigError saying what differs. So does another
    ZeRO stage. The same global batch on another split of ranks, micro-batch and accumulation continues; the
    returned note says what changed (None when nothing did). Under ZeRO-1/2/3 another rank count goes through
    DeepSpeed's universal checkpoint (:func:`needs_universal`, :func:`convert_universal`).
    """
    old_cfg, new_cfg = saved.get("config") or {}, now["config"]
    diffs = [f"{k}: saved {old_cfg[k]!r}, now {new_cfg.get(k)!r}" for k in model_keys
             if k in old_cfg and old_cfg[k] != new_cfg.get(k)]
    if diffs:
        raise ConfigError("--resume: the checkpoint was trained with other model settings (" + "; ".join(diffs)
                          + "); pass the saved values or start a new --output_dir")
    if "world_size" not in saved or "micro_batch" not in saved:
        return None
    shape_old = (int(saved["world_size"]), int(saved["micro_batch"]), int(saved.get("accum_iter", 1)))
    shape_new = (int(now["world_size"]), int(now["micro_batch"]), int(now["accum_iter"]))
    stage_old, stage_new = saved.get("zero_stage"), now.get("zero_stage")  # absent in older checkpoints
    if stage_old is not None and stage_new is not None and int(stage_old) != int(stage_new):
        raise ConfigError(f"--resume: the checkpoint was written under ZeRO-{stage_old}, this run uses ZeRO-{stage_new}; "
                          f"DeepSpeed loads a checkpoint under the stage that wrote it: pass --zero_stage {stage_old} "
                          f"or start a new --output_dir")
    g_old, g_new = shape_old[0] * shape_old[1] * shape_old[2], shape_new[0] * shape_new[1] * shape_new[2]
    what = "world size {} x micro-batch {} x accum_iter {}"
    if g_old != g_new:
        raise ConfigError(f"--resume: the checkpoint was trained with {what.format(*shape_old)} = {g_old} images per "
                          f"step, this run has {what.format(*shape_new)} = {g_new}; the lr schedule and the "
                          f"window/mask stream are per step, so keep the global batch {g_old} (e.g. --batch_size "
                          f"{max(1, g_old // (shape_new[0] * shape_new[2]))}) or start a new --output_dir")
    if shape_old != shape_new:
        held = "weights and optimizer state are" if int(stage_old or 0) == 3 else "optimizer state is"
        via = (f"; its ZeRO-{stage_old} {held} one file per saved rank, converted into DeepSpeed's "
               f"universal checkpoint first" if needs_universal(saved, now) else "")
        return (f"resuming a run of {what.format(*shape_old)} as {what.format(*shape_new)}: the same {g_new} images "
                f"per step and the same lr schedule; the per-rank data shards and random draws (windows and masks, or "
                f"augmentations) differ from an uninterrupted run's{via}")
    return None


def needs_universal(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether resuming ``saved`` as ``now`` (see :func:`check_resume`) needs DeepSpeed's universal checkpoint:
    another rank count under ZeRO-1/2/3, whose optimizer state (and under ZeRO-3 the weights) DeepSpeed splits
    into one file per rank and loads as it is only on the rank count that wrote it."""
    if "world_size" not in saved:
        return False
    stage = max(int(saved.get("zero_stage") or 0), int(now.get("zero_stage") or 0))
    return stage in (1, 2, 3) and int(saved["world_size"]) != int(now["world_size"])


def universal_param_groups(tag_dir: Path) -> list[dict]:
    """The optimizer's parameter groups (settings and parameter ids) as the run that wrote the universal
    checkpoint ``tag_dir`` had them: ``zero/optimizer_state.pt``, read without loading the tensors it also holds."""
    import torch

    path = Path(tag_dir, "zero", "optimizer_state.pt")
    if not path.is_file():
        raise ConfigError(f"--resume: {path} is missing from the universal checkpoint of {tag_dir}; delete "
                          f"{Path(tag_dir).parent} so that the next start converts the tag again")
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["param_groups"]


def settle_universal_load(optimizer, tag_dir: Path) -> None:
    """After DeepSpeed 0.19.8 loaded the universal checkpoint ``tag_dir`` into ``optimizer`` (the engine's base
    optimizer): each parameter group's settings as the checkpoint has them, and each Adam state a step of its
    own, on its parameter's device where the optimizer is fused (lomar_fast.optim's ``restore_group_settings``
    and ``place_steps`` say what DeepSpeed's load gets wrong)."""
    from lomar_fast.optim import place_steps, restore_group_settings

    restore_group_settings(optimizer, universal_param_groups(tag_dir))
    place_steps(optimizer)


def convert_universal(tag_dir: Path, out_dir: Path, python: str = sys.executable, timeout: float = 3600) -> Path:
    """Convert the complete DeepSpeed tag ``tag_dir`` into a universal checkpoint at ``out_dir`` (DeepSpeed's
    ``ds_to_universal``: each parameter's fp32 weights and Adam moments whole, loadable on any rank count).
    Kept when an earlier conversion of the same tag finished; ``<out_dir>/complete.json`` marks a finished one.
    Returns ``out_dir``."""
    done = out_dir / COMPLETE
    if done.is_file() and json.loads(done.read_text()).get("source") == str(tag_dir.resolve()):
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    workers = str(max(1, min(8, os.cpu_count() or 1)))
    cmd = [python, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out_dir), "--num_extract_workers", workers, "--num_merge_workers", workers,
           "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"DeepSpeed's universal-checkpoint conversion of {tag_dir} failed (exit {proc.returncode}):\n"
                           + (proc.stdout + proc.stderr)[-3000:])
    _atomic_write(done, json.dumps({"source": str(tag_dir.resolve()), "time": time.time()}))
    return out_dir
