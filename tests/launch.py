"""Start the entry points the way users do, in fresh processes on the CPU: one process through
``python -m``, or several ranks through the ``deepspeed`` launcher."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lomar_fast.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

__all__ = ["REPO", "VENV_BIN", "cpu_env", "free_port", "launch"]


def cpu_env() -> dict:
    """This environment on DeepSpeed's CPU accelerator, without a parent's distributed settings."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def launch(entry: str, args: list[str], ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``lomar_fast.<entry>`` (e.g. ``"pretrain"``) with ``args`` on ``ranks`` CPU ranks."""
    if ranks == 1:
        cmd = [sys.executable, "-m", f"lomar_fast.{entry}", *args]
    else:
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
               f"lomar_fast/{entry}.py", *args]
    return subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
