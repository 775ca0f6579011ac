"""Evaluation-style reading: each rank reads a disjoint contiguous slice of a labelled ``.beton`` with the
validation pipeline (every image exactly once over the ranks, nothing dropped), and every rank runs the
same number of batches, padding with empty batches, so collectives inside a forward pass (ZeRO-3's
parameter all-gathers) line up across ranks.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from lomar_fast.distributed import rank_world
from lomar_fast.images import DEFAULT_INTERPOLATION


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous slice of n items; slices are disjoint and cover 0..n-1."""
    return n * rank // world, n * (rank + 1) // world


@dataclass
class Shard:
    """This rank's slice of a labelled ``.beton``: ``loader`` (None for an empty slice), its image count
    ``n``, the file's image count ``total``, and the batch count every rank runs."""

    loader: object | None
    n: int
    total: int
    num_batches: int
    batch_size: int
    input_size: int
    device: torch.device

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``num_batches`` batches of (uint8 (b, S, S, 3), int64 (b,) labels): this rank's images in file
        order, then padding batches of one black image labelled -1 (mask them out with ``labels >= 0``)."""
        done = 0
        if self.loader is not None:
            for images, labels in self.loader:
                done += 1
                yield images, labels.reshape(-1).long()
        if done > self.num_batches:
            raise RuntimeError(f"shard read {done} batches, more than the {self.num_batches} every rank runs")
        pad_images = torch.zeros((1, self.input_size, self.input_size, 3), dtype=torch.uint8, device=self.device)
        pad_labels = torch.full((1,), -1, dtype=torch.long, device=self.device)
        for _ in range(self.num_batches - done):
            yield pad_images, pad_labels


def build_shard(path: str | os.PathLike, batch_size: int, input_size: int, device: torch.device | str,
                num_workers: int | None = None, rank: int | None = None, world: int | None = None,
                os_cache: bool = True, batches_ahead: int = 2, interpolation: str = DEFAULT_INTERPOLATION) -> Shard:
    """This rank's :class:`Shard` of ``path`` (center crop to ``input_size``, resized with ``interpolation``, see
    ``val_pipelines``)."""
    import numpy as np
    from ffcv.loader import OrderOption

    from .beton import check_beton
    from .loaders import _loader_class, construct_loader, loader_workers, val_pipelines

    if rank is None or world is None:
        rank, world = rank_world()
    device = torch.device(device)
    info = check_beton(path, need_label=True, input_size=input_size)
    total = int(info["num_images"])
    largest = math.ceil(total / world)  # the first rank with the most images
    num_batches = math.ceil(largest / batch_size)
    start, stop = shard_bounds(total, rank, world)
    loader = None
    if stop > start:
        def make():
            pipes = {name: None for name in info["fields"]}
            pipes.update(val_pipelines(input_size, device, interpolation))
            # the package's loader class: a new pass stops one left unfinished (a consumer that raised mid-shard)
            return _loader_class(image_only=False)(str(path), batch_size=batch_size,
                                                   num_workers=loader_workers(num_workers),
                                                   os_cache=os_cache, order=OrderOption.SEQUENTIAL,
                                                   distributed=False, indices=np.arange(start, stop), pipelines=pipes,
                                                   drop_last=False, batches_ahead=batches_ahead)

        loader = construct_loader(make)
    return Shard(loader, stop - start, total, num_batches, batch_size, input_size, device)
