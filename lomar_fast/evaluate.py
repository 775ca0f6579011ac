"""Classification evaluation over a whole labelled ``.beton``: each image exactly once across ranks."""
from __future__ import annotations

from typing import Callable

import torch

from lomar_fast.compilation import eager
from lomar_fast.data.shard import Shard
from lomar_fast.distributed import all_reduce
from lomar_fast.images import normalize_images


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], shard: Shard, dtype: torch.dtype,
             num_classes: int) -> dict[str, float]:
    """Top-1 / top-5 (percent) and mean cross-entropy of ``forward`` over the whole val set.

    ``shard`` is this rank's slice (lomar_fast.data.shard.build_shard); every rank runs the same number of
    forwards, padding batches are masked out, counts are summed over ranks, and the total counted must
    equal the file's image count. A compiled model runs eagerly (lomar_fast.compilation.eager).
    """
    counts = torch.zeros(4, dtype=torch.float64, device=shard.device)  # top1, top5, n, loss sum
    k = min(5, num_classes)
    for images, labels in shard.batches():
        with eager():  # compiled blocks run eagerly here: no extra graphs for no-grad, padded batches
            logits = forward(normalize_images(images).to(dtype)).float()
        valid = labels >= 0
        safe = labels.clamp(min=0)
        hit = logits.topk(k, dim=1).indices == safe[:, None]
        loss = torch.nn.functional.cross_entropy(logits, safe, reduction="none")
        counts += torch.stack([(hit[:, 0] & valid).sum(), (hit.any(dim=1) & valid).sum(), valid.sum(),
                               (loss * valid).sum()]).double()
    if int(counts[2].item()) != shard.n:
        raise RuntimeError(f"evaluation read {int(counts[2].item())} images of this rank's {shard.n}")
    all_reduce(counts)
    n = int(counts[2].item())
    if n != shard.total:
        raise RuntimeError(f"evaluation counted {n} images, the val set holds {shard.total}")
    return {"val_top1": 100.0 * float(counts[0]) / n, "val_top5": 100.0 * float(counts[1]) / n,
            "val_loss": float(counts[3]) / n, "val_n": n}
