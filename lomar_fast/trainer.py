"""The training loop both entry points share.

:class:`Trainer` owns the DeepSpeed engine, the loader epochs, the lr schedule, the loss meter,
checkpoint save and resume, seeding and logging. An entry point says only what differs: the model and
its parameter groups, the batch -> loss function, and the end-of-epoch work (k-NN, evaluation, best
tracking). The loop, top-down::

    for epoch:                                      seed this rank's streams from (seed, rank, epoch)
        for batch in loader:                        uint8 batch on the device
            lr := schedule(step); loss := step_fn(batch, info); backward; ZeRO step
            every --log_every steps: one host read of the loss, summed over ranks, and the
            seconds the host waited for the loader per step (data_wait_s)
        end_epoch(epoch)                            the entry point's work (evaluation, k-NN, best)
        every --save_every epochs: save the tag, commit it, retire old tags (lomar_fast.run_dir)
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lomar_fast import run_dir
from lomar_fast.compilation import apply_compile, compile_decision
from lomar_fast.config import RunConfig
from lomar_fast.distributed import all_reduce, barrier, init_distributed, pick_device, seed_rank, seed_shared
from lomar_fast.ds_config import load_ds_config, one_rank_engine, resolve_ds_config, zero_stage_of
from lomar_fast.precision import compute_dtype, param_dtype, resolve_precision
from lomar_fast.errors import CompileFailed, ConfigError, NonFiniteLoss
from lomar_fast.checkpoint import load_module_weights
from lomar_fast.logging_utils import RunLogger
from lomar_fast.optim import build_adamw, effective_lr, lr_at, set_lr


def plan_run(cfg: RunConfig, extra_ds: dict[str, Any] | None = None) -> tuple[torch.device, dict[str, Any], int]:
    """Everything about the run's shape that needs no process group: pick the device, apply ``cfg.kernels``,
    resolve the DeepSpeed JSON against the batch flags (the world size comes from the launcher's
    environment), merge ``extra_ds``, and write the resolved micro batch and accumulation back into ``cfg``.
    Returns (device, DeepSpeed config dict, world size)."""
    device = pick_device(cfg.device)
    os.environ.setdefault("DS_ACCELERATOR", device.type)  # before DeepSpeed is first imported
    ds_raw = load_ds_config(cfg.deepspeed_config)
    if cfg.kernels:
        from lomar_fast.ops._dispatch import set_kernels

        set_kernels(cfg.kernels)
    world = int(os.environ.get("WORLD_SIZE", 1))
    ds_cfg, cfg.batch_size, cfg.accum_iter = resolve_ds_config(
        ds_raw, batch_size=cfg.batch_size, accum_iter=cfg.accum_iter, world_size=world, explicit=cfg.explicit,
        zero_stage=cfg.zero_stage, device=device, source=f"--deepspeed_config {cfg.deepspeed_config}")
    ds_cfg.update(extra_ds or {})
    ds_cfg = resolve_precision(ds_cfg, device, f"--deepspeed_config {cfg.deepspeed_config}")  # after the merge
    return device, ds_cfg, world


class DeviceIdle:
    """How long the GPU sat idle before each step's work: the time between the previous step's last queued work
    and this step's first, from CUDA events, read at the loss read-back (which has synchronized by then). The
    host's own wait on the loader (``data_wait_s``) cannot show this when it runs ahead of the device: with no sync
    in the step, the host blocks while the GPU still works off queued steps. A no-op on a CPU."""

    def __init__(self, device: torch.device):
        self.on = device.type == "cuda"
        self.prev_end = None
        self.pairs: list = []

    def new_epoch(self) -> None:
        self.prev_end = None  # the gap across an epoch's end (checkpoint, k-NN) is not the loader's

    def step_starts(self) -> None:
        if self.on:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            if self.prev_end is not None:
                self.pairs.append((self.prev_end, start))

    def step_ends(self) -> None:
        if self.on:
            self.prev_end = torch.cuda.Event(enable_timing=True)
            self.prev_end.record()

    def read(self) -> float | None:
        """Mean idle seconds per step over the pairs whose events have completed (None on a CPU or for none)."""
        done, waiting = [], []
        for pair in self.pairs:  # one query per pair: a pair counts once its later event is done
            (done if pair[1].query() else waiting).append(pair)
        self.pairs = waiting
        if not done:
            return None
        return sum(a.elapsed_time(b) for a, b in done) / 1e3 / len(done)


class LossMeter:
    """Sums step losses on the device and reads them back only when due: the step's one host sync.

    ``read`` sums the partial sum over ranks first, so every rank sees the same global mean and reaches the
    same decision: a non-finite mean raises :class:`NonFiniteLoss` on all of them at the same step.
    """

    def __init__(self, device: torch.device, every: int, output_dir: str):
        self.device, self.every, self.output_dir = device, every, output_dir
        self.epoch_loss, self.epoch_steps = 0.0, 0
        self._reset()

    def _reset(self) -> None:
        self.total, self.n, self.t0 = torch.zeros((), device=self.device, dtype=torch.float64), 0, time.perf_counter()

    def start_epoch(self) -> None:
        self.epoch_loss, self.epoch_steps = 0.0, 0
        self._reset()

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach().double()
        self.n += 1

    def due(self, i: int, last_i: int) -> bool:
        return self.n == self.every or (i == last_i and self.n > 0)

    def read(self, epoch: int, step: int) -> tuple[float, int, float]:
        """(mean loss over the steps since the last read and over every rank, steps, seconds)."""
        total = all_reduce(self.total.clone())
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        value = float(total) / (self.n * world)  # the one host sync, every `every` steps
        if not math.isfinite(value):
            raise NonFiniteLoss(
                f"loss became {value} at epoch {epoch} step {step}; stopping. The last complete checkpoint under "
                f"{self.output_dir} is untouched: lower --blr or check the data, then --resume auto")
        n, dt = self.n, time.perf_counter() - self.t0
        self.epoch_loss += value * n
        self.epoch_steps += n
        self._reset()
        return value, n, dt

    @property
    def epoch_mean(self) -> float:
        return self.epoch_loss / max(self.epoch_steps, 1)


@dataclass
class StepInfo:
    """What a step function may need besides the batch."""

    epoch: int
    step: int  # optimizer-independent micro-step counter, the same on every rank
    index: int  # batch index within the epoch
    sample_ids: np.ndarray  # dataset indices of this rank's batch (the loader's order for this epoch)


StepFn = Callable[[Any, StepInfo], torch.Tensor]
EndEpochFn = Callable[[int, dict], dict]


class Trainer:
    """One DeepSpeed training run: see the module doc for the loop.

    Args:
        cfg: the run's config (``PretrainConfig`` or ``FinetuneConfig``), already validated.
        resume_family: the tag family ``latest`` follows and ``--resume auto`` continues ("epoch", "last").
        extra_ds: DeepSpeed settings merged over the JSON (e.g. gradient clipping from a flag).
    """

    def __init__(self, cfg: RunConfig, resume_family: str, extra_ds: dict[str, Any] | None = None):
        self.cfg, self.family = cfg, resume_family
        self.device, self.ds_cfg, self.world = plan_run(cfg, extra_ds)
        self.micro, self.accum = cfg.batch_size, cfg.accum_iter
        self.global_batch = self.micro * self.accum * self.world
        self.base_lr = effective_lr(cfg.blr, cfg.lr, self.global_batch)
        self.dtype = compute_dtype(self.ds_cfg)  # what the matmuls run in
        self.input_dtype = param_dtype(self.ds_cfg)  # what the model takes: fp32 under torch_autocast
        self.root = Path(cfg.output_dir)
        self.epoch, self.step, self.steps_per_epoch = 0, 0, 0
        self.state: dict[str, Any] = {}  # the entry point's own state, saved in every checkpoint
        self.loader = None
        self.engine = self.optimizer = None
        # decided now, so that --compile on under ZeRO-3 stops before any process group or work exists
        self.compiled, self.compile_why = compile_decision(cfg.compile, self.device.type, zero_stage_of(self.ds_cfg))
        self.compile_note = "eager"
        self.logger: RunLogger | None = None
        if not getattr(cfg, "eval", False):
            run_dir.prepare_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite)
            if cfg.log_dir and int(os.environ.get("RANK", "0")) == 0:  # only rank 0 writes TensorBoard
                run_dir.check_writable_later(cfg.log_dir, "--log_dir")
        # where to resume from, checked against this run's shape before any process group or work exists
        self.resume_point = run_dir.find_resume(cfg.resume, cfg.output_dir, resume_family)
        self.resume_note, self.universal = None, False
        if self.resume_point is not None and not getattr(cfg, "eval", False):
            saved = json.loads(Path(str(self.resume_point), run_dir.COMPLETE).read_text()).get("run", {})
            now = self.run_shape()
            self.resume_note = run_dir.check_resume(saved, now, type(cfg).MODEL_KEYS)
            # another rank count under ZeRO-1/2/3: load the tag converted into DeepSpeed's universal checkpoint
            self.universal = run_dir.needs_universal(saved, now)
            if self.universal:
                self.ds_cfg["checkpoint"] = {**self.ds_cfg.get("checkpoint", {}), "load_universal": True}
        self.resumed: run_dir.ResumePoint | None = None
        self.rank, self.world, _ = init_distributed(self.device)

    # ------------------------------------------------------------------------------------------ setup
    def set_loader(self, loader) -> None:
        """The training loader; its length (capped by --max_steps_per_epoch), rounded down to a multiple of
        --accum_iter, is the epoch. Whole accumulation groups per epoch mean every epoch ends on an optimizer
        step, where checkpoints are written: a resume then finds no half-accumulated gradients to miss (MAE's
        loop, which zeroes the gradients at each epoch's start, drops such a tail too)."""
        cap = self.cfg.max_steps_per_epoch
        self.loader = loader
        n = len(loader) if cap is None else min(len(loader), cap)
        self.steps_per_epoch = n - n % self.accum
        if n < 1:
            raise ConfigError(f"--data_path {self.cfg.data_path} gives no full batch of {self.micro} per rank on "
                              f"{self.world} rank(s); lower --batch_size")
        if self.steps_per_epoch < 1:
            raise ConfigError(f"an epoch of {n} micro-batch(es) per rank holds no whole group of --accum_iter "
                              f"{self.accum}; lower --accum_iter" + (" or raise --max_steps_per_epoch" if cap else ""))

    def build(self, make_model: Callable[[], nn.Module], make_groups: Callable[[nn.Module], list[dict]],
              betas: tuple[float, float]) -> nn.Module:
        """Build the model from the shared seed (identical initial weights on every rank), AdamW over its
        groups, and the DeepSpeed engine. Returns the model (``self.engine.module``)."""
        seed_shared(self.cfg.seed)
        model = make_model()
        groups = make_groups(model)
        optimizer = build_adamw(groups, self.base_lr, betas=betas, device=self.device)
        cfg = self.cfg
        why = self.compile_why
        if self.compiled:
            apply_compile(model, cfg.compile_scope, cfg.compile_backend, cfg.compile_mode)
            mode = "" if cfg.compile_mode == "default" else f", {cfg.compile_mode}"
            self.compile_note = f"compiled ({cfg.compile_scope}, {cfg.compile_backend}{mode}; {why})"
        else:
            self.compile_note = f"eager ({why})"
        import deepspeed

        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_cfg)
        one_rank_engine(self.engine, self.world)
        self.lr_scales = [g.get("lr_scale") for g in groups if g["params"]]
        self._check_lr_scales("the DeepSpeed optimizer changed the parameter groups")
        return model

    def _check_lr_scales(self, what: str) -> None:
        """Layer decay lives in each parameter group's ``lr_scale``: stop if DeepSpeed dropped or replaced it."""
        if [g.get("lr_scale") for g in self.optimizer.param_groups] != self.lr_scales:
            raise RuntimeError(f"{what} (their lr_scale is lost)")

    def run_shape(self) -> dict[str, Any]:
        return dict(world_size=self.world, micro_batch=self.micro, accum_iter=self.accum,
                    zero_stage=zero_stage_of(self.ds_cfg), config=self.cfg.to_dict())

    def resume(self, module_only: bool = False) -> run_dir.ResumePoint | None:
        """Load the checkpoint ``--resume`` names (lomar_fast.run_dir's rule; its model settings and global
        batch were checked against this run's at construction). ``module_only``: the weights alone."""
        point = self.resume_point
        if point is None:
            return None
        root = point.root
        if module_only and zero_stage_of(self.ds_cfg) == 3:
            # DeepSpeed 0.19.8's module-only ZeRO-3 load reads the weights of the tag the folder's `latest` names,
            # whatever tag it is given, and fails on another rank count: consolidate the tag's partitions instead
            from lomar_fast.export import consolidate

            load_module_weights(self.engine.module, consolidate(str(root), point.tag)[0] if self.rank == 0 else None)
            self.resumed = point
            return point
        if self.universal:  # rank 0 converts (once per tag), every rank loads its new partition of the whole state
            root = str(self.root / run_dir.UNIVERSAL)
            if self.rank == 0:
                t0 = time.perf_counter()
                run_dir.convert_universal(Path(point.root, point.tag), Path(root, point.tag))
                print(f"--resume: converted {point} for {self.world} rank(s) in {time.perf_counter() - t0:.0f} s")
            barrier()
        path, client = self.engine.load_checkpoint(root, tag=point.tag, load_module_only=module_only,
                                                   load_optimizer_states=not module_only,
                                                   load_lr_scheduler_states=not module_only)
        if self.universal:
            if not module_only:
                run_dir.settle_universal_load(getattr(self.engine.optimizer, "optimizer", self.engine.optimizer),
                                              Path(root, point.tag))
            barrier()  # every rank has read its part; the next save is in this rank count's own layout
            if self.rank == 0:
                shutil.rmtree(root, ignore_errors=True)
        self._check_lr_scales(f"loading {point} changed the optimizer's parameter groups")
        if path is None:
            raise ConfigError(f"--resume: could not load checkpoint {point}")
        if not module_only:
            client = client or {}
            self.epoch, self.step = int(client["epoch"]) + 1, int(client["step"])
            self.state.update(client.get("state", {}))
        self.resumed = point
        return point

    def describe(self, model: nn.Module, what: str) -> str:
        """The run's opening log line."""
        stage = zero_stage_of(self.ds_cfg)
        n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) / 1e6  # ZeRO-3: full sizes
        return (f"model {self.cfg.model} ({n:.1f}M params{what}), {self.world} rank(s) on {self.device.type}, "
                f"{self.dtype}, ZeRO-{stage}, micro-batch {self.micro} x accum {self.accum} x {self.world} = "
                f"{self.global_batch}, lr {self.base_lr:.3g}, {self.steps_per_epoch} steps/epoch, {self.compile_note}"
                + (f", resumed from {self.resumed} at epoch {self.epoch} step {self.step}" if self.resumed else ""))

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self, family: str, epoch: int) -> str:
        """Save tag ``<family>/epoch`` on every rank, commit it, retire the family's old tags."""
        tag = run_dir.tag_name(family, epoch)
        client = dict(epoch=epoch, step=self.step, state=dict(self.state), run=self.run_shape())
        if self.rank == 0:
            run_dir.uncommit(self.root, tag)  # a tag written again is incomplete until committed again
        barrier()  # before any rank touches the tag's files
        self.engine.save_checkpoint(str(self.root), tag=tag, client_state=client, save_latest=False)
        if self.rank == 0:  # every rank has returned from DeepSpeed's closing barrier
            run_dir.commit(self.root, tag, dict(epoch=epoch, step=self.step, time=time.time(), run=self.run_shape()),
                           update_latest=family == self.family)
            run_dir.retire(self.root, family, self.cfg.keep_last)
        barrier()
        return tag

    # ----------------------------------------------------------------------------------------- the loop
    def fit(self, step_fn: StepFn, end_epoch: EndEpochFn | None = None) -> dict:
        """Train from ``self.epoch`` to ``cfg.epochs`` (or ``--exit_after_epochs`` of them). Returns the last
        epoch's record ({} when there was nothing to train); rank 0 writes ``summary.json``."""
        cfg, engine = self.cfg, self.engine
        from torch._dynamo.exc import TorchDynamoException

        from lomar_fast.data import epoch_order, set_epoch, stop_epoch

        meter = LossMeter(self.device, cfg.log_every, cfg.output_dir)
        idle = DeviceIdle(self.device)
        last: dict = {}
        start = self.epoch
        try:
            for epoch in range(start, cfg.epochs):
                self.epoch = epoch
                seed_rank(cfg.seed, self.rank, epoch)
                set_epoch(self.loader, epoch)
                order = epoch_order(self.loader, epoch)
                if getattr(cfg, "record_data_order", False):
                    (self.root / "data_order").mkdir(exist_ok=True)
                    (self.root / "data_order" / f"rank{self.rank}_epoch{epoch}.json").write_text(
                        json.dumps([int(i) for i in order]))
                engine.train()
                self.logger.start_epoch(epoch, self.steps_per_epoch)
                meter.start_epoch()
                t0, lr, epoch_wait = time.perf_counter(), self.base_lr, 0.0
                idle.new_epoch()
                batches = iter(self.loader)  # FFCV allocates the epoch's buffers here: the host waits on the loader
                wait = time.perf_counter() - t0
                for i in range(self.steps_per_epoch):
                    t_wait = time.perf_counter()
                    batch = next(batches)
                    wait += time.perf_counter() - t_wait  # the host blocked on the loader
                    idle.step_starts()
                    # the schedule's position is the epoch and the step in it, as MAE's (epoch + i / len): a run
                    # resumed with another split of the same global batch or another step cap keeps its lr
                    # (self.step, counted in micro-steps of the split that saved it, would not). As in MAE, an
                    # accumulation group's optimizer step takes the lr of the group's first micro-step.
                    lr = lr_at(epoch * self.steps_per_epoch + i - i % self.accum, self.steps_per_epoch, self.base_lr,
                               cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
                    set_lr(self.optimizer, lr)
                    info = StepInfo(epoch, self.step, i, order[i * self.micro:(i + 1) * self.micro])
                    try:
                        loss = step_fn(batch, info)
                        engine.backward(loss)
                    except TorchDynamoException as e:  # compiles happen in the first steps' forward and backward
                        raise CompileFailed(f"torch.compile failed at step {self.step} ({self.compile_note}): "
                                            f"{type(e).__name__}; --compile off trains without it") from e
                    engine.step()
                    idle.step_ends()
                    meter.add(loss)
                    self.step += 1
                    if meter.due(i, self.steps_per_epoch - 1):
                        value, n, dt = meter.read(epoch, self.step)
                        lrs = [g["lr"] for g in self.optimizer.param_groups]
                        extra = {"lr_low": min(lrs)} if min(lrs) != max(lrs) else {}
                        gpu_idle = idle.read()
                        if gpu_idle is not None:
                            extra["gpu_idle_before_step_s"] = gpu_idle
                        self.logger.log_steps(epoch=epoch, step=self.step, loss=value, lr=max(lrs),
                                              images_per_sec=n * self.micro * self.world / dt, n=n,
                                              data_wait_s=wait / n, **extra)
                        epoch_wait, wait = epoch_wait + wait, 0.0
                seconds = time.perf_counter() - t0
                stop_epoch(batches)  # an epoch cut short: FFCV's decoding thread must be gone before the next
                # FFCV allocates an epoch's buffers when its iterator is made: the pinned output batches (190 MB
                # for 5 slots of 256 images at 224 px) and the GPU copies' targets. Dropped here, the next epoch
                # takes them back from torch's pinned and device caches; held until the next iter(), they made it
                # pin a second set (then with FFCV's decode buffers, 1.3 GB: likely why an H200 run's second epoch
                # started a second late)
                batches = batch = None
                last = dict(epoch=epoch, step=self.step, loss=meter.epoch_mean, lr=lr, epoch_time=seconds,
                            data_wait_s=epoch_wait,
                            images_per_sec=meter.epoch_steps * self.micro * self.world / max(seconds, 1e-9))
                if end_epoch is not None:
                    last.update(end_epoch(epoch, last))
                self.logger.end_epoch(**last)
                stopping = cfg.exit_after_epochs is not None and epoch + 1 - start >= cfg.exit_after_epochs
                if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs or stopping:
                    self.logger.info(f"checkpoint {self.root / self.save(self.family, epoch)}")
                if stopping:
                    self.logger.info(f"exiting after {cfg.exit_after_epochs} epoch(s) as asked; --resume auto continues")
                    break
        finally:
            self.logger.close()
        if self.rank == 0 and last:
            Path(cfg.output_dir, "summary.json").write_text(
                json.dumps({**last, **self.state, "config": cfg.to_dict()}, indent=1))
        elif self.rank == 0:
            print(f"nothing to train: the run in {cfg.output_dir} already reached epoch {cfg.epochs}")
        return last

    def open_logger(self) -> RunLogger:
        """The run's first write. With --overwrite the earlier run's files are deleted here, after the loader,
        the model, the weights to load and the engine were all built: a bad input found on the way stops the run
        with the earlier one intact."""
        if getattr(self.cfg, "overwrite", False):
            if self.rank == 0:
                gone = run_dir.clear_run(self.root)
                if gone:
                    print(f"--overwrite: deleted the earlier run's {', '.join(gone)} in {self.root}")
            barrier()
        self.logger = RunLogger(self.cfg, rank=self.rank, total_epochs=self.cfg.epochs)
        if self.resume_note:
            self.logger.info(self.resume_note)
        return self.logger
