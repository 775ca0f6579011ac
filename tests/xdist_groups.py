"""The suite on pytest-xdist's workers (``make test``: ``-n <cores> --dist loadgroup``).

A test that uses one of ``SHARED_FIXTURES`` (each builds something slow once per process: a 2-rank run, the kernel
compiles, a compiled emulation library, a data set) joins that fixture's group. A group runs on one worker, so each
is built once per run, and the groups start first, costliest first (the tuple's order); the other tests spread one
by one. pytest-xdist's own ``loadgroup`` keys a group on a suffix it writes into the test ids, which pytest 9.2's
ids no longer take, so here each worker writes its tests' groups to a file the scheduler reads once every worker
has collected. ``built_once`` builds a folder once for all the workers of a run.
"""
from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from pathlib import Path

import pytest

SHARED_FIXTURES = ("compile_job", "nvcc_results", "pretrain_run", "two_ranks", "reference", "emu", "full_check",
                   "demo", "emu_lib", "tiny", "betons", "photos", "timm_vit_base", "images")
_KEY = "lomar_test_groups"  # the folder the workers write their groups into (the controller's stash, workerinput)
_FOLDER = pytest.StashKey[Path]()


def group_of(item) -> str | None:
    """The group of a test: the first of ``SHARED_FIXTURES`` it uses (directly or through another fixture)."""
    names = getattr(item, "fixturenames", ())
    return next((name for name in SHARED_FIXTURES if name in names), None)


def _worker_folder(config) -> Path | None:
    folder = getattr(config, "workerinput", {}).get(_KEY)
    return None if folder is None else Path(folder)


def pytest_configure(config):
    if getattr(config.option, "dist", "no") == "loadgroup" and not hasattr(config, "workerinput"):
        config.stash[_FOLDER] = folder = Path(tempfile.mkdtemp(prefix="lomar_test_groups_"))
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    if _FOLDER in node.config.stash:
        node.workerinput[_KEY] = str(node.config.stash[_FOLDER])


def pytest_collection_modifyitems(config, items):
    if _worker_folder(config) is None:  # one process (or another --dist): no groups to keep
        return
    for item in items:
        if (group := group_of(item)) is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    rank = {name: i for i, name in enumerate(SHARED_FIXTURES)}
    items.sort(key=lambda item: rank.get(group_of(item), len(rank)))  # stable: the rest keep their order


@pytest.hookimpl(tryfirst=True)  # before the worker reports its collection
def pytest_collection_finish(session):
    if (folder := _worker_folder(session.config)) is not None:
        groups = {item.nodeid: str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                  for item in session.items for mark in item.iter_markers("xdist_group")}
        (folder / f"{session.config.workerinput['workerid']}.json").write_text(json.dumps(groups))


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` by the ``xdist_group`` marks each worker reports, groups in collection order."""
    if config.getvalue("dist") != "loadgroup" or _FOLDER not in config.stash:
        return None
    from xdist.scheduler import LoadScopeScheduling

    folder = config.stash[_FOLDER]

    class MarkedGroups(LoadScopeScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # first asked once every worker has collected
                self.groups = {}
                for f in sorted(folder.glob("*.json")):
                    self.groups.update(json.loads(f.read_text()))
            return self.groups.get(nodeid, nodeid)

    config.option.loadscopereorder = False  # the groups come first already, costliest first
    return MarkedGroups(config, log)


def built_once(request, tmp_path_factory, name: str, build) -> Path:
    """The folder ``name`` that ``build(folder)`` fills, built once per test run: pytest-xdist's workers share one
    copy (the first to ask builds it under a lock; the others wait for it, then reuse it)."""
    base = Path(tmp_path_factory.getbasetemp())
    if hasattr(request.config, "workerinput"):
        base = base.parent  # the run's folder, above each worker's own
    folder, done = base / f"shared_{name}", base / f"shared_{name}.done"
    with open(base / f"shared_{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            if folder.exists():  # a build that failed part-way
                shutil.rmtree(folder)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder
