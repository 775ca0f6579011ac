"""A CPU stand-in for ``torch.cuda.set_sync_debug_mode``: count the calls that make the host wait for a GPU.

On a GPU the host runs ahead of the device until something needs a device value (``loss.item()``,
``if grad_norm.isfinite():``), a blocking copy, or an explicit synchronize. On the CPU nothing waits, so this
module counts those calls themselves, with the source line that made each one:

- reads of tensor values on the host: ``Tensor.item / __bool__ / __float__ / __int__ / __index__ /
  __format__ / tolist / numpy / cpu``, ``.to("cpu")``, ``torch.equal``, ``is_nonzero``, and the ops whose
  output size depends on the data (``nonzero``, ``argwhere``, ``masked_select``, ``unique``,
  ``repeat_interleave`` without ``output_size``);
- blocking host-to-device copies: ``torch.tensor / as_tensor / scalar_tensor`` placed on the accelerator;
- explicit waits: DeepSpeed's ``get_accelerator().synchronize()``, ``torch.cuda.synchronize()``, and
  ``synchronize()`` of an accelerator stream or event.

DeepSpeed's CPU accelerator says it is a synchronous device, and DeepSpeed then skips every wait it needs on
a GPU (``if not get_accelerator().resolves_data_dependency(): ...synchronize()``). ``gpu_like_accelerator()``
makes it answer like the CUDA accelerator, with inert streams and events whose ``synchronize()`` is counted
and whose ``query()`` says "not done yet" (the state of a GPU the host is ahead of), so DeepSpeed takes its GPU
code paths on the CPU. Enter it before ``deepspeed.initialize``: DeepSpeed creates its streams there.

Known blind spot: a ``.to(device)`` or ``copy_`` between host and device cannot be told from a no-op when
both are the CPU, so only the forms above are counted.
"""
from __future__ import annotations

import contextlib
import os
import traceback
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

HOST_READS = frozenset({"item", "__bool__", "__float__", "__int__", "__index__", "__format__", "__array__", "tolist",
                        "numpy", "cpu", "equal", "is_nonzero", "nonzero", "argwhere", "masked_select", "unique",
                        "unique_consecutive"})
H2D_FACTORIES = frozenset({"tensor", "as_tensor", "scalar_tensor"})

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_SKIP_FILES = (os.path.abspath(__file__), contextlib.__file__)
_ACTIVE: list["HostSyncCounter"] = []


@dataclass(frozen=True)
class SyncEvent:
    """One counted call: ``kind`` is read | h2d | wait; ``caller`` the line that made the call (may be inside
    torch, e.g. an optimizer); ``origin`` the innermost line outside torch (who asked for it)."""

    kind: str
    op: str
    caller: str
    origin: str

    def __str__(self) -> str:
        via = f" (via {self.caller})" if self.caller != self.origin else ""
        return f"{self.kind} {self.op} at {self.origin}{via}"


def _short(frame: traceback.FrameSummary) -> str:
    path = frame.filename
    for marker in ("site-packages" + os.sep, os.sep + "lomar_fast" + os.sep, os.sep + "tests" + os.sep,
                   os.sep + "benchmarks" + os.sep):
        if marker in path:
            keep = path.split(marker, 1)[1]
            path = keep if marker.startswith("site") else marker.strip(os.sep) + os.sep + keep
            break
    return f"{path}:{frame.lineno} {frame.name}"


def _where() -> tuple[str, str]:
    stack = [f for f in traceback.extract_stack()[:-1] if os.path.abspath(f.filename) not in _SKIP_FILES]
    if not stack:
        return "?", "?"
    caller = stack[-1]
    origin = next((f for f in reversed(stack) if not f.filename.startswith(_TORCH_DIR)), caller)
    return _short(caller), _short(origin)


class _AcceleratorName(str):
    """The accelerator's device name, marked so that a tensor placed on it can be told from one placed on the host."""


def _device_arg(args: tuple, kwargs: dict):
    if "device" in kwargs:
        return kwargs["device"]
    return next((a for a in args if isinstance(a, (str, torch.device))), None)


class _Mode(TorchFunctionMode):
    def __init__(self, counter: "HostSyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        kind = None
        if name in HOST_READS:
            kind = "read"
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            kind = "read"
        elif name == "to":
            target = _device_arg(args[1:], kwargs)
            if isinstance(target, str) and not isinstance(target, _AcceleratorName) and target.startswith("cpu"):
                kind = "read"
        elif name in H2D_FACTORIES and isinstance(kwargs.get("device"), _AcceleratorName):
            kind = "h2d"
        if kind is not None:
            self.counter.record(kind, name)
        return func(*args, **kwargs)


class HostSyncCounter:
    """Context manager counting host syncs (see the module docstring) made while it is active.

    ``events`` lists them in order; ``count(prefix)`` counts those whose origin starts with ``prefix``
    (e.g. ``"deepspeed/"``); ``lines()`` gives a sorted "N x event" summary.
    """

    def __init__(self, device_waits_only: bool = False) -> None:
        """``device_waits_only``: on a GPU, where ``torch.cuda.set_sync_debug_mode`` reports the reads and the
        blocking copies but not the waits on the device or on an event, count only those waits:
        ``torch.cuda.synchronize()`` (DeepSpeed's CUDA accelerator calls it) and ``torch.cuda.Event.synchronize()``."""
        self.events: list[SyncEvent] = []
        self.device_waits_only = device_waits_only
        self._mode = _Mode(self)
        self._restore: list = []

    def record(self, kind: str, op: str) -> None:
        caller, origin = _where()
        self.events.append(SyncEvent(kind, op, caller, origin))

    def count(self, origin_prefix: str = "") -> int:
        return sum(e.origin.startswith(origin_prefix) for e in self.events)

    def lines(self) -> list[str]:
        counts: dict[str, int] = {}
        for e in self.events:
            counts[str(e)] = counts.get(str(e), 0) + 1
        return [f"{n} x {s}" for s, n in sorted(counts.items())]

    def _wrap_wait(self, owner, attr: str, op: str) -> None:
        original = getattr(owner, attr)
        own = attr in getattr(owner, "__dict__", {})
        counter = self

        def waiting(*args, **kwargs):
            counter.record("wait", op)
            return original(*args, **kwargs)

        setattr(owner, attr, waiting)
        self._restore.append((owner, attr, original, own))

    def __enter__(self) -> "HostSyncCounter":
        self._wrap_wait(torch.cuda, "synchronize", "torch.cuda.synchronize")
        if self.device_waits_only:
            self._wrap_wait(torch.cuda.Event, "synchronize", "torch.cuda.Event.synchronize")
            return self
        accelerator = _deepspeed_accelerator()
        if accelerator is not None:
            self._wrap_wait(accelerator, "synchronize", "accelerator.synchronize")
        _ACTIVE.append(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if not self.device_waits_only:
            self._mode.__exit__(*exc)
            _ACTIVE.remove(self)
        for owner, attr, original, own in reversed(self._restore):
            if own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)  # the instance attribute hid the class's method
        self._restore.clear()


def _deepspeed_accelerator():
    import sys

    if "deepspeed" not in sys.modules:
        return None
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def _record_wait(op: str) -> None:
    for counter in _ACTIVE:
        counter.record("wait", op)


class _InertEvent:
    """An accelerator event on a device that is never done: ``query()`` is False, ``synchronize()`` is counted."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        _record_wait("event.synchronize")

    def elapsed_time(self, other) -> float:
        return 0.0


class _InertStream:
    """An accelerator stream whose work is never done: waits between streams are free, ``synchronize()`` is counted."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _InertEvent:
        return event if event is not None else _InertEvent()

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        _record_wait("stream.synchronize")


@contextlib.contextmanager
def gpu_like_accelerator() -> Iterator[None]:
    """Make DeepSpeed's CPU accelerator answer like an asynchronous GPU one (see the module docstring).

    Numerics do not change: the streams and events are inert and every op still runs on the CPU in order.
    """
    accelerator = _deepspeed_accelerator()
    if accelerator is None:
        raise RuntimeError("gpu_like_accelerator() needs deepspeed imported (DS_ACCELERATOR=cpu)")
    if accelerator.device_name() not in ("cpu",):
        raise RuntimeError(f"gpu_like_accelerator() is for DeepSpeed's CPU accelerator, not {accelerator.device_name()}")
    cls = type(accelerator)
    current = _InertStream()
    name = _AcceleratorName("cpu")
    instance = {
        "is_synchronized_device": lambda: False,
        "resolves_data_dependency": lambda: False,
        "handles_memory_backpressure": lambda: False,
        "current_stream": lambda device_index=None: current,
        "default_stream": lambda device_index=None: current,
        "device_name": lambda device_index=None: name,
        "current_device_name": lambda: name,
    }
    saved_class = {k: cls.__dict__[k] for k in ("Stream", "Event")}
    original_record_stream = torch.Tensor.record_stream

    def record_stream(self, stream):
        if isinstance(stream, _InertStream):
            return None
        return original_record_stream(self, stream)

    for k, fn in instance.items():
        setattr(accelerator, k, fn)
    cls.Stream = property(lambda self: _InertStream)
    cls.Event = property(lambda self: _InertEvent)
    torch.Tensor.record_stream = record_stream
    try:
        yield
    finally:
        torch.Tensor.record_stream = original_record_stream
        for k, v in saved_class.items():
            setattr(cls, k, v)
        for k in instance:
            delattr(accelerator, k)
