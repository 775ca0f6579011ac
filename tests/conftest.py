"""Shared pytest setup: CPU-friendly defaults, the demo data, and one pretraining run shared by the tests
that need trained weights or a run directory."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# idle OpenMP threads sleep instead of spinning: small CPU ops stay fast on a shared machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

# the session's pretraining run: 2 ranks x micro-batch 4 x accum 2 (16 images per step), 3 epochs of 6 micro-steps
# (3 optimizer steps), drop path on (per-rank random streams); tests that repeat part of it (a kill during a
# save, then a resume) reuse these flags
# The entry-point runs in the tests decode with one thread per rank: numba compiles a loader's serial decode loop in
# about 1 s against 3 s for the parallel one, and each run builds several loaders. The parallel loop and its
# independence from the thread count are tested on their own (test_data, test_interpolation).
PRETRAIN_SMALL = ["--model", "lomar_vit_tiny_patch16", "--input_size", "64", "--window_size", "3", "--num_window", "2",
                  "--num_workers", "1", "--log_every", "1", "--deepspeed_config", "ds_configs/cpu.json",
                  "--zero_stage", "2", "--batch_size", "4", "--accum_iter", "2", "--epochs", "3",
                  "--warmup_epochs", "1", "--blr", "4e-3", "--max_steps_per_epoch", "6", "--save_every", "1",
                  "--drop_path", "0.2", "--record_data_order"]
PRETRAIN_RANKS = 2


# the suite's groups on pytest-xdist's workers (``make test``) and the data built once per run
from xdist_groups import (built_once, pytest_collection_finish, pytest_collection_modifyitems,  # noqa: E402,F401
                          pytest_configure, pytest_configure_node, pytest_xdist_make_scheduler)


@pytest.fixture
def kernels_on():
    """LOMAR_KERNELS=on for the test; exact fp32 matmuls (no TF32) so fp32 tolerances stay tight."""
    from lomar_fast.ops._dispatch import set_kernels

    set_kernels("on")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32
    set_kernels(None)


@pytest.fixture
def seed() -> int:
    """Seed torch's global RNG for a reproducible test; returns the seed."""
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def small_demo(request, tmp_path_factory) -> dict:
    """The demo dataset at 16 train + 4 val images per class (128 + 32), built once per session, plus a
    val set of 29 images (an odd count, not a multiple of any batch or rank count, so a padded or dropped
    tail would change what evaluation counts)."""
    import shutil

    from data_prep.make_demo import make_demo
    from data_prep.write_beton import WriteOptions, write_dataset

    def build(root):
        make_demo(root, train_per_class=16, val_per_class=4, quiet=True)
        src = root / "odd_src"
        shutil.copytree(root / "imagefolder" / "val", src / "val")
        for d in sorted((src / "val").iterdir())[:3]:
            sorted(d.iterdir())[0].unlink()
        write_dataset(src, root / "odd", ("val",), WriteOptions(max_side=256, workers=2, force=True, progress=False))

    root = built_once(request, tmp_path_factory, "demo", build)
    return {"root": root, "train": root / "train.beton", "val": root / "odd" / "val.beton", "n_train": 128,
            "n_val": 29}


@pytest.fixture(scope="session")
def mini_demo(request, tmp_path_factory) -> dict:
    """The demo dataset at 2 train + 1 val image per class (16 + 8, 8 classes): for the tests that only need
    valid labelled .beton files (bad-input checks, k-NN plumbing), quicker to build than ``small_demo``."""
    from data_prep.make_demo import make_demo

    root = built_once(request, tmp_path_factory, "mini_demo",
                      lambda root: make_demo(root, train_per_class=2, val_per_class=1, quiet=True))
    return {"root": root, "train": root / "train.beton", "val": root / "val.beton", "n_train": 16, "n_val": 8}


@pytest.fixture(scope="session")
def pretrain_run(small_demo, tmp_path_factory) -> dict:
    """``lomar_fast.pretrain`` on the demo data through the ``deepspeed`` launcher on 2 CPU ranks (tiny LoMaR at
    64 px, ``PRETRAIN_SMALL``: a checkpoint each epoch, the k-NN monitor after the last), then its export: the
    run directory, the process result, and ``model.pth``."""
    from launch import launch

    from lomar_fast.export import export

    out = tmp_path_factory.mktemp("pretrain") / "run"
    proc = launch("pretrain", ["--data_path", str(small_demo["train"]), "--output_dir", str(out), *PRETRAIN_SMALL,
                               "--knn_every", "3", "--knn_train", str(small_demo["train"]),
                               "--knn_val", str(small_demo["val"])], ranks=PRETRAIN_RANKS)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    model = export(str(out), str(out.parent / "model.pth"))
    return {"out": out, "proc": proc, "model": model, "demo": small_demo}


@pytest.fixture
def in_process_world():
    """Run an entry point inside the test process as a world of one (a process group over gloo, as a plain
    ``python -m`` start makes it), then take the process group and the launcher variables away again."""
    import deepspeed.comm.comm as ds_comm

    from lomar_fast.distributed import shutdown_distributed

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    yield
    shutdown_distributed()  # also drops DeepSpeed's cached groups (data/sequence parallel)
    ds_comm.cdb = None
    for k in keys:  # what the entry point set (not through monkeypatch, which would put it back afterwards)
        os.environ.pop(k, None)
    os.environ.update(saved)
