"""Consolidate a DeepSpeed pretraining checkpoint into fp32 weights in the published LoMaR layout.

``python -m lomar_fast.export --checkpoint OUTPUT_DIR [--tag epoch0399] --out model.pth``

ZeRO 1/2/3 shards are merged from the fp32 master copies; a stage-0 checkpoint takes the module
weights. The result is ``{"model": state_dict, "args": pretraining config, "epoch": E}``, checked
key-by-key against the model the config describes, and loadable by ``lomar_fast.checkpoint`` and by
the fine-tuning model.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from lomar_fast import run_dir
from lomar_fast.checkpoint import CheckpointMismatch, compare_keys, save_checkpoint
from lomar_fast.cli import run_cli
from lomar_fast.errors import ConfigError


def _resolve(checkpoint: str, tag: str | None) -> tuple[Path, str]:
    """The run directory and tag to export: ``--tag`` in ``--checkpoint``, else lomar_fast.run_dir's resume rule
    (the tag ``latest`` names, the newest complete one, the tag directory given, or ``DIR/<family>``: the newest
    complete tag of that family)."""
    root = Path(checkpoint)
    if root.is_file() or (tag is not None and not root.is_dir()):
        raise ConfigError(f"--checkpoint {root} is not a directory; pass the --output_dir of a pretraining run")
    if tag is not None:
        if not run_dir.is_complete(root / tag):
            raise ConfigError(f"--checkpoint {root}: no complete checkpoint tag {tag} (tags there: "
                              f"{', '.join(run_dir.tags(root)) or 'none'})")
        return root, tag
    # "auto" as its absolute path: a folder named so is a folder here, not --resume's keyword
    point = run_dir.find_resume(str(root.resolve()) if str(root) == "auto" else str(root), str(root), "epoch",
                                flag="--checkpoint")
    if point is None:
        raise ConfigError(f"--checkpoint {root} holds no complete checkpoint tag; pass a run's --output_dir")
    return Path(point.root), point.tag


def consolidate(checkpoint: str, tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 state dict, client state) of a DeepSpeed checkpoint."""
    root, tag = _resolve(checkpoint, tag)
    # ZeRO-0/1/2: mp_rank_00_model_states.pt; ZeRO-3: one zero_pp_rank_<r>_mp_rank_00_model_states.pt per rank
    states = sorted((root / tag).glob("*mp_rank_*_model_states.pt"))
    if not states:
        raise ConfigError(f"{root / tag} holds no *mp_rank_*_model_states.pt: not a DeepSpeed checkpoint")
    client = torch.load(states[0], map_location="cpu", weights_only=False)
    zero_files = list((root / tag).glob("*optim_states.pt"))
    stage = int(client.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)) if isinstance(
        client.get("ds_config"), dict) else None
    if zero_files and stage != 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:
        sd = client["module"]
    sd = {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in sd.items()}
    meta = {k: client[k] for k in ("epoch", "step") if k in client}
    config = (client.get("run") or {}).get("config") or client.get("config")  # the trainer saves it under "run"
    if config:
        meta["config"] = config
    return sd, meta


def _refuse_fine_tuning(cfg: dict | None, checkpoint: str) -> None:
    if cfg and "window_size" not in cfg:
        raise ConfigError(f"--checkpoint {checkpoint} is a fine-tuning run ({cfg.get('model')}), not a pretraining "
                          f"one: its checkpoint-best.pth already holds the fp32 weights")


def export(checkpoint: str, out: str, tag: str | None = None) -> Path:
    outp = run_dir.prepare_output_file(out, "--out", "model.pth")  # before the consolidation, which takes a while
    root, tag = _resolve(checkpoint, tag)
    if outp.resolve().parent == (root / tag).resolve():
        raise ConfigError(f"--out {outp} lies in the checkpoint tag {root / tag} it is exported from; pass a path "
                          f"outside it")
    # the run's settings, saved beside the tag, tell a fine-tuning run before the consolidation
    _refuse_fine_tuning(run_dir.saved_run(run_dir.ResumePoint(str(root), tag)).get("config"), checkpoint)
    sd, meta = consolidate(str(root), tag)
    cfg = meta.get("config")
    _refuse_fine_tuning(cfg, checkpoint)
    if cfg:
        from lomar_fast.models import create_model

        model = create_model(cfg["model"], img_size=cfg["input_size"], window_size=cfg["window_size"],
                             num_window=cfg["num_window"], mask_ratio=cfg["mask_ratio"])
        expected = model.state_dict()
        problems = compare_keys(expected, sd)
        if problems:
            raise CheckpointMismatch(f"{checkpoint}: consolidated weights do not fit {cfg['model']}: " + "; ".join(problems))
    with run_dir.writing(outp, "--out"):
        return save_checkpoint(sd, outp, args=cfg or {}, epoch=meta.get("epoch"), step=meta.get("step"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="the --output_dir of a pretraining run, one tag directory, or "
                                                       "RUN/<family> (RUN/epoch: the newest complete epoch tag)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
    p.add_argument("--out", required=True, help="output .pth")
    a = p.parse_args(argv)
    path = export(a.checkpoint, a.out, a.tag)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(main)
