"""ZeRO-1/2/3 in the shipped engine mode on CPU ranks: losses, exact resume, sharding and host syncs.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/engine_modes_ranks.py --out DIR [--stages 1 2 3]
        [--resume_from ONE_RANK_DIR]
    DS_ACCELERATOR=cpu python tests/engine_modes_ranks.py --out ONE_RANK_DIR --no_probes   (one rank)

For each stage, every rank builds the same tiny LoMaR engine from the shipped ``ds_configs/zero<stage>.json``
(precision section as shipped) around a fused AdamW, and trains ``STEPS`` steps on fixed synthetic batches,
each rank on its half of the global batch. It saves a checkpoint after ``RESUME_AT`` steps, then builds a fresh
engine from differently initialised weights, loads the checkpoint and trains the remaining steps. One step of
the uninterrupted run is counted with lomar_fast.host_sync (DeepSpeed's CPU accelerator answering like a GPU
one, so DeepSpeed takes its GPU code paths). Rank 0 writes ``DIR/result.json``.

``reference_losses`` trains the same model on the whole global batch in one process without DeepSpeed (fp32
weights, bf16 autocast, the same fused AdamW): the losses the ranks must reproduce.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = dict(img_size=64, depth=2, window_size=3, num_window=2)
GLOBAL_BATCH = 8
STEPS = 4
RESUME_AT = 2
COUNTED_STEP = STEPS - 1  # steady state: ZeRO-3 records its fetch trace on the first two steps
LR = 2e-3


def build_model(seed: int = 0):
    from lomar_fast.models import create_model

    torch.manual_seed(seed)
    return create_model("lomar_vit_tiny_patch16", **MODEL)


def build_optimizer(model) -> torch.optim.Optimizer:
    """Fused AdamW over the recipe's weight-decay groups: the optimizer GPU runs use."""
    from lomar_fast.optim import param_groups_weight_decay

    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups_weight_decay(model, 0.05)]
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), fused=True)


def lr_of(step: int) -> float:
    from lomar_fast.optim import lr_at

    return lr_at(step, 1, LR, 1e-5, 0, STEPS)  # half-cosine over the run: a different lr every step


def batch(step: int):
    """The global batch of a step: uint8 images (G, S, S, 3), windows (G, K, 2), masks (G, K, w*w)."""
    from lomar_fast.models.lomar import sample_masks, sample_windows

    g = torch.Generator().manual_seed(1000 + step)
    s, w, k = MODEL["img_size"], MODEL["window_size"], MODEL["num_window"]
    images = torch.randint(0, 256, (GLOBAL_BATCH, s, s, 3), dtype=torch.uint8, generator=g)
    windows = sample_windows(GLOBAL_BATCH, k, s // 16, w, sampling="per_image", generator=g)
    masks = sample_masks(GLOBAL_BATCH, k, w, 0.8, generator=g)
    return images, windows, masks


def reference_losses(steps: int = STEPS) -> list[float]:
    """One process, whole global batch, no DeepSpeed: fp32 weights, CPU bf16 autocast, fused AdamW."""
    from lomar_fast.optim import set_lr

    model = build_model()
    opt = build_optimizer(model)
    losses = []
    for step in range(steps):
        set_lr(opt, lr_of(step))
        images, windows, masks = batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, _ = model(images, windows, masks, validate=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _engine(stage: int, seed: int, world: int, extra: dict | None = None):
    import deepspeed

    from lomar_fast.ds_config import load_ds_config, resolve_ds_config

    source = f"ds_configs/zero{stage}.json"
    raw = {**load_ds_config(REPO / source), **(extra or {})}
    ds, _, _ = resolve_ds_config(raw, batch_size=GLOBAL_BATCH // world, accum_iter=1, world_size=world,
                                 explicit=set(), zero_stage=None, device=torch.device("cpu"), source=source)
    model = build_model(seed)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model), config=ds)
    return engine, optimizer, ds


def _train(engine, optimizer, steps: range, rank: int, world: int, count_step: int | None = None):
    """Train ``steps`` on this rank's half of each global batch; returns (global losses, counted sync events)."""
    from lomar_fast.optim import set_lr
    from lomar_fast.host_sync import HostSyncCounter

    losses, events = [], []
    per = GLOBAL_BATCH // world
    for step in steps:
        set_lr(optimizer, lr_of(step))
        images, windows, masks = (t[rank * per:(rank + 1) * per] for t in batch(step))
        counter = HostSyncCounter() if step == count_step else None
        if counter is not None:
            counter.__enter__()
        loss, _, _ = engine(images, windows, masks, validate=False)
        engine.backward(loss)
        engine.step()
        if counter is not None:
            counter.__exit__(None, None, None)
            events = [e.__dict__ for e in counter.events]
        mean = loss.detach().float().clone()
        torch.distributed.all_reduce(mean)
        losses.append(float(mean) / world)
    return losses, events


def _sharding(engine, stage: int) -> dict:
    """Elements this rank holds of the parameters, fp32 master weights and Adam states, against the model's
    total and trainable (optimized) element counts."""
    params = list(engine.module.parameters())
    if stage == 3:
        total = sum(p.ds_numel for p in params)
        local_params = sum(p.ds_tensor.numel() for p in params)
        master = sum(t.numel() for t in engine.optimizer.fp32_partitioned_groups_flat)
    else:
        total = sum(p.numel() for p in params)
        local_params = total
        master = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)
    states = engine.optimizer.optimizer.state.values()
    adam = sum(s["exp_avg"].numel() for s in states if "exp_avg" in s)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
    return {"total": total, "trainable": trainable, "local_params": local_params, "master": master,
            "adam_exp_avg": adam, "param_dtypes": dtypes}


def run_stage(stage: int, out: Path, rank: int, world: int) -> dict:
    from lomar_fast.host_sync import gpu_like_accelerator
    from lomar_fast.precision import engine_mode

    ckpt = out / f"zero{stage}"
    with gpu_like_accelerator():
        engine, optimizer, ds = _engine(stage, seed=0, world=world)
        straight, _ = _train(engine, optimizer, range(RESUME_AT), rank, world)
        engine.save_checkpoint(str(ckpt), tag=f"step{RESUME_AT}", client_state={"step": RESUME_AT})
        more, events = _train(engine, optimizer, range(RESUME_AT, STEPS), rank, world, count_step=COUNTED_STEP)
        straight += more
        sharding = _sharding(engine, stage)
        engine.destroy()

        fresh, fresh_opt, _ = _engine(stage, seed=1234, world=world)  # other initial weights: the load must restore
        _, client = fresh.load_checkpoint(str(ckpt), tag=f"step{RESUME_AT}")
        resumed, _ = _train(fresh, fresh_opt, range(int(client["step"]), STEPS), rank, world)
        loads = full_weights_load(fresh, rank) if stage == 3 else None
        fresh.destroy()
    shards = [None] * world
    torch.distributed.all_gather_object(shards, sharding)
    return {"mode": engine_mode(ds), "losses": straight, "resumed": resumed, "resume_at": RESUME_AT,
            "syncs": events, "counted_step": COUNTED_STEP, "sharding": shards, "full_weights_load": loads}


def full_weights_load(engine, rank: int) -> list[bool]:
    """checkpoint.load_module_weights as ``--eval --resume`` of a ZeRO-3 tag calls it: rank 0 passes the whole
    weights, the others None. Whether each rank then gathers exactly those weights (one bool per rank)."""
    from lomar_fast.checkpoint import load_module_weights, module_state_dict

    want = build_model(seed=5).state_dict()
    load_module_weights(engine.module, want if rank == 0 else None)
    got = module_state_dict(engine.module)
    same = set(got) == set(want) and all(torch.equal(got[k], want[k].float()) for k in want)
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, same)
    return every


def resume_from_other_ranks(stage: int, source: Path, rank: int, world: int) -> list[float]:
    """Load the ``RESUME_AT`` checkpoint another rank count wrote under ``stage`` (``source/zero<stage>``) through
    DeepSpeed's universal checkpoint, as the trainer does (rank 0 converts; every rank loads its share, then the
    groups' settings and Adam steps are set right), into an engine built from other weights, and train the
    remaining steps; returns their global losses."""
    from lomar_fast import run_dir

    tag = f"step{RESUME_AT}"
    univ = source / "universal" / f"zero{stage}"
    if rank == 0:
        run_dir.convert_universal(source / f"zero{stage}" / tag, univ / tag)
    torch.distributed.barrier()
    engine, optimizer, _ = _engine(stage, seed=1234, world=world, extra={"checkpoint": {"load_universal": True}})
    _, client = engine.load_checkpoint(str(univ), tag=tag)
    run_dir.settle_universal_load(engine.optimizer.optimizer, univ / tag)
    losses, _ = _train(engine, optimizer, range(int(client["step"]), STEPS), rank, world)
    engine.destroy()
    return losses


def probe_counter(rank: int, world: int) -> dict:
    """Show that the step's sync count can fail: DeepSpeed's own syncs come back with gradient clipping on (ZeRO-2
    then computes the global norm and checks it on the host), and one ``.item()`` inserted into DeepSpeed's ZeRO
    step is counted."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from lomar_fast.host_sync import gpu_like_accelerator

    out = {}
    with gpu_like_accelerator():
        for name in ("clipping", "inserted_item"):
            engine, optimizer, ds = _engine(2, seed=0, world=world,
                                            extra={"gradient_clipping": 1.0} if name == "clipping" else None)
            original = DeepSpeedZeroOptimizer.step

            def step_with_read(self, *args, **kwargs):
                self.averaged_gradients[0][0].sum().item()  # a deliberate host read inside DeepSpeed's step
                return original(self, *args, **kwargs)

            if name == "inserted_item":
                DeepSpeedZeroOptimizer.step = step_with_read
            try:
                _, events = _train(engine, optimizer, range(2), rank, world, count_step=1)
            finally:
                DeepSpeedZeroOptimizer.step = original
                engine.destroy()
            out[name] = events
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    p.add_argument("--resume_from", help="--out of a run on another rank count: each stage also resumes its "
                                          "checkpoint (the result's 'from_other_ranks')")
    p.add_argument("--no_probes", action="store_true", help="skip the host-sync counter's probes")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from lomar_fast.distributed import init_distributed, shutdown_distributed

    rank, world, _ = init_distributed(torch.device("cpu"))
    out = Path(args.out)
    t0 = time.perf_counter()
    stages = {}
    for stage in args.stages:
        stages[str(stage)] = run_stage(stage, out, rank, world)
        if args.resume_from:
            stages[str(stage)]["from_other_ranks"] = resume_from_other_ranks(stage, Path(args.resume_from), rank, world)
        stages[str(stage)]["seconds"] = time.perf_counter() - t0
    result = {"world": world, "global_batch": GLOBAL_BATCH, "steps": STEPS, "stages": stages,
              "probes": {} if args.no_probes else probe_counter(rank, world), "seconds": time.perf_counter() - t0}
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result, indent=1))
    shutdown_distributed()


if __name__ == "__main__":
    main()
