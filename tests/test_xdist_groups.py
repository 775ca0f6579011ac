"""The suite's grouping on pytest-xdist's workers (tests/xdist_groups.py), on a small suite of its own run in a
fresh pytest: the tests that share a slow fixture run on one worker, first, and set it up once; ``built_once``
builds once for all the workers; without workers the same suite runs in one process."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CONFTEST = f"""
import json, os, sys, time
sys.path.insert(0, {str(TESTS)!r})
from xdist_groups import (built_once, pytest_collection_finish, pytest_collection_modifyitems, pytest_configure,
                          pytest_configure_node, pytest_xdist_make_scheduler)
import pytest

def log(kind, name):
    with open(os.environ["GROUPS_LOG"], "a") as f:
        f.write(json.dumps({{"kind": kind, "name": name, "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                            "t": time.monotonic()}}) + "\\n")

@pytest.fixture(scope="session")
def pretrain_run():
    log("setup", "pretrain_run")
    time.sleep(0.3)

@pytest.fixture(scope="module")
def emu():
    log("setup", "emu")

@pytest.fixture(scope="session")
def data(request, tmp_path_factory):
    def build(folder):
        log("build", "data")
        time.sleep(0.5)  # long enough for the other worker to ask meanwhile
        (folder / "x").write_text("built")
    return built_once(request, tmp_path_factory, "data", build)
"""

SUITE = """
import pytest
from conftest import log

@pytest.mark.parametrize("i", range(3))
def test_plain_before(i, data):
    assert (data / "x").read_text() == "built"
    log("run", "plain")

@pytest.mark.parametrize("i", range(4))
def test_uses_the_run(i, pretrain_run):
    log("run", "pretrain_run")

@pytest.mark.parametrize("i", range(3))
def test_uses_the_library(i, emu, data):
    log("run", "emu")

@pytest.mark.parametrize("i", range(5))
def test_plain_after(i, data):
    log("run", "plain")
"""


def run_suite(tmp_path: Path, *args: str) -> list[dict]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "test_more.py").write_text(SUITE)
    logfile = tmp_path / "log.jsonl"
    env = {"GROUPS_LOG": str(logfile), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "30 passed" in proc.stdout, proc.stdout[-2000:]
    return [json.loads(line) for line in logfile.read_text().splitlines()]


def test_tests_sharing_a_slow_fixture_run_on_one_worker_first_and_set_it_up_once(tmp_path):
    pytest.importorskip("xdist")
    log = run_suite(tmp_path, "-n", "2", "--dist", "loadgroup")
    setups = [e for e in log if e["kind"] == "setup"]
    # one pretraining run for all 8 tests that use it (in both files); the library is module-scoped: once per file
    assert [e["name"] for e in setups].count("pretrain_run") == 1, setups
    assert [e["name"] for e in setups].count("emu") == 2, setups
    for name in ("pretrain_run", "emu"):
        runs = [e for e in log if e["kind"] == "run" and e["name"] == name]
        assert len(runs) == (8 if name == "pretrain_run" else 6)
        assert len({e["worker"] for e in runs}) == 1, (name, runs)  # the group stays on one worker
        worker = runs[0]["worker"]
        mine = [e for e in log if e["kind"] == "run" and e["worker"] == worker]
        assert all(e["name"] == name for e in mine[:len(runs)]), mine  # and runs before that worker's other tests
    assert len({e["worker"] for e in log if e["kind"] == "run"}) == 2  # both workers ran tests
    assert [e["kind"] for e in log].count("build") == 1, log  # built once, though both workers asked for it


def test_the_same_suite_runs_in_one_process(tmp_path):
    log = run_suite(tmp_path, "-p", "no:xdist")
    assert {e["worker"] for e in log} == {"main"}
    assert [e["kind"] for e in log].count("build") == 1
    assert [e["name"] for e in log if e["kind"] == "setup"].count("pretrain_run") == 1
