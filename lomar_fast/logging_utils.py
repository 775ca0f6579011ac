"""What the user sees: a progress bar per epoch on rank 0, TensorBoard scalars and a JSONL log."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class RunLogger:
    """Rank 0 writes; other ranks only keep quiet. Scalars: loss, lr, images/sec, epoch time."""

    def __init__(self, cfg, rank: int = 0, total_epochs: int = 1, jsonl_name: str = "log.jsonl"):
        self.rank = rank
        self.total_epochs = total_epochs
        self.bar = None
        self.tb = None
        self.jsonl = None
        if rank != 0:
            return
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / jsonl_name, "a", buffering=1)
        log_dir = Path(cfg.log_dir) if cfg.log_dir else out / "tensorboard"
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(log_dir))
        except ImportError:  # tensorboard is optional: the JSONL log has the same numbers
            self.tb = None

    def info(self, msg: str) -> None:
        if self.rank == 0:
            (self.bar.write if self.bar is not None else print)(msg)
            sys.stdout.flush()

    def start_epoch(self, epoch: int, steps: int) -> None:
        if self.rank != 0:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.total_epochs}", dynamic_ncols=True,
                        file=sys.stdout, mininterval=1.0, leave=True)

    def _record(self, kind: str, **values) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"kind": kind, "time": time.time(), **values}) + "\n")

    def log_steps(self, *, epoch: int, step: int, loss: float, lr: float, images_per_sec: float, n: int,
                  **extra) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_sec:.0f}", refresh=False)
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/images_per_sec", images_per_sec, step)
            for k, v in extra.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        self._record("steps", epoch=epoch, step=step, loss=loss, lr=lr, images_per_sec=images_per_sec, n=n, **extra)

    def end_epoch(self, **values) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            for k in ("loss", "epoch_time", "images_per_sec"):
                if k in values:
                    self.tb.add_scalar(f"epoch/{k}", values[k], values["epoch"])
            for k, v in values.items():
                if k.startswith(("val_", "knn_")):
                    self.tb.add_scalar(f"epoch/{k}", v, values["epoch"])
            self.tb.flush()
        self._record("epoch", **values)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
        sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


def epoch_records(output_dir: str | Path, jsonl_name: str = "log.jsonl") -> list[dict]:
    """The epoch records of a run's JSONL log, the latest record per epoch (a resumed run rewrites some),
    in epoch order."""
    path = Path(output_dir, jsonl_name)
    records: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "epoch":
                records[int(rec["epoch"])] = rec
    return [records[e] for e in sorted(records)]
