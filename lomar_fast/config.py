"""One configuration object for pretraining: MAE/LoMaR flags, optionally read from a YAML file.

Precedence: built-in defaults < ``--config run.yaml`` < command-line flags. ``explicit`` records which
keys the user set (file or flag), so checks such as the DeepSpeed batch-size agreement can tell a
user's value from a default.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class RunConfig:
    """Base of the run configurations: the loader and launch settings every entry point takes, and
    ``explicit``, the keys the user set (file or flag)."""

    # data loading
    num_workers: int = 8
    os_cache: bool = True
    batches_ahead: int = 3
    # launch and run settings shared by the entry points
    output_dir: str = "./output_dir"
    log_dir: str | None = None
    resume: str | None = None
    seed: int = 0
    log_every: int = 20
    max_steps_per_epoch: int | None = None
    exit_after_epochs: int | None = None
    deepspeed_config: str = "ds_configs/zero2.json"
    zero_stage: int | None = None
    kernels: str | None = None
    compile: bool = False
    device: str | None = None
    local_rank: int = -1
    explicit: set[str] = field(default_factory=set, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "explicit"}


@dataclass
class PretrainConfig(RunConfig):
    # model
    model: str = "lomar_vit_base_patch16"
    input_size: int = 224
    window_size: int = 7
    num_window: int = 4
    mask_ratio: float = 0.8
    norm_pix_loss: bool = True
    window_sampling: str = "per_batch"
    pairing: str = "all"
    drop_path: float = 0.0
    # optimisation (published recipe)
    batch_size: int = 64
    accum_iter: int = 1
    epochs: int = 400
    warmup_epochs: int = 20
    blr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    # data
    data_path: str = ""
    # run
    save_every: int = 20
    record_data_order: bool = False
    # k-NN representation monitor (off unless --knn_every N > 0)
    knn_every: int = 0
    knn_train: str | None = None
    knn_val: str | None = None


HELP = {
    "model": "model factory name (lomar_vit_{tiny,small,base,large,huge}_patch16)",
    "input_size": "training image side in pixels (multiple of the patch size)",
    "window_size": "window side w in patches",
    "num_window": "windows per image K (at most grid - w + 1)",
    "mask_ratio": "fraction of each window's patches that are masked",
    "norm_pix_loss": "normalize each target patch by its own mean/std",
    "window_sampling": "per_batch (published: one set of windows per micro-batch) or per_image",
    "pairing": "all (every image with its K windows) or published (the reference code's pairing)",
    "batch_size": "micro-batch per GPU (DeepSpeed train_micro_batch_size_per_gpu)",
    "accum_iter": "gradient accumulation steps",
    "blr": "base lr: lr = blr * effective batch / 256",
    "lr": "absolute lr (overrides blr)",
    "min_lr": "lr floor of the cosine schedule",
    "data_path": "train.beton written by data_prep/write_beton.py",
    "output_dir": "where checkpoints and the JSONL log go",
    "log_dir": "TensorBoard directory (default: output_dir/tensorboard)",
    "resume": "'auto' (latest checkpoint in output_dir) or a checkpoint directory",
    "save_every": "save a checkpoint every N epochs (and at the end)",
    "log_every": "read the loss back every N steps (no host sync in between)",
    "max_steps_per_epoch": "cap the steps of each epoch (smoke runs)",
    "exit_after_epochs": "save and exit after this many epochs in this invocation (time-limited jobs; "
                         "--resume auto continues)",
    "record_data_order": "write each rank's sample indices per epoch under output_dir/data_order",
    "deepspeed_config": "DeepSpeed JSON (ds_configs/)",
    "zero_stage": "override the ZeRO stage of the JSON",
    "kernels": "fused CUDA kernels: on, off or auto (default: $LOMAR_KERNELS or auto)",
    "compile": "torch.compile the model",
    "device": "cpu or cuda (default: cuda when available)",
    "knn_every": "run the k-NN monitor (k=20, T=0.07) every N epochs and log knn_top1 (0: off; needs "
                 "--knn_train and --knn_val)",
    "knn_train": "labelled .beton whose features are the k-NN neighbours (e.g. a train subset)",
    "knn_val": "labelled .beton whose images are classified by k-NN",
}

_CHOICES = {"window_sampling": ("per_batch", "per_image"), "pairing": ("all", "published"),
            "kernels": ("on", "off", "auto")}


def _field_type(f: dataclasses.Field):
    t = str(f.type)
    if "bool" in t:
        return bool
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def build_parser(cls=PretrainConfig, description: str = "LoMaR pretraining",
                 help_text: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """Flags of every field of ``cls``; ``help_text`` entries take precedence over HELP."""
    helps = {**HELP, **(help_text or {})}
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file with the same keys as the flags (flags override it)")
    for f in dataclasses.fields(cls):
        if f.name == "explicit":
            continue
        typ = _field_type(f)
        names = [f"--{f.name}"] + (["--local-rank"] if f.name == "local_rank" else [])
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=helps.get(f.name, f.name) + f" (default {f.default})")
        if typ is bool:
            kw.update(nargs="?", const=True, type=_parse_bool)
        else:
            kw.update(type=typ, choices=_CHOICES.get(f.name))
        p.add_argument(*names, dest=f.name, **kw)
        if typ is bool:
            p.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                           help=f"disable --{f.name}")
    return p


def parse_config(argv: list[str] | None = None, cls=PretrainConfig, description: str = "LoMaR pretraining",
                 help_text: dict[str, str] | None = None):
    """Defaults < YAML (--config) < flags. Unknown YAML keys are an error naming them."""
    parser = build_parser(cls, description, help_text)
    args, extra = parser.parse_known_args(argv)
    # launchers may append arguments of their own (e.g. --deepspeed); anything else is a typo
    unknown = [a for a in extra if a.startswith("--") and a.split("=")[0] not in ("--deepspeed",)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    given = vars(args)
    values: dict[str, Any] = {}
    explicit: set[str] = set()
    names = {f.name for f in dataclasses.fields(cls)} - {"explicit"}
    if given.get("config"):
        path = Path(given["config"])
        if not path.is_file():
            raise FileNotFoundError(f"--config {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"--config {path}: expected a mapping of flag names to values")
        bad = sorted(set(data) - names)
        if bad:
            raise ValueError(f"--config {path}: unknown keys {bad}; valid keys are the flag names")
        values.update(data)
        explicit.update(data)
    for k, v in given.items():
        if k != "config":
            values[k] = v
            explicit.add(k)
    cfg = cls(**values)
    cfg.explicit = explicit
    return cfg
