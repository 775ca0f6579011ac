"""``torch.compile`` for the entry points and the throughput benchmark: the same scopes and modes in both.

Scopes: ``blocks`` compiles each transformer block (``blocks`` and, for MAE, ``decoder_blocks``); the blocks
share one graph, so it compiles in seconds, and it is the configuration the throughput benchmark's
``compile`` rows time. ``model`` compiles the whole module's forward (window gather, mask token, loss
included); hooks on the module, such as a DeepSpeed engine's, stay outside the graph.

``--compile auto`` (the default) compiles on CUDA with ZeRO-0/1/2 and stays eager on a CPU (inductor's C++
code generation costs more than it saves in short CPU runs) and under ZeRO-3 (its parameter hooks fire inside
the blocks, and dynamo traces the partitioned parameters: ``--compile on`` with ZeRO-3 is refused). Evaluation runs eager (:func:`eager`): its no-grad, differently sized batches would otherwise add
graphs, and a dynamic-shape graph could take over the training shapes.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from lomar_fast.errors import ConfigError

SETTINGS = ("auto", "on", "off")
SCOPES = ("blocks", "model")
# inductor modes offered to the entry points; CUDA-graph modes are benchmark variants only
# (benchmarks/throughput.py: compile-model-cudagraphs)
MODES = ("default", "max-autotune-no-cudagraphs")
BLOCK_LISTS = ("blocks", "decoder_blocks")


def compile_decision(setting: str, device_type: str, zero_stage: int) -> tuple[bool, str]:
    """(compile or not, why) for ``--compile setting`` on a ``device_type`` ("cuda", "cpu") device under ZeRO
    ``zero_stage``. ``on`` under ZeRO-3 is a ConfigError: DeepSpeed partitions the parameters and gathers
    them in hooks around each submodule, and dynamo, tracing a block or the model, sees the empty partitions
    (the first step died of an IndexError inside the trace, with either scope)."""
    if setting == "on":
        if zero_stage >= 3:
            raise ConfigError("--compile on does not work under ZeRO-3: torch.compile traces DeepSpeed's "
                              "partitioned (empty) parameters; use --compile auto or off (eager), or a ZeRO-1/2 "
                              "config (ds_configs/zero2.json)")
        return True, "--compile on"
    if setting == "off":
        return False, "--compile off"
    if setting != "auto":
        raise ValueError(f"--compile {setting!r} must be one of {', '.join(SETTINGS)}")
    if device_type != "cuda":
        return False, f"--compile auto: eager on {device_type}"
    if zero_stage >= 3:
        return False, "--compile auto: eager under ZeRO-3"
    return True, f"--compile auto: compiled on cuda with ZeRO-{zero_stage}"


def apply_compile(model: nn.Module, scope: str, backend: str = "inductor", mode: str | None = None) -> int:
    """``torch.compile`` ``model`` in place: the whole module (``model``) or each block (``blocks``), with
    ``backend`` and, for inductor, ``mode`` (None or "default": inductor's default), static shapes. Returns
    the number of modules compiled."""
    if scope not in SCOPES:
        raise ValueError(f"compile scope {scope!r} must be one of {', '.join(SCOPES)}")
    # dynamic=False: a graph per input shape, each specialized (MAE's decoder blocks, the second shape dynamo
    # sees, otherwise got a dynamic-shape graph); training shapes are fixed, and evaluation runs eager
    kw: dict = {"dynamic": False}
    if backend != "inductor":
        kw["backend"] = backend
    if mode not in (None, "default"):
        if backend != "inductor":
            raise ValueError(f"compile mode {mode!r} is an inductor mode; the backend is {backend!r}")
        kw["mode"] = mode
    if scope == "model":
        # forward, not nn.Module.compile()'s _call_impl: a DeepSpeed engine hangs forward hooks on the module
        # it wraps, and dynamo, tracing them, gives up on the whole frame (the model then ran eager with
        # scattered partial graphs)
        model.forward = torch.compile(model.forward, **kw)
        return 1
    blocks = [blk for name in BLOCK_LISTS for blk in getattr(model, name, ())]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to compile; use the scope 'model'")
    for blk in blocks:
        blk.compile(**kw)
    return len(blocks)


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules eagerly inside the block (``torch.compiler.set_stance("force_eager")``)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # torch < 2.6: compiled modules stay compiled
        yield
        return
    with set_stance("force_eager"):
        yield
