"""Shared pytest setup: CPU-friendly defaults and a seeded RNG."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# idle OpenMP threads sleep instead of spinning: small CPU ops stay fast on a shared machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def seed() -> int:
    """Seed torch's global RNG for a reproducible test; returns the seed."""
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> dict:
    """The demo dataset at 16 train + 4 val images per class (128 + 32), built once per session, plus a
    val set of 29 images (an odd count, not a multiple of any batch or rank count, so a padded or dropped
    tail would change what evaluation counts)."""
    import shutil

    from data_prep.make_demo import make_demo
    from data_prep.write_beton import WriteOptions, write_dataset

    root = tmp_path_factory.mktemp("demo")
    make_demo(root, train_per_class=16, val_per_class=4, quiet=True)
    src = root / "odd_src"
    shutil.copytree(root / "imagefolder" / "val", src / "val")
    for d in sorted((src / "val").iterdir())[:3]:
        sorted(d.iterdir())[0].unlink()
    write_dataset(src, root / "odd", ("val",), WriteOptions(max_side=256, workers=2, force=True, progress=False))
    return {"root": root, "train": root / "train.beton", "val": root / "odd" / "val.beton", "n_train": 128,
            "n_val": 29}
