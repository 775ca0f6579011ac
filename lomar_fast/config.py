"""Every flag of the entry points, in one place: MAE/LoMaR-style flags, optionally read from a YAML file.

``PretrainConfig`` (``lomar_fast.pretrain``) and ``FinetuneConfig`` (``lomar_fast.finetune``) share the
loader, launch and checkpoint settings of ``RunConfig``. Precedence: built-in defaults < ``--config
run.yaml`` < command-line flags. YAML values and flag strings go through the same per-field conversion
(``blr: 5e-4`` is a float whether PyYAML reads it as a number or a string); a value that does not fit
its field is one :class:`ConfigError` naming the key, the value and the expected type. ``explicit``
records which keys the user set (file or flag), so checks such as the DeepSpeed batch-size agreement
can tell a user's value from a default. ``validate()`` runs every check that needs no GPU and no data
read, so bad input stops before any work.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import yaml

from lomar_fast.compilation import MODES, SCOPES, SETTINGS
from lomar_fast.errors import ConfigError
from lomar_fast.images import DEFAULT_INTERPOLATION, INTERPOLATIONS


@dataclass
class RunConfig:
    """Settings every entry point takes: loading, launch, checkpoints, and ``explicit``, the keys the
    user set (file or flag)."""

    # data loading
    num_workers: int = 8
    os_cache: bool = True
    batches_ahead: int = 3
    interpolation: str = DEFAULT_INTERPOLATION
    # optimisation shared by both recipes
    batch_size: int = 64
    accum_iter: int = 1
    lr: float | None = None
    weight_decay: float = 0.05
    # launch, checkpoints and logging
    output_dir: str = "./output_dir"
    log_dir: str | None = None
    resume: str | None = None
    overwrite: bool = False
    keep_last: int = 3
    seed: int = 0
    log_every: int = 20
    max_steps_per_epoch: int | None = None
    exit_after_epochs: int | None = None
    deepspeed_config: str = "ds_configs/zero2.json"
    zero_stage: int | None = None
    kernels: str | None = None
    compile: str = "auto"
    compile_scope: str = "blocks"
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    device: str | None = None
    local_rank: int = -1
    explicit: set[str] = field(default_factory=set, repr=False, compare=False)

    # the settings a resumed run must share with the saved one (see lomar_fast.run_dir.check_resume)
    MODEL_KEYS: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init and f.name != "explicit"}

    def validate(self) -> None:
        """Checks shared by the entry points (the subclasses add their own)."""
        for name in ("batch_size", "accum_iter", "epochs", "save_every", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ConfigError(f"--warmup_epochs {self.warmup_epochs} must be between 0 and --epochs {self.epochs}")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero_stage {self.zero_stage} must be 0, 1, 2 or 3")
        if self.compile != "off" and self.compile_backend != "inductor":  # the default needs no lookup (1 s import)
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.compile_backend not in backends:
                raise ConfigError(f"--compile_backend {self.compile_backend} is not a torch.compile backend; use "
                                  f"inductor (the default), or one of {', '.join(backends)}")
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            raise ConfigError(f"--compile_mode {self.compile_mode} is an inductor mode; drop it or use "
                              f"--compile_backend inductor (got {self.compile_backend})")
        for name in ("blr", "lr", "min_lr", "weight_decay"):
            value = getattr(self, name, None)
            if value is not None and not value >= 0:  # not >= also catches nan
                raise ConfigError(f"--{name} must be a number of at least 0, got {value}")
        if self.seed < 0:  # numpy's generators take no negative seed
            raise ConfigError(f"--seed must be at least 0, got {self.seed}")
        if self.batches_ahead < 1:
            raise ConfigError(f"--batches_ahead must be at least 1, got {self.batches_ahead}")
        for name in ("max_steps_per_epoch", "exit_after_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value} (leave it out for no limit)")
        if self.overwrite and self.resume:
            raise ConfigError("--overwrite starts the run in --output_dir afresh and --resume continues it: "
                              "pass one of them")


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` lies inside ``folder`` (both resolved)."""
    return Path(folder).resolve() in Path(path).resolve().parents


def _need_file(flag: str, path: str | None, hint: str) -> None:
    if not path:
        raise ConfigError(f"--{flag} is required: {hint}")
    if Path(path).is_dir():
        raise ConfigError(f"--{flag} {path} is a folder, not a file; {hint}")
    if not Path(path).is_file():
        raise ConfigError(f"--{flag} {path} does not exist; {hint}")


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
    epochs: int = 400
    warmup_epochs: int = 20
    blr: float = 1.5e-4
    min_lr: float = 0.0
    # data
    data_path: str = ""
    # run
    save_every: int = 20
    record_data_order: bool = False
    # k-NN representation monitor (off unless --knn_every N > 0)
    knn_every: int = 0
    knn_train: str | None = None
    knn_val: str | None = None

    MODEL_KEYS: ClassVar[tuple[str, ...]] = ("model", "input_size", "window_size", "num_window", "mask_ratio", "norm_pix_loss",
                  "window_sampling", "pairing", "drop_path")

    def validate(self) -> None:
        from lomar_fast.models.lomar import validate_lomar_geometry

        from lomar_fast.models import model_names

        if not self.model.startswith("lomar_") or self.model not in model_names():
            raise ConfigError(f"--model {self.model} is not a LoMaR pretraining model; use lomar_vit_{{tiny,small,"
                              f"base,large,huge}}_patch16 (benchmarks/throughput.py runs the MAE baseline)")
        if not 0.0 <= self.drop_path <= 1.0:
            raise ConfigError(f"--drop_path {self.drop_path} must be between 0 and 1")
        _need_file("data_path", self.data_path, "the train.beton written by data_prep/write_beton.py (make "
                                                "demo-data builds data/demo/train.beton; make prep-imagenet ImageNet)")
        if self.input_size < 16:  # the geometry check below would blame --window_size for an empty grid
            raise ConfigError(f"--input_size {self.input_size} must be a positive multiple of the patch size 16")
        try:
            validate_lomar_geometry(self.input_size, 16, self.window_size, self.num_window, self.mask_ratio)
        except ValueError as e:
            raise ConfigError(f"--{e}") from None
        super().validate()
        if self.knn_every < 0:
            raise ConfigError(f"--knn_every {self.knn_every} must be 0 (off) or a positive number of epochs")
        if self.knn_every and not (self.knn_train and self.knn_val):
            raise ConfigError("--knn_every needs --knn_train and --knn_val: labelled .beton files (make demo-data "
                              "builds data/demo/train.beton and val.beton)")
        if (self.knn_train or self.knn_val) and not self.knn_every:
            raise ConfigError("--knn_train/--knn_val are only read by the k-NN monitor: add --knn_every N")
        if self.knn_every:
            from lomar_fast.data.beton import check_beton

            for flag in ("knn_train", "knn_val"):
                _need_file(flag, getattr(self, flag), "a labelled .beton")
                check_beton(getattr(self, flag), need_label=True, input_size=self.input_size)


@dataclass
class FinetuneConfig(RunConfig):
    # model
    model: str = "vit_base_patch16"
    input_size: int = 224
    nb_classes: int | None = None
    drop_path: float = 0.1
    global_pool: bool = True
    depth: int | None = None
    finetune: str | None = None
    # optimisation (the published fine-tuning recipe)
    epochs: int = 100
    warmup_epochs: int = 5
    blr: float = 5e-4
    min_lr: float = 1e-6
    layer_decay: float = 0.65
    clip_grad: float | None = None
    # augmentation
    aa: str = "rand-m9-mstd0.5-inc1"
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    # data
    data_path: str = ""
    val_path: str = ""
    # run
    eval: bool = False
    save_every: int = 1

    MODEL_KEYS: ClassVar[tuple[str, ...]] = ("model", "input_size", "nb_classes", "global_pool", "depth")

    def validate(self) -> None:
        from lomar_fast.models import model_names

        if not self.model.startswith("vit_") or self.model not in model_names():
            raise ConfigError(f"--model {self.model} is not a fine-tuning model; use vit_{{tiny,small,base,large,"
                              f"huge}}_patch16")
        if self.input_size < 16 or self.input_size % 16:
            raise ConfigError(f"--input_size {self.input_size} must be a positive multiple of the patch size 16")
        if not self.eval:
            _need_file("data_path", self.data_path, "a labelled train.beton (make demo-data builds "
                                                    "data/demo/train.beton; make prep-imagenet ImageNet)")
        _need_file("val_path", self.val_path, "the labelled val.beton evaluated after every epoch (make demo-data "
                                              "or make prep-imagenet builds it)")
        if self.finetune:
            _need_file("finetune", self.finetune, "pass a model.pth from lomar_fast.export (python -m "
                       "lomar_fast.export --checkpoint RUN --out model.pth turns a pretraining run folder into one; "
                       "make pretrain writes output/demo/model.pth), a published LoMaR checkpoint, or --resume a "
                       "fine-tuning run's folder")
        if self.eval and not (self.finetune or self.resume):
            raise ConfigError("--eval needs the weights to evaluate: --finetune checkpoint-best.pth or --resume DIR")
        if self.overwrite and self.eval:
            raise ConfigError("--overwrite deletes the run in --output_dir, and --eval only reads weights: drop "
                              "--overwrite")
        if self.overwrite and self.finetune and _inside(self.finetune, self.output_dir):
            raise ConfigError(f"--finetune {self.finetune} lies inside --output_dir {self.output_dir}, which "
                              f"--overwrite deletes first: copy the weights elsewhere or use another --output_dir")
        super().validate()
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ConfigError(f"--clip_grad {self.clip_grad} must be above 0 (leave it out for no clipping)")
        if self.recount < 1:
            raise ConfigError(f"--recount must be at least 1, got {self.recount}")
        if self.depth is not None and self.depth < 1:
            raise ConfigError(f"--depth {self.depth} must be at least 1")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"--layer_decay {self.layer_decay} must be in (0, 1] (1 turns layer decay off)")
        for name in ("drop_path", "smoothing", "reprob", "mixup_prob", "mixup_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name} {getattr(self, name)} must be between 0 and 1")
        if self.smoothing >= 1.0:
            raise ConfigError("--smoothing must be below 1")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError("--mixup and --cutmix are Beta-distribution alphas: 0 (off) or positive")
        from lomar_fast.data.randaugment import parse_rand_augment

        try:
            parse_rand_augment(self.aa)
        except ValueError as e:
            raise ConfigError(f"--aa: {e}") from None
        if self.mixup_active and self.batch_size % 2 and not self.eval:
            raise ConfigError(f"--batch_size {self.batch_size} must be even with mixup/cutmix (pairs are mixed); "
                              f"use an even batch or --mixup 0 --cutmix 0")
        self.resolve_nb_classes()

    @property
    def mixup_active(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0

    def resolve_nb_classes(self, head_rows: int | None = None, weights: str = "the checkpoint") -> int:
        """Flag > (with --eval) the rows of the head in ``weights`` > classes.json beside the data > 1000.

        The labels index the head's rows, so the class lists beside --data_path and --val_path must agree and the
        count must cover them; with --eval an explicit --nb_classes must equal the head's rows."""
        lists = {flag: c for flag in ("data_path", "val_path") if (c := classes_beside(getattr(self, flag)))}
        if len(lists) == 2 and lists["data_path"] != lists["val_path"]:
            raise ConfigError(f"the classes.json beside --data_path {self.data_path} ({len(lists['data_path'])} "
                              f"classes) and the one beside --val_path {self.val_path} "
                              f"({len(lists['val_path'])}) differ, so a label means another class in each; write "
                              f"both splits with one class list (data_prep.write_beton writes them together)")
        if self.nb_classes is not None and self.nb_classes < 1:
            raise ConfigError(f"--nb_classes {self.nb_classes} must be at least 1")
        if self.eval and head_rows is not None:
            if self.nb_classes is not None and self.nb_classes != head_rows:
                raise ConfigError(f"--nb_classes {self.nb_classes} differs from the {head_rows} classes of the head "
                                  f"in {weights}; leave --nb_classes out (--eval takes the checkpoint's)")
            for flag, classes in lists.items():
                if len(classes) > head_rows:
                    raise ConfigError(f"--{flag} {getattr(self, flag)} has {len(classes)} classes (its classes.json), "
                                      f"the head in {weights} only {head_rows}; evaluate it on a val set of the "
                                      f"classes it was fine-tuned on")
            return head_rows
        classes = next(iter(lists.values()), None)
        if self.nb_classes is not None:
            for flag, listed in lists.items():
                if self.nb_classes < len(listed):
                    raise ConfigError(f"--nb_classes {self.nb_classes} is smaller than the {len(listed)} classes in "
                                      f"the classes.json beside --{flag} {getattr(self, flag)}; raise it or leave it "
                                      f"out")
            return self.nb_classes
        return len(classes) if classes is not None else 1000

    ADOPTED_KEYS: ClassVar[tuple[str, ...]] = ("model", "depth", "input_size", "global_pool", "interpolation")

    def adopt_checkpoint_args(self, path: str, loaded: Any = None) -> tuple[list[str], list[str]]:
        """For ``--eval --finetune checkpoint-best.pth``: :meth:`adopt_args` of the settings the checkpoint was
        trained with (saved under ``args``). ``loaded``: the checkpoint's object, when the caller has read it
        already (else it is read from ``path``)."""
        from lomar_fast.checkpoint import checkpoint_args, load_object

        try:
            obj = load_object(path) if loaded is None else loaded
        except Exception:  # noqa: BLE001 - no readable args: keep the flags (loading the weights says why)
            return [], []
        return self.adopt_args(checkpoint_args(obj), f"--finetune {path}")  # a dict, or the reference Namespace

    def adopt_args(self, args: dict[str, Any], weights: str,
                   refuse: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
        """For ``--eval``: take the model settings and the interpolation the weights were trained with (``args``)
        for every one the user did not set. A setting of ``refuse`` the user set to another value is a
        ConfigError naming both. Returns ('name=value' of those taken, a note on each flag that keeps another
        value than the training's)."""
        taken, kept = [], []
        for name in self.ADOPTED_KEYS:
            if args.get(name) is None or args[name] == getattr(self, name):  # None: the weights do not say
                continue
            if name not in self.explicit:
                setattr(self, name, args[name])
                taken.append(f"{name}={args[name]}")
            elif name in refuse:
                raise ConfigError(f"--{name} {getattr(self, name)} differs from the {name} {args[name]} of {weights}; "
                                  f"leave --{name} out (--eval takes the weights' settings)")
            else:
                kept.append(f"--{name} {getattr(self, name)} given: {weights} was trained with {name} {args[name]}")
        return taken, kept


def classes_beside(path: str) -> list[str] | None:
    """The class list of ``classes.json`` beside a .beton, or None."""
    if not path:
        return None
    p = Path(path).parent / "classes.json"
    try:
        data = json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError):
        return None
    return [str(c) for c in data] if isinstance(data, list) else None


HELP = {
    # shared
    "num_workers": "FFCV decode threads per rank",
    "os_cache": "let the OS page cache hold the .beton (false: FFCV's own process cache, for data larger than RAM)",
    "batches_ahead": "batches FFCV prepares ahead of the step",
    "interpolation": "resize of the training crops and the evaluation center crop: area (OpenCV INTER_AREA, FFCV's) "
                     "or bicubic (PIL's antialiased bicubic, pixel for pixel, as the MAE/LoMaR reference pipelines)",
    "batch_size": "micro-batch per GPU (DeepSpeed train_micro_batch_size_per_gpu)",
    "accum_iter": "gradient accumulation steps",
    "blr": "base lr: lr = blr * effective batch / 256",
    "lr": "absolute lr (overrides blr)",
    "min_lr": "lr floor of the cosine schedule",
    "weight_decay": "AdamW weight decay (none on biases and norms; fine-tuning also spares the cls token and "
                    "position embedding, pretraining decays its tokens as the published code does)",
    "output_dir": "where checkpoints, the JSONL log and summary.json go",
    "log_dir": "TensorBoard directory (default: output_dir/tensorboard)",
    "resume": "'auto' (the newest complete checkpoint in output_dir, if any), a run directory, a tag family "
              "(DIR/last, DIR/best) or a tag directory",
    "overwrite": "start afresh in an output_dir that holds a run, deleting its checkpoints and logs",
    "keep_last": "checkpoints kept per tag family; older ones are deleted after a newer one is complete",
    "seed": "seed of weights, data order, augmentation and masks (each rank derives its own streams)",
    "log_every": "read the loss back every N steps (no host sync in between)",
    "max_steps_per_epoch": "cap the micro-steps of each epoch (smoke runs; rounded down to a multiple of "
                           "--accum_iter)",
    "exit_after_epochs": "save and exit after this many epochs in this invocation (time-limited jobs; "
                         "--resume auto continues)",
    "deepspeed_config": "DeepSpeed JSON (ds_configs/)",
    "zero_stage": "override the ZeRO stage of the JSON",
    "kernels": "fused CUDA kernels: on, off or auto (default: $LOMAR_KERNELS or auto)",
    "compile": "torch.compile: auto (on CUDA with ZeRO-0/1/2; eager on a CPU and under ZeRO-3), on, off; "
               "--compile alone is on, --no_compile off",
    "compile_scope": "what --compile compiles: blocks (each transformer block; one shared graph, the throughput "
                     "benchmark's compile rows) or model (the whole module, loss included)",
    "compile_mode": "inductor mode: default or max-autotune-no-cudagraphs (autotuned GEMMs with fused epilogues; "
                    "minutes of autotuning at the start)",
    "compile_backend": "torch.compile backend for --compile (inductor; aot_eager traces without generating code)",
    "device": "cpu or cuda (default: cuda when available)",
    "local_rank": "set by launchers",
    # pretraining
    "model": "model factory name (pretraining: lomar_vit_{tiny,small,base,large,huge}_patch16; fine-tuning: "
             "vit_{tiny,small,base,large,huge}_patch16)",
    "input_size": "image side in pixels (multiple of the patch size 16)",
    "window_size": "window side w in patches",
    "num_window": "windows per image K (at most grid - w + 1)",
    "mask_ratio": "fraction of each window's patches that are masked",
    "norm_pix_loss": "normalize each target patch by its own mean/std",
    "window_sampling": "per_batch (published: one set of windows per micro-batch) or per_image",
    "pairing": "all (every image with its K windows) or published (the reference code's pairing)",
    "drop_path": "stochastic depth rate of the last block (linear from 0)",
    "epochs": "training epochs",
    "warmup_epochs": "epochs of linear lr warmup",
    "data_path": "train.beton written by data_prep/write_beton.py (fine-tuning: with labels)",
    "save_every": "save a checkpoint every N epochs (and at the end)",
    "record_data_order": "write each rank's sample indices per epoch under output_dir/data_order",
    "knn_every": "run the k-NN monitor (k=20, T=0.07) every N epochs and log knn_top1 (0: off; needs "
                 "--knn_train and --knn_val)",
    "knn_train": "labelled .beton whose features are the k-NN neighbours (e.g. a train subset)",
    "knn_val": "labelled .beton whose images are classified by k-NN",
    # fine-tuning
    "nb_classes": "number of classes (default: the length of classes.json beside --data_path, else 1000)",
    "global_pool": "average the patch tokens (true) or take the cls token (false)",
    "depth": "override the model's block count (small demo and test models)",
    "finetune": "initial weights: a lomar_fast export, a published LoMaR checkpoint or a fine-tuned "
                "checkpoint-best.pth (the head is kept only if its shape fits)",
    "layer_decay": "layer-wise lr decay: block i trains at layer_decay ** (depth - i) of the head's lr",
    "clip_grad": "gradient-norm clipping (DeepSpeed gradient_clipping; default: the JSON's)",
    "aa": "RandAugment as timm's config string (rand-m9-mstd0.5-inc1: 2 ops, magnitude 9 with std 0.5, the "
          "increasing op set), applied per image on the device; none turns it off",
    "mixup": "mixup alpha (0: off)",
    "cutmix": "cutmix alpha (0: off)",
    "mixup_prob": "probability of applying mixup or cutmix to a batch",
    "mixup_switch_prob": "probability of cutmix instead of mixup when both are on",
    "mixup_mode": "batch, pair or elem: how mixup parameters are drawn",
    "smoothing": "label smoothing",
    "reprob": "random erasing probability per image",
    "remode": "random erasing fill: pixel (per-pixel noise), rand (per-block colour) or const (zeros)",
    "recount": "random erasing boxes per image",
    "val_path": "val.beton with labels, evaluated after every epoch",
    "eval": "only evaluate --finetune or --resume on --val_path and print top-1/top-5",
}

CHOICES = {"interpolation": INTERPOLATIONS, "window_sampling": ("per_batch", "per_image"),
           "pairing": ("all", "published"), "kernels": ("on", "off", "auto"), "mixup_mode": ("batch", "pair", "elem"),
           "remode": ("pixel", "rand", "const"), "device": ("cpu", "cuda"), "compile": SETTINGS,
           "compile_scope": SCOPES, "compile_mode": MODES}
# string fields that also take a boolean (YAML true/false, --name alone, --no_name): True -> on, False -> off
SWITCHES = ("compile",)


# ------------------------------------------------------------------------------------ typed values
def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _to_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        return int(v.strip())
    raise ValueError


def _to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        return float(v.strip())
    raise ValueError


def _to_str(v: Any) -> str:
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        return str(v)
    raise ValueError


_CONVERTERS: dict[str, Callable[[Any], Any]] = {"bool": _to_bool, "int": _to_int, "float": _to_float, "str": _to_str}


def field_type(f: dataclasses.Field) -> tuple[str, bool]:
    """(base type name, whether None is allowed) of a config field, from its annotation."""
    parts = [p.strip() for p in str(f.type).split("|")]
    base = next(p for p in parts if p != "None")
    if base not in _CONVERTERS:
        raise TypeError(f"config field {f.name} has an unsupported type {f.type}")
    return base, "None" in parts


def convert(f: dataclasses.Field, value: Any, source: str) -> Any:
    """``value`` as field ``f``'s type, or ConfigError naming ``source``, the value and the expected type."""
    base, optional = field_type(f)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{source}: {f.name} cannot be empty; expected {base}")
    if f.name in SWITCHES:
        if isinstance(value, str) and value.strip().lower() in CHOICES[f.name]:
            value = value.strip().lower()
        else:
            try:
                value = "on" if _to_bool(value) else "off"
            except ValueError:
                pass  # reported below as a value outside the choices
    try:
        out = _CONVERTERS[base](value)
    except (ValueError, TypeError):
        raise ConfigError(f"{source}: {f.name} = {value!r} is not a valid {base}"
                          + (" (true/false)" if base == "bool" else "")) from None
    choices = CHOICES.get(f.name)
    if choices and out not in choices:
        raise ConfigError(f"{source}: {f.name} = {value!r} must be one of {', '.join(choices)}")
    return out


def config_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and f.name != "explicit"]


# -------------------------------------------------------------------------------------------- parser
def build_parser(cls, description: str) -> argparse.ArgumentParser:
    """Flags of every field of ``cls``. Values stay strings here; :func:`parse_config` converts them."""
    # no abbreviations: "--deepspeed" (DeepSpeed's convention, ignored here) would be read as --deepspeed_config
    # and "--epoch 1" as --epochs
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--config", default=None, help="YAML file with the same keys as the flags (flags override it)")
    for f in config_fields(cls):
        base, _ = field_type(f)
        names = [f"--{f.name}"] + (["--local-rank"] if f.name == "local_rank" else [])
        text = HELP.get(f.name, f.name) + f" (default {f.default})"
        if f.name in CHOICES:
            text += f"; one of {', '.join(CHOICES[f.name])}"
        if base == "bool" or f.name in SWITCHES:
            p.add_argument(*names, dest=f.name, nargs="?", const="true", default=argparse.SUPPRESS, help=text,
                           metavar=None if base == "bool" else base.upper())
            p.add_argument(f"--no_{f.name}", dest=f.name, action="store_const", const="false",
                           default=argparse.SUPPRESS, help=f"disable --{f.name}")
        else:
            p.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, help=text, metavar=base.upper())
    return p


def parse_config(argv: list[str] | None = None, cls=PretrainConfig, description: str = "LoMaR pretraining"):
    """Defaults < YAML (--config) < flags, each value converted to its field's type.

    Unknown YAML keys and values of the wrong type are a ConfigError naming them.
    """
    parser = build_parser(cls, description)
    args, extra = parser.parse_known_args(argv)
    # DeepSpeed's scripts pass --deepspeed beside --deepspeed_config (its launcher adds only --local_rank, a
    # field); anything else, a stray value or a single-dash flag included, is a typo that would be dropped
    unknown = [a for a in extra if a != "--deepspeed"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    fields = {f.name: f for f in config_fields(cls)}
    given = vars(args)
    values: dict[str, Any] = {}
    explicit: set[str] = set()
    if given.get("config"):
        path = Path(given["config"])
        if not path.is_file():
            raise ConfigError(f"--config {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)  # one line: PyYAML's own text draws the spot over several
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"--config {path} is not valid YAML: {what}{where}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
        bad = sorted(set(map(str, data)) - set(fields))
        if bad:
            raise ConfigError(f"--config {path}: unknown keys {bad}; valid keys are the flag names")
        for k, v in data.items():
            values[k] = convert(fields[k], v, f"--config {path}")
            explicit.add(k)
    for k, v in given.items():
        if k != "config":
            values[k] = convert(fields[k], v, f"--{k}")
            explicit.add(k)
    cfg = cls(**values)
    cfg.explicit = explicit
    return cfg
