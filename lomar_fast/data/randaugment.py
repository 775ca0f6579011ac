"""RandAugment for uint8 NHWC batches, applied per sample on the batch's own device.

The fine-tuning recipe uses timm's ``--aa rand-m9-mstd0.5-inc1``: two ops per image drawn from
the "increasing" op set, magnitude 9 with Gaussian noise of std 0.5, each op applied with
probability 0.5. This module reads the same config strings and reproduces the same ops with
the same pixel arithmetic as timm's PIL pipeline, but on whole batches of tensors:

* every image draws its own ops, magnitudes, signs and apply/skip decisions;
* colour ops that map each channel value independently (AutoContrast, Equalize, Invert,
  Posterize, Solarize, SolarizeAdd, Brightness, Contrast) become one per-sample, per-channel
  256-entry lookup table, applied to the batch with one gather;
* Color and Sharpness are per-sample blends with the grayscale image and with the 3x3 SMOOTH
  filter result;
* geometric ops (Rotate, ShearX/Y, TranslateX/Y, TranslateXRel/YRel) are one per-sample affine
  resample (inverse mapping of output pixel centres, PIL's bicubic (a = -1) or bilinear taps,
  edge-clamped taps, fill colour outside the source image).

Randomness is a pure function of ``(seed, epoch, sample index)``: every number is a
counter-based splitmix64 hash of those three values, an op slot and a purpose, computed with
int64 tensor arithmetic. The same sample therefore gets the same augmentation whatever the
batch composition, the number of ranks, or whether the run was resumed.

Typical use (per training batch)::

    ra = build_rand_augment("rand-m9-mstd0.5-inc1", img_size=224)   # None for "none"
    images = ra(images, seed=seed, epoch=epoch, indices=batch_indices)

``images`` is a uint8 (B, S, S, 3) tensor on any device; ``batch_indices`` are the dataset
indices of the batch's samples, an int64 (B,) tensor. Pass them on the CPU (as the loader's
epoch order provides them): the random plan is then drawn on the host and each op runs only on
the images that drew it. With ``indices`` on the accelerator the plan is drawn there and every
op runs on the whole batch with identity parameters for the images that did not draw it (no
host synchronisation either way; the pixels are the same).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from lomar_fast.images import IMAGENET_MEAN

__all__ = [
    "RandAugment", "RandAugmentConfig", "RandAugmentPlan", "build_rand_augment", "parse_rand_augment",
    "apply_op", "level_arg", "fill_color", "DEFAULT_OPS", "INCREASING_OPS", "WEIGHTED_OPS",
    "LEVEL_DENOM", "IMAGENET_DEFAULT_MEAN",
]

LEVEL_DENOM = 10.0
IMAGENET_DEFAULT_MEAN = IMAGENET_MEAN

DEFAULT_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
INCREASING_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
# the 'tweights' transform set: relative choice weights, drawn without replacement
WEIGHTED_OPS: dict[str, float] = {
    "Rotate": 3, "ShearX": 2, "ShearY": 2, "TranslateXRel": 1, "TranslateYRel": 1,
    "ColorIncreasing": 0.25, "SharpnessIncreasing": 0.25, "AutoContrast": 0.25,
    "SolarizeIncreasing": 0.05, "SolarizeAdd": 0.05, "ContrastIncreasing": 0.05,
    "BrightnessIncreasing": 0.05, "Equalize": 0.05, "PosterizeIncreasing": 0.05, "Invert": 0.05,
}

# op name -> (family, lookup-table code); the code is 0 for ops that are not lookup tables
_LUT_IDENTITY, _LUT_AUTOCONTRAST, _LUT_EQUALIZE, _LUT_INVERT, _LUT_POSTERIZE = 0, 1, 2, 3, 4
_LUT_SOLARIZE, _LUT_SOLARIZE_ADD, _LUT_BRIGHTNESS, _LUT_CONTRAST = 5, 6, 7, 8
_AFF_NONE, _AFF_ROTATE, _AFF_SHEAR_X, _AFF_SHEAR_Y, _AFF_SHIFT_X, _AFF_SHIFT_Y = 0, 1, 2, 3, 4, 5

# geometric ops that move along one axis only: 1 = rows kept (x), 2 = columns kept (y), else 0
_AXES = {_AFF_SHEAR_X: 1, _AFF_SHIFT_X: 1, _AFF_SHEAR_Y: 2, _AFF_SHIFT_Y: 2}

_OPS: dict[str, tuple[str, int]] = {
    "AutoContrast": ("lut", _LUT_AUTOCONTRAST), "Equalize": ("lut", _LUT_EQUALIZE),
    "Invert": ("lut", _LUT_INVERT),
    "Posterize": ("lut", _LUT_POSTERIZE), "PosterizeIncreasing": ("lut", _LUT_POSTERIZE),
    "PosterizeOriginal": ("lut", _LUT_POSTERIZE),
    "Solarize": ("lut", _LUT_SOLARIZE), "SolarizeIncreasing": ("lut", _LUT_SOLARIZE),
    "SolarizeAdd": ("lut", _LUT_SOLARIZE_ADD),
    "Brightness": ("lut", _LUT_BRIGHTNESS), "BrightnessIncreasing": ("lut", _LUT_BRIGHTNESS),
    "Contrast": ("lut", _LUT_CONTRAST), "ContrastIncreasing": ("lut", _LUT_CONTRAST),
    "Color": ("color", 0), "ColorIncreasing": ("color", 0),
    "Sharpness": ("sharpness", 0), "SharpnessIncreasing": ("sharpness", 0),
    "Rotate": ("affine", _AFF_ROTATE), "ShearX": ("affine", _AFF_SHEAR_X), "ShearY": ("affine", _AFF_SHEAR_Y),
    "TranslateX": ("affine", _AFF_SHIFT_X), "TranslateY": ("affine", _AFF_SHIFT_Y),
    "TranslateXRel": ("affine", _AFF_SHIFT_X), "TranslateYRel": ("affine", _AFF_SHIFT_Y),
}
_SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel",
           "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}
_INTERPOLATIONS = ("bicubic", "bilinear", "random")

_FORMAT = ("expected 'rand' followed by '-'-separated sections m<int> (magnitude, default 10), "
           "n<int> (ops per image, default 2), p<float> (probability of each op, default 0.5), "
           "mstd<float> (magnitude noise std; >100 means uniform in [0, m]), mmax<int> (magnitude "
           "upper bound, default 10), inc<0|1> (increasing op set), tweights (weighted op set), "
           "e.g. 'rand-m9-mstd0.5-inc1'; or 'none' / '' for no RandAugment")


# ----------------------------------------------------------------------------------------------
# config strings

@dataclass(frozen=True)
class RandAugmentConfig:
    """A parsed RandAugment config string.

    ``ops`` is the op set each image chooses from; ``weights`` (same length, summing to 1) is set
    for weighted sets, which are drawn without replacement, else ops are drawn uniformly with
    replacement. A drawn op is applied with probability ``prob``; its magnitude is ``magnitude``
    plus N(0, magnitude_std) noise (uniform in [0, magnitude] when magnitude_std is inf), clipped
    to [0, magnitude_max or 10].
    """

    config: str
    ops: tuple[str, ...]
    weights: tuple[float, ...] | None
    magnitude: int
    num_layers: int
    prob: float
    magnitude_std: float
    magnitude_max: int | None
    increasing: bool

    @property
    def upper_bound(self) -> float:
        return float(self.magnitude_max or LEVEL_DENOM)


def _bad(config: str, why: str) -> ValueError:
    return ValueError(f"RandAugment config {config!r}: {why}; {_FORMAT}")


def parse_rand_augment(config: str | None) -> RandAugmentConfig | None:
    """Parses a timm RandAugment string such as ``'rand-m9-mstd0.5-inc1'``; None for ``'none'``/empty.

    Same keys, defaults and precedence as timm: a repeated m, n, p or inc takes the last value,
    a repeated mstd or mmax the first; mstd > 100 means uniform magnitudes. Stricter than timm:
    a section without a known key (timm skips sections without digits) and a transform set
    other than ``tweights`` raise ValueError naming the string and the format.
    """
    if config is None:
        return None
    if not isinstance(config, str):
        raise ValueError(f"RandAugment config must be a string, got {config!r}; {_FORMAT}")
    s = config.strip()
    if s.lower() in ("", "none"):
        return None
    parts = s.split("-")
    if parts[0] != "rand":
        raise _bad(config, f"only RandAugment ('rand-...') is supported, not {parts[0]!r}")
    magnitude, num_layers, prob, increasing = int(LEVEL_DENOM), 2, 0.5, False
    mstd: float | None = None
    mmax: int | None = None
    tset: str | None = None
    for c in parts[1:]:
        if c.startswith("t"):
            if tset is None:
                tset = c[1:]
            continue
        m = re.fullmatch(r"([a-z]*)(\d.*)", c)
        if m is None:
            raise _bad(config, f"section {c!r} is not <key><number>")
        key, val = m.groups()
        try:
            if key == "mstd":
                v = float(val)
                if mstd is None:
                    mstd = math.inf if v > 100 else v
            elif key == "mmax":
                if mmax is None:
                    mmax = int(val)
            elif key == "inc":
                increasing = bool(int(val))
            elif key == "m":
                magnitude = int(val)
            elif key == "n":
                num_layers = int(val)
            elif key == "p":
                prob = float(val)
            else:
                raise _bad(config, f"unknown key {key!r} in section {c!r}")
        except ValueError as e:
            if str(e).startswith("RandAugment config"):
                raise
            raise _bad(config, f"bad number {val!r} for key {key!r}") from None
    if mstd is not None and not mstd >= 0:
        raise _bad(config, "mstd must be >= 0")
    weights = None
    if tset is None:
        ops = INCREASING_OPS if increasing else DEFAULT_OPS
    elif tset == "weights":
        ops = tuple(WEIGHTED_OPS)
        total = sum(WEIGHTED_OPS.values())
        weights = tuple(w / total for w in WEIGHTED_OPS.values())
        if num_layers > len(ops):
            raise _bad(config, f"n{num_layers} is more than the {len(ops)} ops of the weighted set, "
                               f"which are drawn without replacement")
    elif tset in ("3a", "3aw"):
        raise _bad(config, f"transform set 't{tset}' (GaussianBlur, Desaturate) is not supported")
    else:
        raise _bad(config, f"unknown transform set 't{tset}'")
    return RandAugmentConfig(config=config, ops=ops, weights=weights, magnitude=magnitude,
                             num_layers=num_layers, prob=prob, magnitude_std=mstd or 0.0,
                             magnitude_max=mmax, increasing=increasing)


def fill_color(mean: Sequence[float] = IMAGENET_DEFAULT_MEAN) -> tuple[int, int, int]:
    """Fill colour of the geometric ops: the dataset mean in 0..255, rounded half to even."""
    if len(mean) != 3:
        raise ValueError(f"mean must have 3 values (RGB), got {mean!r}")
    return tuple(min(255, round(255 * float(m))) for m in mean)


# ----------------------------------------------------------------------------------------------
# counter-based random numbers: splitmix64 in int64 tensor arithmetic (multiplication wraps)

def _s64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _s64(0x9E3779B97F4A7C15)
_MUL1 = _s64(0xBF58476D1CE4E5B9)
_MUL2 = _s64(0x94D049BB133111EB)
_STREAM = _s64(0x52414E44415547)  # separates these draws from any other use of the same seed
_P_OP, _P_APPLY, _P_MAG1, _P_MAG2, _P_SIGN, _P_INTERP = range(6)
_PURPOSES = 8


def _srl(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 values."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _fmix(z: Tensor) -> Tensor:
    z = (z ^ _srl(z, 30)) * _MUL1
    z = (z ^ _srl(z, 27)) * _MUL2
    return z ^ _srl(z, 31)


def sample_keys(seed: int, epoch: int, indices: Tensor) -> Tensor:
    """int64 (B,) key of each sample: splitmix64 chained over (seed, epoch, index)."""
    k = _fmix(torch.full_like(indices, _s64((_s64(seed) ^ _STREAM) + _GOLDEN)))
    k = _fmix(k + (_s64(epoch) + _GOLDEN))
    return _fmix(k + indices + _GOLDEN)


def _draw(keys: Tensor, slot: int, purpose: int) -> Tensor:
    """Uniform float64 in [0, 1) per sample: output number (slot*8 + purpose) of splitmix64 from the key."""
    counter = slot * _PURPOSES + purpose + 1
    h = _fmix(keys + _s64(counter * _GOLDEN))
    return _srl(h, 11).to(torch.float64) * (2.0 ** -53)


def _hash_reference(seed: int, epoch: int, index: int, slot: int, purpose: int) -> float:
    """Pure-Python integer version of :func:`_draw` (defines the numbers independently of torch)."""
    m = (1 << 64) - 1

    def fmix(z: int) -> int:
        z &= m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    g = 0x9E3779B97F4A7C15
    k = fmix(((seed & m) ^ (_STREAM & m)) + g)
    k = fmix(k + (epoch & m) + g)
    k = fmix(k + (index & m) + g)
    h = fmix(k + (slot * _PURPOSES + purpose + 1) * g)
    return (h >> 11) * 2.0 ** -53


# ----------------------------------------------------------------------------------------------
# the random plan

@dataclass
class RandAugmentPlan:
    """Per-sample decisions for every op slot, all (B, n) tensors on the device of the indices.

    op: int64 index into the config's op set; apply: bool; magnitude: float64 after noise and
    clipping; negate: bool, the sign draw of signed ops; bicubic: bool, the interpolation of
    geometric ops (all True unless the interpolation is 'random').
    """

    op: Tensor
    apply: Tensor
    magnitude: Tensor
    negate: Tensor
    bicubic: Tensor


def draw_plan(cfg: RandAugmentConfig, seed: int, epoch: int, indices: Tensor,
              interpolation: str = "bicubic") -> RandAugmentPlan:
    """Draws every image's ops, apply decisions, magnitudes and signs from (seed, epoch, index)."""
    keys = sample_keys(seed, epoch, indices)
    b, n, k = indices.shape[0], cfg.num_layers, len(cfg.ops)
    dev = indices.device
    ops, applies, mags, negs, cubics = [], [], [], [], []
    if cfg.weights is not None:
        remaining = _to_device(torch.tensor(cfg.weights, dtype=torch.float64), dev).expand(b, k).clone()
    for slot in range(n):
        u = _draw(keys, slot, _P_OP)
        if cfg.weights is None:
            op = (u * k).floor().to(torch.int64).clamp_(max=k - 1)
        else:  # successive draws proportional to the weights of the ops not yet drawn
            cdf = remaining.cumsum(1)
            target = u * cdf[:, -1]
            op = (cdf <= target[:, None]).sum(1).clamp_(max=k - 1)
            remaining.scatter_(1, op[:, None], 0.0)
        if cfg.prob < 1.0:  # applied unless a uniform draw exceeds prob
            apply = _draw(keys, slot, _P_APPLY) <= cfg.prob
        else:
            apply = torch.ones(b, dtype=torch.bool, device=dev)
        mag = torch.full((b,), float(cfg.magnitude), dtype=torch.float64, device=dev)
        if cfg.magnitude_std == math.inf:
            mag = mag * _draw(keys, slot, _P_MAG1)
        elif cfg.magnitude_std > 0:
            u1, u2 = _draw(keys, slot, _P_MAG1), _draw(keys, slot, _P_MAG2)
            normal = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos((2.0 * math.pi) * u2)
            mag = mag + cfg.magnitude_std * normal
        mag = mag.clamp(0.0, cfg.upper_bound)
        negate = _draw(keys, slot, _P_SIGN) > 0.5
        if interpolation == "random":
            cubic = _draw(keys, slot, _P_INTERP) >= 0.5
        else:
            cubic = torch.full((b,), interpolation == "bicubic", dtype=torch.bool, device=dev)
        ops.append(op), applies.append(apply), mags.append(mag), negs.append(negate), cubics.append(cubic)
    stack = (lambda xs, dt: torch.stack(xs, 1) if xs else torch.zeros((b, 0), dtype=dt, device=dev))
    return RandAugmentPlan(op=stack(ops, torch.int64), apply=stack(applies, torch.bool),
                           magnitude=stack(mags, torch.float64), negate=stack(negs, torch.bool),
                           bicubic=stack(cubics, torch.bool))


# ----------------------------------------------------------------------------------------------
# magnitude -> op argument

def level_arg(name: str, magnitude: Tensor, negate: Tensor, translate_const: float = 100.0,
              translate_pct: float = 0.45) -> Tensor:
    """The op's argument (float64, same shape as ``magnitude``) at the given magnitudes.

    Rotate: degrees; ShearX/Y: shear factor; TranslateX/Y: pixels; TranslateXRel/YRel: fraction
    of the image side; Posterize*: bits kept; Solarize*: threshold; SolarizeAdd: amount added
    below 128; Color/Contrast/Brightness/Sharpness*: enhance factor (1 = unchanged); 0 for ops
    without an argument. ``negate`` flips the sign of signed ops (the ``*Increasing`` enhance
    ops flip the offset from 1).
    """
    if name not in _OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {sorted(_OPS)}")
    m = _div(magnitude.to(torch.float64), LEVEL_DENOM)
    sign = torch.where(negate, -1.0, 1.0).to(torch.float64)
    if name in ("AutoContrast", "Equalize", "Invert"):
        return torch.zeros_like(m)
    if name == "Rotate":
        return sign * (m * 30.0)
    if name in ("ShearX", "ShearY"):
        return sign * (m * 0.3)
    if name in ("TranslateX", "TranslateY"):
        return sign * (m * float(translate_const))
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * (m * float(translate_pct))
    if name == "Posterize":
        return torch.trunc(m * 4.0)
    if name == "PosterizeIncreasing":
        return 4.0 - torch.trunc(m * 4.0)
    if name == "PosterizeOriginal":
        return torch.trunc(m * 4.0) + 4.0
    if name == "Solarize":
        return torch.trunc(m * 256.0).clamp(max=256.0)
    if name == "SolarizeIncreasing":
        return 256.0 - torch.trunc(m * 256.0).clamp(max=256.0)
    if name == "SolarizeAdd":
        return torch.trunc(m * 110.0).clamp(max=128.0)
    if name.endswith("Increasing"):  # Color/Contrast/Brightness/Sharpness, 1 -/+ up to 0.9
        return (1.0 + sign * (m * 0.9)).clamp(min=0.1)
    return m * 1.8 + 0.1  # Color, Contrast, Brightness, Sharpness


# ----------------------------------------------------------------------------------------------
# pixel kernels; images are uint8 (b, H, W, 3) throughout

def _div(a: Tensor, b: float) -> Tensor:
    """a / b correctly rounded, as Python divides (a Python-scalar divisor may become a
    multiplication by its reciprocal on some devices, and scalar / tensor always does)."""
    return torch.div(a, torch.full_like(a, b))


def _blend(degenerate: Tensor, image: Tensor, alpha: Tensor) -> Tensor:
    """PIL's Image.blend(degenerate, image, alpha) for 8-bit data: float32 d + a*(i - d), clipped, truncated.

    ``alpha``: float32 broadcastable to the images.
    """
    d = degenerate.to(torch.float32)
    v = d + alpha * (image.to(torch.float32) - d)
    return v.clamp_(0.0, 255.0).to(torch.uint8)


def _gray(images: Tensor) -> Tensor:
    """PIL's RGB -> L conversion (fixed point ITU-R 601-2 luma, rounded), int32 (b, H, W)."""
    x = images.to(torch.int32)
    return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16


def _histograms(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel histograms int64 (b, 3, 256) and the flat LUT index of every value."""
    b = images.shape[0]
    base = (torch.arange(b, device=images.device) * 768).view(b, 1, 1, 1) \
        + (torch.arange(3, device=images.device) * 256).view(1, 1, 1, 3)
    idx = (images.to(torch.int64) + base).reshape(-1)
    hist = torch.zeros(b * 768, dtype=torch.int64, device=images.device)
    hist.scatter_add_(0, idx, torch.ones(1, dtype=torch.int64, device=images.device).expand(idx.shape[0]))
    return hist.view(b, 3, 256), idx


def _equalize_lut(hist: Tensor) -> Tensor:
    """ImageOps.equalize's table per channel, int64 (b, 3, 256)."""
    present = hist > 0
    last = 255 - present.flip(-1).to(torch.uint8).argmax(-1, keepdim=True)
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last)) // 255
    before = hist.cumsum(-1) - hist
    lut = torch.div(step // 2 + before, step.clamp(min=1), rounding_mode="floor").clamp_(max=255)
    keep = (present.sum(-1, keepdim=True) <= 1) | (step == 0)
    return torch.where(keep, torch.arange(256, device=hist.device), lut)


def _autocontrast_lut(hist: Tensor) -> Tensor:
    """ImageOps.autocontrast's table (cutoff 0) per channel, int64 (b, 3, 256)."""
    present = hist > 0
    lo = present.to(torch.uint8).argmax(-1, keepdim=True)
    hi = 255 - present.flip(-1).to(torch.uint8).argmax(-1, keepdim=True)
    span = (hi - lo).clamp(min=1).to(torch.float64)
    scale = torch.div(torch.full_like(span, 255.0), span)
    offset = (-lo).to(torch.float64) * scale
    i = torch.arange(256, device=hist.device, dtype=torch.float64)
    lut = torch.trunc(i * scale + offset).clamp_(0, 255).to(torch.int64)
    return torch.where(hi <= lo, torch.arange(256, device=hist.device), lut)


def _luts(images: Tensor, code: Tensor, arg: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel tables uint8 (b, 3, 256) for the lookup-table ops, and the flat index.

    code: int64 (b,) _LUT_* per sample; arg: float64 (b,) the op argument.
    """
    dev = images.device
    hist, idx = _histograms(images)
    i = torch.arange(256, device=dev, dtype=torch.int64)
    c = code.view(-1, 1, 1)
    a = arg.view(-1, 1, 1)
    lut = i.expand(hist.shape)
    lut = torch.where(c == _LUT_AUTOCONTRAST, _autocontrast_lut(hist), lut)
    lut = torch.where(c == _LUT_EQUALIZE, _equalize_lut(hist), lut)
    lut = torch.where(c == _LUT_INVERT, 255 - i, lut)
    # Posterize keeps the top `bits` bits; >= 8 bits is the identity, <= 0 bits gives 0
    shift = (8 - a).clamp(0, 8).to(torch.int64)
    lut = torch.where(c == _LUT_POSTERIZE, (i >> shift) << shift, lut)
    lut = torch.where(c == _LUT_SOLARIZE, torch.where(i.to(torch.float64) < a, i, 255 - i), lut)
    lut = torch.where(c == _LUT_SOLARIZE_ADD, torch.where(i < 128, (i + a.to(torch.int64)).clamp(max=255), i), lut)
    alpha = a.to(torch.float32)
    lut = torch.where(c == _LUT_BRIGHTNESS, _blend(torch.zeros_like(i), i, alpha).to(torch.int64), lut)
    g = _gray(images).sum((1, 2), dtype=torch.int64).to(torch.float64)
    mean = torch.floor(_div(g, float(images.shape[1] * images.shape[2])) + 0.5).to(torch.int64).view(-1, 1, 1)
    lut = torch.where(c == _LUT_CONTRAST, _blend(mean.expand(-1, 1, 256), i, alpha).to(torch.int64), lut)
    return lut.to(torch.uint8), idx


def _apply_luts(images: Tensor, code: Tensor, arg: Tensor) -> Tensor:
    luts, idx = _luts(images, code, arg)
    return luts.view(-1)[idx].view(images.shape)


def _color(images: Tensor, factor: Tensor) -> Tensor:
    """ImageEnhance.Color: blend with the image's grayscale version. factor: float64 (b,)."""
    gray = _gray(images).unsqueeze(-1)
    return _blend(gray, images, factor.to(torch.float32).view(-1, 1, 1, 1))


_K1 = np.float32(1.0) / np.float32(13.0)
_K5 = np.float32(5.0) / np.float32(13.0)


def _smooth(images: Tensor) -> Tensor:
    """PIL's ImageFilter.SMOOTH (3x3, weights 1..5..1 / 13, float32, rounded); border pixels kept."""
    H, W = images.shape[1], images.shape[2]
    if H < 3 or W < 3:
        return images.clone()
    x = images.to(torch.float32)
    k1, k5 = float(_K1), float(_K5)

    def row(r: slice, centre: float) -> Tensor:
        return (x[:, r, 0:W - 2] * k1 + x[:, r, 1:W - 1] * centre) + x[:, r, 2:W] * k1

    ss = (0.5 + row(slice(2, H), k1)) + row(slice(1, H - 1), k5)
    ss = ss + row(slice(0, H - 2), k1)
    out = images.clone()
    out[:, 1:H - 1, 1:W - 1] = ss.clamp_(0.0, 255.0).to(torch.uint8)
    return out


def _sharpness(images: Tensor, factor: Tensor) -> Tensor:
    """ImageEnhance.Sharpness: blend with the SMOOTH-filtered image. factor: float64 (b,)."""
    return _blend(_smooth(images), images, factor.to(torch.float32).view(-1, 1, 1, 1))


def _round15(x: Tensor) -> Tensor:
    """Python's round(x, 15) (correctly rounded, half to even) for |x| <= 1, in float64 tensor ops.

    x * 1e15 is rounded to a double; its exact rounding error (Dekker's product without FMA)
    decides the cases where that rounding would push the value across a half.
    """
    p = x * 1e15

    def split(v: Tensor) -> tuple[Tensor, Tensor]:
        c = v * 134217729.0  # 2**27 + 1
        hi = c - (c - v)
        return hi, v - hi

    xh, xl = split(x)
    bh, bl = split(torch.full_like(x, 1e15))
    err = (((xh * bh - p) + xh * bl) + xl * bh) + xl * bl  # x * 1e15 == p + err exactly
    k = torch.floor(p)
    r = (p - k) + err
    up = (r > 0.5) | ((r == 0.5) & (torch.remainder(k, 2.0) == 1.0))
    return _div(k + up.to(torch.float64), 1e15)


def _affine_matrix(kind: Tensor, arg: Tensor, height: int, width: int) -> Tensor:
    """PIL affine coefficients (a, b, c, d, e, f), float64 (b, 6): output pixel centre (x, y) samples
    the input at (a x + b y + c, d x + e y + f). Identity where kind is _AFF_NONE.

    kind: int64 (b,); arg: float64 (b,) degrees (rotate, counter-clockwise about the image
    centre), shear factor, or shift in pixels.
    """
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    # Image.rotate: angle mod 360, rotation about (W/2, H/2), coefficients rounded to 15 decimals
    t = -(torch.remainder(arg, 360.0) * (math.pi / 180.0))
    cos, sin, msin = _round15(torch.cos(t)), _round15(torch.sin(t)), _round15(-torch.sin(t))
    cx, cy = width / 2.0, height / 2.0
    rc = (cos * -cx + sin * -cy) + 0.0 + cx
    rf = (msin * -cx + cos * -cy) + 0.0 + cy
    rot = torch.stack([cos, sin, rc, msin, cos, rf], 1)
    shx = torch.stack([one, arg, zero, zero, one, zero], 1)
    shy = torch.stack([one, zero, zero, arg, one, zero], 1)
    tx = torch.stack([one, zero, arg, zero, one, zero], 1)
    ty = torch.stack([one, zero, zero, zero, one, arg], 1)
    ident = torch.stack([one, zero, zero, zero, one, zero], 1)
    k = kind.view(-1, 1)
    m = torch.where(k == _AFF_ROTATE, rot, ident)
    m = torch.where(k == _AFF_SHEAR_X, shx, m)
    m = torch.where(k == _AFF_SHEAR_Y, shy, m)
    m = torch.where(k == _AFF_SHIFT_X, tx, m)
    return torch.where(k == _AFF_SHIFT_Y, ty, m)


def _cubic_taps(t0: Tensor, t1: Tensor, t2: Tensor, t3: Tensor, d: Tensor) -> Tensor:
    """PIL's cubic convolution (a = -1) through integer taps t0..t3 at t1 + d, float64.

    The polynomial coefficients are exact integers (int16); Horner's rule runs in float64 in
    PIL's order, so the result is the same double PIL computes.
    """
    f64 = torch.float64
    p2 = (t2 - t0).to(f64)
    p3 = (2 * (t0 - t1) + t2 - t3).to(f64)
    p4 = ((t1 - t0) - t2 + t3).to(f64)
    v = p4.mul_(d)
    v += p3
    v *= d
    v += p2
    v *= d
    v += t1.to(f64)
    return v


def _cubic(v1: Tensor, v2: Tensor, v3: Tensor, v4: Tensor, d: Tensor) -> Tensor:
    """The same cubic through float64 values v1..v4 at v2 + d, in PIL's operation order."""
    p3 = 2.0 * (v1 - v2)
    p3 += v3
    p3 -= v4
    p4 = v2 - v1
    p4 -= v3
    p4 += v4
    v = d * p4
    v += p3
    v *= d
    v += v3 - v1
    v *= d
    v += v2
    return v


def _affine(images: Tensor, matrix: Tensor, fill: Tensor, bicubic: bool, axes: str = "xy") -> Tensor:
    """PIL's Image.transform(size, AFFINE, matrix, BICUBIC or BILINEAR, fillcolor=fill) per sample.

    images: uint8 (b, H, W, 3); matrix: float64 (b, 6); fill: uint8 (3,).
    Output pixel (x, y) samples the input at matrix . (x + 0.5, y + 0.5, 1) (pixel centres at
    +0.5); points outside [0, W) x [0, H) take the fill colour; taps beyond the border are
    clamped to the edge; values are clipped to 0..255 and truncated, as PIL does.
    axes="x" is for matrices that keep every row (d = f = 0, e = 1: ShearX, TranslateX) and
    axes="y" for those that keep every column (b = c = 0, a = 1: ShearY, TranslateY): the
    fractional offset along the other axis is exactly 0 there, where PIL's interpolation returns
    the tap itself, so the one-axis result is the same as the full one.
    """
    b, H, W, C = images.shape
    dev = images.device
    xs = (torch.arange(W, device=dev, dtype=torch.float64) + 0.5).view(1, 1, W)
    ys = (torch.arange(H, device=dev, dtype=torch.float64) + 0.5).view(1, H, 1)
    a = [matrix[:, j].view(b, 1, 1) for j in range(6)]
    xin = (a[0] * xs + a[1] * ys) + a[2]
    yin = (a[3] * xs + a[4] * ys) + a[5]
    inside = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
    xin -= 0.5
    yin -= 0.5
    x0, y0 = torch.floor(xin), torch.floor(yin)
    # channel planes (b, C, H, W) with per-pixel weights (b, 1, H, W): contiguous inner loops
    dx, dy = (xin - x0).unsqueeze(1), (yin - y0).unsqueeze(1)
    # far-outside points are filled anyway; keep their indices in range before the int conversion
    x0 = x0.clamp_(-4, W + 4).to(torch.int64)
    y0 = y0.clamp_(-4, H + 4).to(torch.int64)
    # one int32 word per pixel (R, G, B, 0): each tap is a single gather of whole pixels
    packed = torch.nn.functional.pad(images, (0, 1)).view(torch.int32).reshape(-1)
    first_row = (torch.arange(b, device=dev) * H).view(b, 1, 1)
    taps = (-1, 0, 1, 2) if bicubic else (0, 1)
    cols = [(x0 + t).clamp_(0, W - 1) for t in (taps if "x" in axes else (0,))]
    rows = [((y0 + t).clamp_(0, H - 1) + first_row) * W for t in (taps if "y" in axes else (0,))]

    def tap(r: Tensor, c: Tensor) -> Tensor:
        px = packed.take(r + c).view(torch.uint8).view(b, H, W, 4)
        return px.permute(0, 3, 1, 2)[:, :C].to(torch.int16, memory_format=torch.contiguous_format)

    if axes == "x":
        out = _interp_taps([tap(rows[0], c) for c in cols], dx)
    elif axes == "y":
        out = _interp_taps([tap(r, cols[0]) for r in rows], dy)
    elif bicubic:
        out = _cubic(*(_interp_taps([tap(r, c) for c in cols], dx) for r in rows), dy)
    else:
        v0, v1 = (_interp_taps([tap(r, c) for c in cols], dx) for r in rows)
        out = (v1 - v0).mul_(dy).add_(v0)
    out = out.clamp_(0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1)
    return torch.where(inside.unsqueeze(-1), out, fill.view(1, 1, 1, C)).contiguous()


def _interp_taps(t: list[Tensor], d: Tensor) -> Tensor:
    """PIL's bicubic (4 taps) or bilinear (2 taps: t0 + (t1 - t0) d) through integer taps, float64."""
    if len(t) == 4:
        return _cubic_taps(*t, d)
    v = (t[1] - t[0]).to(torch.float64).mul_(d)
    return v.add_(t[0])


# ----------------------------------------------------------------------------------------------
# one op on every sample (for callers and tests that force the op and its argument)

def apply_op(images: Tensor, name: str, arg: Tensor | float, *, fill: Sequence[int] = fill_color(),
             interpolation: str = "bicubic") -> Tensor:
    """Applies op ``name`` with argument ``arg`` (see :func:`level_arg`) to every image of the batch.

    images: uint8 (B, H, W, 3) on any device; arg: float or float64 (B,) tensor.
    Returns uint8 (B, H, W, 3). The PIL equivalent is timm's op function with ``level_arg``'s value.
    """
    if name not in _OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {sorted(_OPS)}")
    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
    _check_images(images)
    b, H, W, _ = images.shape
    arg = torch.as_tensor(arg, dtype=torch.float64, device=images.device).expand(b).clone()
    family, code = _OPS[name]
    codes = torch.full((b,), code, device=images.device)
    if family == "lut":
        return _chunked(lambda x, s: _apply_luts(x, s["code"], s["arg"]), images, {"code": codes, "arg": arg})
    if family in ("color", "sharpness"):
        fn = _color if family == "color" else _sharpness
        return _chunked(lambda x, s: fn(x, s["arg"]), images, {"arg": arg})
    if name in ("TranslateXRel", "TranslateYRel"):
        arg = arg * float(W if name == "TranslateXRel" else H)
    fill_t = _to_device(torch.tensor([int(v) for v in fill], dtype=torch.uint8), images.device)
    cubic, axes = interpolation == "bicubic", {0: "xy", 1: "x", 2: "y"}[_AXES.get(code, 0)]
    return _chunked(lambda x, s: _affine(x, s["matrix"], fill_t, cubic, axes), images,
                    {"matrix": _affine_matrix(codes, arg, H, W)})


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"RandAugment expects uint8 images of shape (B, H, W, 3), got {got}")


# ----------------------------------------------------------------------------------------------
# the transform

class RandAugment:
    """timm-compatible RandAugment on uint8 (B, H, W, 3) batches; see the module docstring.

    Build with :func:`build_rand_augment` or :meth:`from_config`; call per batch with the
    batch's dataset sample indices.
    """

    def __init__(self, cfg: RandAugmentConfig, img_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 interpolation: str = "bicubic", translate_pct: float = 0.45) -> None:
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
        if int(img_size) <= 0:
            raise ValueError(f"img_size must be positive, got {img_size!r}")
        self.cfg = cfg
        self.img_size = int(img_size)
        self.fill = fill_color(mean)
        self.interpolation = interpolation
        self.translate_const = int(self.img_size * 0.45)
        self.translate_pct = float(translate_pct)
        names = cfg.ops
        self._host_tables = {
            "lut_code": torch.tensor([_OPS[n][1] if _OPS[n][0] == "lut" else 0 for n in names]),
            "aff_kind": torch.tensor([_OPS[n][1] if _OPS[n][0] == "affine" else 0 for n in names]),
            "aff_axes": torch.tensor([_AXES.get(_OPS[n][1], 0) if _OPS[n][0] == "affine" else 0 for n in names]),
            "relative": torch.tensor([n in ("TranslateXRel", "TranslateYRel") for n in names]),
            "vertical": torch.tensor([n in ("TranslateYRel", "TranslateY") for n in names]),
            "fill": torch.tensor(self.fill, dtype=torch.uint8),
            "identity": torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64),
        }
        for f in ("lut", "color", "sharpness", "affine"):
            self._host_tables[f] = torch.tensor([_OPS[n][0] == f for n in names])
        self._device_tables: dict[torch.device, dict[str, Tensor]] = {}

    def _tables(self, device: torch.device) -> dict[str, Tensor]:
        """Constant per-op tables on ``device`` (copied once, asynchronously)."""
        if device not in self._device_tables:
            self._device_tables[device] = {k: _to_device(v, device) for k, v in self._host_tables.items()}
        return self._device_tables[device]

    @classmethod
    def from_config(cls, config: str, img_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                    interpolation: str = "bicubic", translate_pct: float = 0.45) -> "RandAugment":
        """RandAugment from a timm string (``'rand-m9-mstd0.5-inc1'``); ValueError for a bad or 'none' string.

        img_size: training image side (translate_const = int(0.45 * img_size) for absolute
        translations); mean: the normalisation mean in 0..1 (fill colour of geometric ops);
        interpolation: 'bicubic' (the fine-tuning recipe), 'bilinear' or 'random'.
        """
        cfg = parse_rand_augment(config)
        if cfg is None:
            raise ValueError(f"RandAugment config {config!r} turns RandAugment off; "
                             f"use build_rand_augment(), which returns None for it")
        return cls(cfg, img_size, mean, interpolation, translate_pct)

    def __repr__(self) -> str:
        c = self.cfg
        return (f"RandAugment({c.config!r}: n={c.num_layers}, m={c.magnitude}, mstd={c.magnitude_std}, "
                f"mmax={c.upper_bound:g}, p={c.prob}, ops={list(c.ops)}, fill={self.fill}, "
                f"interpolation={self.interpolation})")

    def plan(self, seed: int, epoch: int, indices: Tensor | Sequence[int]) -> RandAugmentPlan:
        """The random decisions for these samples (on the device of ``indices``)."""
        return draw_plan(self.cfg, seed, epoch, _as_indices(indices), self.interpolation)

    def __call__(self, images: Tensor, seed: int, epoch: int, indices: Tensor | Sequence[int],
                 dense: bool | None = None) -> Tensor:
        """Augments a batch. Never modifies ``images``.

        images: uint8 (B, H, W, 3) on any device. seed, epoch: Python ints. indices: int64 (B,)
        dataset indices of the batch's samples (CPU recommended). dense: run every op on the
        whole batch (default: only when ``indices`` is not on the CPU; dense=False with indices
        on an accelerator costs a host synchronisation). Returns uint8 (B, H, W, 3) on the
        images' device. The default paths never synchronise with the images' device.
        """
        _check_images(images)
        idx = _as_indices(indices)
        if idx.shape != (images.shape[0],):
            raise ValueError(f"indices must have shape ({images.shape[0]},) to match the batch, "
                             f"got {tuple(idx.shape)}")
        return self.apply_plan(images, self.plan(seed, epoch, idx), dense)

    def apply_plan(self, images: Tensor, plan: RandAugmentPlan, dense: bool | None = None) -> Tensor:
        """Applies a plan's op slots in order. See :meth:`__call__`."""
        _check_images(images)
        if dense is None:
            dense = plan.op.device.type != "cpu"
        if not dense and plan.op.shape[1] > 0:
            images = images.clone()  # the sparse path writes its members' results in place
        for slot in range(plan.op.shape[1]):
            images = self._apply_slot(images, plan, slot, dense)
        return images

    def _slot_params(self, plan: RandAugmentPlan, slot: int, height: int, width: int) -> dict[str, Tensor]:
        """Per-sample parameters of one op slot, on the plan's device; identity where an op is not drawn."""
        t = self._tables(plan.op.device)
        op, act = plan.op[:, slot], plan.apply[:, slot]
        mag, neg = plan.magnitude[:, slot], plan.negate[:, slot]
        arg = torch.zeros_like(mag)
        for k, name in enumerate(self.cfg.ops):
            arg = torch.where(op == k, level_arg(name, mag, neg, self.translate_const, self.translate_pct), arg)
        fam = {f: t[f][op] & act for f in ("lut", "color", "sharpness", "affine")}
        shift = arg * torch.where(t["vertical"][op], float(height), float(width))
        arg_aff = torch.where(t["relative"][op], shift, arg)
        aff_kind = torch.where(fam["affine"], t["aff_kind"][op], 0)
        return {
            "lut": fam["lut"], "color": fam["color"], "sharpness": fam["sharpness"], "affine": fam["affine"],
            "lut_code": torch.where(fam["lut"], t["lut_code"][op], 0),
            "arg": arg,
            "factor": torch.where(fam["color"] | fam["sharpness"], arg, 1.0),
            "matrix": _affine_matrix(aff_kind, arg_aff, height, width),
            "bicubic": plan.bicubic[:, slot],
            "axes": t["aff_axes"][op],
        }

    def _apply_slot(self, images: Tensor, plan: RandAugmentPlan, slot: int, dense: bool) -> Tensor:
        """One op slot: each op family runs once, on its members (sparse) or on all images (dense)."""
        b, H, W, _ = images.shape
        dev = images.device
        p = self._slot_params(plan, slot, H, W)
        t = self._tables(dev)
        # (members, parameters the kernel reads, kernel)
        groups = [
            (p["lut"], ("lut_code", "arg"), lambda x, s: _apply_luts(x, s["lut_code"], s["arg"])),
            (p["color"], ("factor",), lambda x, s: _color(x, s["factor"])),
            (p["sharpness"], ("factor",), lambda x, s: _sharpness(x, s["factor"])),
        ]
        cubic_modes = (True, False) if self.interpolation == "random" else (self.interpolation == "bicubic",)
        # dense: one full resample per interpolation; sparse: one-axis ops take the cheaper one-axis path
        axes_modes = ((0, "xy"),) if dense else ((0, "xy"), (1, "x"), (2, "y"))
        for cubic in cubic_modes:
            for code, axes in axes_modes:
                member = p["affine"] & (p["bicubic"] == cubic)
                if not dense:
                    member = member & (p["axes"] == code)
                groups.append((member, ("matrix",),
                               lambda x, s, c=cubic, ax=axes: _affine(x, s["matrix"], t["fill"], c, ax)))
        identity = {"lut_code": 0, "arg": 0.0, "factor": 1.0, "matrix": t["identity"]}
        for member, keys, fn in groups:
            if dense:  # every image, identity parameters for the non-members
                m = _to_device(member, dev)
                s = {k: torch.where(m.view((-1,) + (1,) * (p[k].dim() - 1)), _to_device(p[k], dev), identity[k])
                     for k in keys}
                images = _chunked(fn, images, s)
            else:  # only the members; the plan is on the CPU, so this needs no device synchronisation
                rows = member.nonzero().view(-1)
                if rows.numel() == 0:
                    continue
                rows_dev = _to_device(rows, dev)
                s = {k: _to_device(p[k][rows], dev) for k in keys}
                images[rows_dev] = _chunked(fn, images[rows_dev], s)
        return images


_CPU_CHUNK = 8  # images per kernel call on the CPU: keeps the float64 temporaries small and reused


def _chunked(fn, images: Tensor, params: dict[str, Tensor]) -> Tensor:
    """fn(images, params) on accelerators; on the CPU in chunks of _CPU_CHUNK images (same result)."""
    b = images.shape[0]
    if images.device.type != "cpu" or b <= _CPU_CHUNK:
        return fn(images, params)
    return torch.cat([fn(images[i:i + _CPU_CHUNK], {k: v[i:i + _CPU_CHUNK] for k, v in params.items()})
                      for i in range(0, b, _CPU_CHUNK)])


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    if t.device == device:
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _as_indices(indices: Tensor | Sequence[int]) -> Tensor:
    idx = indices if isinstance(indices, Tensor) else torch.as_tensor(np.asarray(indices))
    if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex():
        raise ValueError(f"indices must be a 1-D integer tensor of dataset sample indices, "
                         f"got {idx.dtype} {tuple(idx.shape)}")
    return idx.to(torch.int64)


def build_rand_augment(config: str | None, img_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                       interpolation: str = "bicubic", translate_pct: float = 0.45) -> RandAugment | None:
    """The RandAugment of a timm ``--aa`` string, or None when it is 'none', empty or None.

    Raises ValueError naming the string and the expected format when it cannot be parsed.
    """
    cfg = parse_rand_augment(config)
    if cfg is None:
        return None
    return RandAugment(cfg, img_size, mean, interpolation, translate_pct)
