"""LoMaR / MAE / classifier models on the CPU: window and mask sampling, encoder input, loss,
reference window gather, overfitting, parameter counts and input validation.

Expected values come from DESIGN.md's "LoMaR semantics", computed here by hand (Python loops)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lomar_fast.models.classifier as classifier_mod
import lomar_fast.models.lomar as lomar_mod
import lomar_fast.models.mae as mae_mod
from lomar_fast.models import MAE, LoMaR, create_model, model_names, sample_masks, sample_windows
from lomar_fast.models.vit import PatchEmbed
from lomar_fast.ops.window_gather import gather_windows, gather_windows_reference

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def tiny_lomar(**kw) -> LoMaR:
    cfg = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2, window_size=4, num_window=2,
               mask_ratio=0.75)
    cfg.update(kw)
    return LoMaR(**cfg)


def smooth_images(b: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 NHWC images with low-frequency content (learnable targets)."""
    low = torch.rand(b, 3, 4, 4, generator=gen)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def pixel_fn(images: torch.Tensor):
    """value(b, ch, y, x) of the normalized image, by hand, for uint8 NHWC or float NCHW input."""
    a = images.numpy()
    if images.dtype == torch.uint8:
        return lambda b, ch, y, x: (float(a[b, y, x, ch]) / 255.0 - MEAN[ch]) / STD[ch]
    return lambda b, ch, y, x: float(a[b, ch, y, x])


def hand_window_patches(images, windows, p, w) -> np.ndarray:
    """(B*K, w*w, p*p*3) float64: window patches row-major, vectors (row, col, channel)."""
    val = pixel_fn(images)
    b_, k_ = windows.shape[:2]
    out = np.zeros((b_ * k_, w * w, p * p * 3))
    for b in range(b_):
        for k in range(k_):
            top, left = (int(v) for v in windows[b, k])
            for r in range(w):
                for c in range(w):
                    for i in range(p):
                        for j in range(p):
                            for ch in range(3):
                                out[b * k_ + k, r * w + c, (i * p + j) * 3 + ch] = val(
                                    b, ch, (top + r) * p + i, (left + c) * p + j)
    return out


def hand_norm_pix(v: np.ndarray) -> np.ndarray:
    """One patch vector normalized by its mean and unbiased variance (eps 1e-6)."""
    n = len(v)
    mean = sum(v) / n
    var = sum((x - mean) ** 2 for x in v) / (n - 1)
    return np.array([(x - mean) / math.sqrt(var + 1e-6) for x in v])


def hand_targets(win: np.ndarray, masks: torch.Tensor, norm_pix: bool) -> list[list[np.ndarray]]:
    """Per window row: the masked patches in ascending position order (normalized if norm_pix)."""
    flat = masks.reshape(win.shape[0], -1)
    out = []
    for n in range(win.shape[0]):
        pos = [i for i in range(win.shape[1]) if bool(flat[n, i])]
        out.append([hand_norm_pix(win[n, i]) if norm_pix else win[n, i] for i in pos])
    return out


# --------------------------------------------------------------------------- window sampling


def _check_window_set(ws: torch.Tensor, k: int, grid: int, w: int):
    assert ws.shape == (k, 2)
    tops, lefts = ws[:, 0].tolist(), ws[:, 1].tolist()
    assert len(set(tops)) == k and len(set(lefts)) == k
    assert all(0 <= t <= grid - w for t in tops) and all(0 <= left <= grid - w for left in lefts)


@pytest.mark.parametrize("sampling", ["per_batch", "per_image"])
def test_sample_windows_distinct_and_inside(sampling):
    g = torch.Generator().manual_seed(3)
    b, k, grid, w = 32, 4, 14, 7
    win = sample_windows(b, k, grid, w, sampling=sampling, generator=g)
    assert win.shape == (b, k, 2) and win.dtype == torch.long
    for n in range(b):
        _check_window_set(win[n], k, grid, w)
    same = all(torch.equal(win[n], win[0]) for n in range(b))
    if sampling == "per_batch":
        assert same
    else:
        assert not same
        # per-image draws cover every legal origin on both axes
        assert sorted(win[..., 0].unique().tolist()) == list(range(grid - w + 1))
        assert sorted(win[..., 1].unique().tolist()) == list(range(grid - w + 1))


def test_sample_windows_k_equal_span_uses_every_origin():
    win = sample_windows(3, 8, 14, 7, sampling="per_image", generator=torch.Generator().manual_seed(0))
    for n in range(3):
        assert sorted(win[n, :, 0].tolist()) == list(range(8))
        assert sorted(win[n, :, 1].tolist()) == list(range(8))


def test_published_pairing_k_divides_batch():
    b, k, grid, w = 8, 4, 14, 7
    sets = sample_windows(b, k, grid, w, sampling="per_batch", pairing="all",
                          generator=torch.Generator().manual_seed(5))
    pub = sample_windows(b, k, grid, w, sampling="per_batch", pairing="published",
                         generator=torch.Generator().manual_seed(5))
    s = sets[0]
    for n in range(b):
        for kk in range(k):
            assert pub[n, kk].tolist() == s[n % k].tolist()  # image n sees window n mod K, K times


@pytest.mark.parametrize("b,k", [(6, 4), (5, 3), (8, 4), (3, 4)])
def test_published_pairing_general_rule(b, k):
    grid, w = 14, 7
    sets = sample_windows(b, k, grid, w, sampling="per_image", pairing="all",
                          generator=torch.Generator().manual_seed(9))
    pub = sample_windows(b, k, grid, w, sampling="per_image", pairing="published",
                         generator=torch.Generator().manual_seed(9))
    for n in range(b):
        for kk in range(k):
            r = n + kk * b
            assert pub[n, kk].tolist() == sets[r // k, r % k].tolist()


def test_sample_windows_bad_names():
    with pytest.raises(ValueError, match="window_sampling"):
        sample_windows(2, 2, 14, 7, sampling="random")
    with pytest.raises(ValueError, match="pairing"):
        sample_windows(2, 2, 14, 7, pairing="weird")


def test_model_sample_follows_settings():
    m = LoMaR(img_size=224, embed_dim=64, depth=1, num_heads=2, window_sampling="per_image")
    g = torch.Generator().manual_seed(1)
    win, masks = m.sample(16, generator=g)
    assert win.shape == (16, 4, 2) and masks.shape == (16, 4, 49) and masks.dtype == torch.bool
    for n in range(16):
        _check_window_set(win[n], 4, 14, 7)
    assert not all(torch.equal(win[n], win[0]) for n in range(16))
    assert masks.sum(-1).eq(39).all()
    m_pub = LoMaR(img_size=224, embed_dim=64, depth=1, num_heads=2, pairing="published")
    win, _ = m_pub.sample(8, generator=torch.Generator().manual_seed(1))
    for n in range(8):
        assert all(win[n, kk].tolist() == win[n, 0].tolist() for kk in range(4))
        assert win[n, 0].tolist() == win[n % 4, 0].tolist()
    assert len({tuple(win[n, 0].tolist()) for n in range(4)}) == 4


# --------------------------------------------------------------------------- masks


def test_mask_counts_and_randomness():
    m = sample_masks(64, 4, 7, 0.8, generator=torch.Generator().manual_seed(0))
    assert m.shape == (64, 4, 49) and m.dtype == torch.bool
    assert int(49 * 0.8) == 39
    assert m.sum(-1).eq(39).all()
    flat = m.reshape(-1, 49)
    assert len({tuple(r.tolist()) for r in flat}) == flat.shape[0]  # 256 windows, all different
    assert (flat.sum(0) > 0).all() and (flat.sum(0) < flat.shape[0]).all()  # every position both ways
    for ratio, w in [(0.75, 4), (0.5, 3), (0.9, 7)]:
        assert sample_masks(2, 3, w, ratio).sum(-1).eq(int(w * w * ratio)).all()


def test_masked_positions_enter_encoder_as_mask_token():
    torch.manual_seed(0)
    m = tiny_lomar().eval()
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=g)
    windows, masks = m.sample(2, generator=g)
    seen = {}

    def grab(module, args):
        seen["x"] = args[0].detach().clone()  # returns None: the input is left unchanged

    m.blocks[0].register_forward_pre_hook(grab)
    with torch.no_grad():
        m(images, windows, masks)
    x = seen["x"]  # (B*K, 1 + w*w, D)
    assert x.shape == (4, 17, 64)
    flat = masks.reshape(4, 16)
    assert torch.equal(x[:, 0], m.cls_token[0].expand(4, -1))
    assert torch.equal(x[:, 1:][flat], m.mask_token[0].expand(int(flat.sum()), -1))
    # visible tokens: the patch embedding (conv on the normalized image) with no position term added
    norm = (images.permute(0, 3, 1, 2).double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    conv = F.conv2d(norm, m.patch_embed.proj.weight.double(), m.patch_embed.proj.bias.double(), stride=8)
    for b in range(2):
        for k in range(2):
            top, left = windows[b, k].tolist()
            for r in range(4):
                for c in range(4):
                    if not flat[b * 2 + k, r * 4 + c]:
                        torch.testing.assert_close(x[b * 2 + k, 1 + r * 4 + c].double(),
                                                   conv[b, :, top + r, left + c], rtol=1e-4, atol=1e-4)
    assert not torch.equal(x[:, 1:][~flat][0], m.mask_token[0, 0])


# --------------------------------------------------------------------------- loss


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_hand_computation(norm_pix):
    torch.manual_seed(0)
    m = tiny_lomar(norm_pix_loss=norm_pix).eval()
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=g)
    windows, masks = m.sample(2, generator=g)
    with torch.no_grad():
        loss, pred, flat = m(images, windows, masks)
    assert pred.shape == (4, 16, 192) and flat.shape == (4, 16)
    assert torch.equal(flat, masks.reshape(4, 16))
    tg = hand_targets(hand_window_patches(images, windows, 8, 4), masks, norm_pix)
    pr = pred.double().numpy()
    sq, count = 0.0, 0
    for n in range(4):
        pos = [i for i in range(16) if bool(flat[n, i])]
        assert len(pos) == 12
        for t, i in zip(tg[n], pos):
            sq += float(((pr[n, i] - t) ** 2).sum())
            count += t.size
    assert math.isclose(float(loss), sq / count, rel_tol=1e-5)
    assert loss.dtype == torch.float32 and loss.dim() == 0


def test_loss_ignores_visible_predictions():
    torch.manual_seed(0)
    m = tiny_lomar()
    masks = sample_masks(3, 2, 4, 0.75, generator=torch.Generator().manual_seed(0)).reshape(6, 16)
    targets = torch.randn(6, 12, 192)
    pred = torch.randn(6, 16, 192, requires_grad=True)
    loss = m.forward_loss(pred, targets, masks)
    loss.backward()
    assert pred.grad[~masks].abs().max() == 0
    assert (pred.grad[masks].abs().sum(-1) > 0).all()
    bumped = pred.detach().clone()
    bumped[~masks] += 100.0
    assert torch.equal(m.forward_loss(bumped, targets, masks), loss.detach())
    bumped[masks] += 0.1
    assert not torch.equal(m.forward_loss(bumped, targets, masks), loss.detach())


# --------------------------------------------------------------------------- reference gather and patch embedding


@pytest.mark.parametrize("layout", ["uint8_nhwc", "float_nchw"])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_gather_windows_reference_matches_loop(layout, norm_pix):
    g = torch.Generator().manual_seed(7)
    p, w, b, k, size = 4, 3, 2, 2, 20  # grid 5
    if layout == "uint8_nhwc":
        images = torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g)
    else:
        images = torch.randn(b, 3, size, size, generator=g)
    windows = sample_windows(b, k, size // p, w, sampling="per_image", generator=g)
    masks = sample_masks(b, k, w, 0.6, generator=g)
    patches, targets = gather_windows_reference(images, windows, masks, p, w, norm_pix)
    win = hand_window_patches(images, windows, p, w)
    assert patches.shape == (b * k, w * w, p * p * 3) and patches.dtype == torch.float32
    np.testing.assert_allclose(patches.double().numpy(), win, rtol=1e-5, atol=1e-5)
    tg = hand_targets(win, masks, norm_pix)
    assert targets.shape == (b * k, int(w * w * 0.6), p * p * 3) and targets.dtype == torch.float32
    np.testing.assert_allclose(targets.double().numpy(), np.array(tg), rtol=1e-4, atol=1e-4)
    # the dispatching entry point gives the same on the CPU
    p2, t2 = gather_windows(images, windows, masks, p, w, norm_pix)
    assert torch.equal(p2, patches) and torch.equal(t2, targets)
    p3, _ = gather_windows(images, windows, masks, p, w, norm_pix, out_dtype=torch.bfloat16)
    assert p3.dtype == torch.bfloat16


def test_gather_windows_validation():
    images = torch.zeros(2, 20, 20, 3, dtype=torch.uint8)
    windows = torch.zeros(2, 2, 2, dtype=torch.long)
    masks = sample_masks(2, 2, 3, 0.6)
    bad = windows.clone()
    bad[1, 0, 1] = 3  # grid 5, window 3: left <= 2
    with pytest.raises(ValueError, match="windows"):
        gather_windows(images, bad, masks, 4, 3)
    uneven = masks.clone()
    uneven[0, 0] = True
    with pytest.raises(ValueError, match="masks"):
        gather_windows(images, windows, uneven, 4, 3)
    with pytest.raises(ValueError, match="images"):
        gather_windows(images.permute(0, 3, 1, 2), windows, masks, 4, 3)
    with pytest.raises(ValueError, match="images"):
        gather_windows(torch.zeros(2, 3, 20, 20, dtype=torch.int32), windows, masks, 4, 3)
    # windows or masks on another device than the images (the CUDA kernel would read host pointers)
    with pytest.raises(ValueError, match="windows: on meta, but the images are on cpu; sample them with device="):
        gather_windows(images, windows.to("meta"), masks, 4, 3)
    with pytest.raises(ValueError, match="masks: on meta, but the images are on cpu"):
        gather_windows(images, windows, masks.to("meta"), 4, 3)


def test_patch_embed_linear_equals_conv(seed):
    pe = PatchEmbed(patch_size=4, in_chans=3, embed_dim=8).double()
    images = torch.randn(2, 3, 12, 16, dtype=torch.float64)
    conv = pe(images)  # (2, 12, 8)
    assert conv.shape == (2, 12, 8)
    vec = torch.zeros(2, 12, 48, dtype=torch.float64)
    for b in range(2):
        for gy in range(3):
            for gx in range(4):
                for i in range(4):
                    for j in range(4):
                        for ch in range(3):
                            vec[b, gy * 4 + gx, (i * 4 + j) * 3 + ch] = images[b, ch, gy * 4 + i, gx * 4 + j]
    torch.testing.assert_close(pe.embed_patches(vec), conv, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- overfitting one batch


def test_lomar_overfits_one_batch():
    torch.manual_seed(0)
    m = tiny_lomar(embed_dim=128, num_heads=4)
    g = torch.Generator().manual_seed(1)
    images = smooth_images(2, 64, g)
    windows, masks = m.sample(2, generator=g)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(60):
        loss, _, _ = m(images, windows, masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert losses[-1] < 0.7, losses  # well below the ~1.0 of predicting the mean of norm-pix targets


def test_mae_overfits_one_batch():
    torch.manual_seed(0)
    m = MAE(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=64,
            decoder_depth=1, decoder_num_heads=2)
    g = torch.Generator().manual_seed(1)
    images = smooth_images(2, 32, g)
    noise = torch.rand(2, 16, generator=g)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(50):
        loss, pred, mask = m(images, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert pred.shape == (2, 16, 192) and mask.shape == (2, 16)
    assert mask.sum(1).eq(12).all()  # 75% of 16 removed: the 12 patches with the largest noise
    assert mask.dtype == torch.float32
    assert torch.equal(mask.bool(), noise.argsort(1).argsort(1) >= 4)
    assert losses[-1] < 0.5 * losses[0], losses
    assert losses[-1] < 0.7, losses


# --------------------------------------------------------------------------- parameter counts


def _count(m: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for n, p in m.named_parameters() if not n.startswith(skip))


@pytest.fixture(scope="module")
def timm_vit_base():
    import timm
    return timm.create_model("vit_base_patch16_224", pretrained=False)


def test_classifier_base_param_count(timm_vit_base):
    ref = _count(timm_vit_base)
    assert 86_000_000 < ref < 87_000_000
    ours = create_model("vit_base_patch16", num_classes=1000)
    n = _count(ours)
    assert abs(n - ref) / ref < 0.005
    # differences: no absolute pos_embed (197 x 768); one (1, 64, 50) iRPE table per block
    assert n == ref - timm_vit_base.pos_embed.numel() + 12 * 64 * 50


def test_lomar_base_encoder_param_count(timm_vit_base):
    ref = _count(timm_vit_base, skip=("head.",))  # num_classes=0
    m = create_model("lomar_vit_base_patch16")
    enc = _count(m, skip=("encoder_pred.",))
    assert abs(enc - ref) / ref < 0.005
    # differences: the mask token (768) and the per-block iRPE tables; pos_embed kept for the layout
    assert enc == ref + 768 + 12 * 64 * 50
    assert m.encoder_pred.weight.shape == (16 * 16 * 3, 768)


def test_mae_loss_counts_the_masked_patches_exactly_under_bf16_autocast():
    """The loss's denominator is the masked-patch count; a bf16 mask rounded it (513 masked patches summed to
    512 in bf16), so the autocast loss was off by the rounding."""
    torch.manual_seed(0)
    m = MAE(img_size=80, patch_size=16, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2)
    images = torch.randn(27, 3, 80, 80)
    noise = torch.rand(27, 25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, mask = m(images, noise=noise)
    assert mask.dtype == torch.float32 and float(mask.sum()) == 27 * 19  # 513: not a bf16 number
    target = mae_mod.norm_pix(mae_mod.patchify(images, 16)) if m.norm_pix_loss else mae_mod.patchify(images, 16)
    want = ((pred.float() - target).pow(2).mean(-1) * mask).sum() / 513
    torch.testing.assert_close(loss.float(), want, rtol=1e-6, atol=1e-6)


def test_mae_base_param_count():
    model = create_model("mae_vit_base_patch16")
    # the published MaskedAutoencoderViT-B/16: 111,907,840 parameters, of which the two fixed sin-cos
    # position embeddings (197 x 768 + 197 x 512) are frozen
    assert _count(model) == 111_907_840
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 111_907_840 - 197 * (768 + 512)


PUBLISHED_SIZES = {
    "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16), "huge": (1280, 32, 16),
}


@pytest.mark.parametrize("name", model_names())
def test_factory_configs(name, monkeypatch):
    """Every factory asks for the published width/depth/heads (recorded without building the model)."""
    size = name.split("_")[-2]
    mod = {"lomar": lomar_mod, "mae": mae_mod, "vit": classifier_mod}[name.split("_")[0]]
    cls_name = {"lomar": "LoMaR", "mae": "MAE", "vit": "VisionTransformerRPE"}[name.split("_")[0]]
    seen = {}
    monkeypatch.setattr(mod, cls_name, lambda **kw: seen.update(kw) or "built")
    assert create_model(name) == "built"
    assert (seen["embed_dim"], seen["depth"], seen["num_heads"]) == PUBLISHED_SIZES[size]
    assert seen["patch_size"] == 16
    if name.startswith("mae"):
        assert (seen["decoder_embed_dim"], seen["decoder_depth"], seen["decoder_num_heads"]) == (512, 8, 16)
    seen.clear()
    create_model(name, depth=3)
    assert seen["depth"] == 3  # kwargs override


def test_tiny_models_have_factory_structure():
    for name in ("lomar_vit_tiny_patch16", "vit_tiny_patch16"):
        m = create_model(name)
        assert len(m.blocks) == 12
        assert m.blocks[0].attn.num_heads == 3 and m.blocks[0].attn.head_dim == 64
        assert m.blocks[0].attn.qkv.weight.shape == (3 * 192, 192)
        assert m.blocks[0].mlp.fc1.weight.shape == (4 * 192, 192)
        assert m.blocks[0].attn.rpe_k.lookup_table_weight.shape == (1, 64, 50)
        assert m.blocks[0].norm1.eps == 1e-6
    mae = create_model("mae_vit_tiny_patch16")
    assert len(mae.blocks) == 12 and len(mae.decoder_blocks) == 8
    assert mae.decoder_embed.weight.shape == (512, 192) and mae.blocks[0].attn.rpe_k is None


# --------------------------------------------------------------------------- invalid settings


def test_invalid_geometry_names_the_setting():
    kw = dict(embed_dim=64, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="num_window"):
        LoMaR(img_size=112, window_size=7, num_window=2, **kw)  # grid 7: K <= 1
    with pytest.raises(ValueError, match="num_window"):
        LoMaR(img_size=224, window_size=7, num_window=9, **kw)  # grid 14: K <= 8
    LoMaR(img_size=224, window_size=7, num_window=8, **kw)  # the limit itself is fine
    with pytest.raises(ValueError, match="window_size"):
        LoMaR(img_size=112, window_size=8, num_window=1, **kw)
    with pytest.raises(ValueError, match="input_size"):
        LoMaR(img_size=100, **kw)
    with pytest.raises(ValueError, match="input_size"):
        MAE(img_size=100, embed_dim=64, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2)
    with pytest.raises(ValueError, match="window_sampling"):
        LoMaR(img_size=112, window_size=7, num_window=1, window_sampling="sometimes", **kw)
    with pytest.raises(ValueError, match="mask_ratio"):
        LoMaR(img_size=112, window_size=7, num_window=1, mask_ratio=1.0, **kw)


def test_invalid_images_name_the_input():
    m = tiny_lomar()
    with pytest.raises(ValueError, match="dtype"):
        m(torch.zeros(2, 64, 64, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="NHWC"):
        m(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NCHW"):
        m(torch.zeros(2, 64, 64, 3))
    with pytest.raises(ValueError, match="input_size"):
        m(torch.zeros(2, 80, 80, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="input_size"):
        m(torch.zeros(2, 3, 48, 48))
    mae = MAE(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
              decoder_num_heads=2)
    with pytest.raises(ValueError, match="images"):
        mae(torch.zeros(2, 32, 32, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="NHWC"):
        mae(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="input_size"):
        mae(torch.zeros(2, 3, 48, 48))


def test_create_model_unknown_name_lists_names():
    names = model_names()
    assert {f"{k}_vit_base_patch16" for k in ("lomar", "mae")} | {"vit_base_patch16"} <= set(names)
    for bad in ("lomar_vit_gigantic_patch16", "sample_windows", "LoMaR"):
        with pytest.raises(ValueError) as e:
            create_model(bad)
        assert bad in str(e.value)
        assert all(n in str(e.value) for n in names)
    assert isinstance(create_model("lomar_vit_tiny_patch16", depth=1), LoMaR)


def test_scaled_query_option_reaches_every_block():
    kw = dict(img_size=112, embed_dim=32, depth=2, num_heads=2, num_window=1)
    assert all(not b.attn.rpe_k.scaled_query for b in LoMaR(**kw).blocks)  # published default: unscaled
    assert all(b.attn.rpe_k.scaled_query for b in LoMaR(scaled_query=True, **kw).blocks)
    assert all(b.attn.rpe_k.scaled_query for b in create_model("vit_tiny_patch16", scaled_query=True, depth=2).blocks)


def test_compiled_blocks_with_stochastic_depth_share_two_graphs():
    """A classifier with drop path has a different rate in every block. Compiled per block, the blocks share
    two graphs (rate 0, and the rate as an input), not one each: dynamo's recompile limit (8) would otherwise
    leave a ViT-B's later blocks eager. The compiled draw drops whole samples at the block's rate and
    rescales the kept ones by 1 / keep, as the eager draw does."""
    from lomar_fast.compilation import apply_compile
    from lomar_fast.models.vit import DropPath

    from torch._dynamo.utils import counters

    model = create_model("vit_tiny_patch16", img_size=32, num_classes=3, depth=12, drop_path=0.5)
    rates = [b.drop_path.drop_prob for b in model.blocks]
    assert len(set(rates)) == 12 and rates[0] == 0.0
    torch._dynamo.reset()
    counters.clear()
    # aot_eager: AOTAutograd is where a Python float rate would get specialized
    assert apply_compile(model, "blocks", backend="aot_eager") == 12
    model.train()
    for _ in range(2):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert counters["stats"]["unique_graphs"] == 2
    assert "keep_units" not in model.state_dict() and "blocks.3.drop_path.keep_units" in dict(model.named_buffers())
    model.bfloat16()  # a cast of the model leaves the integer rate exact
    assert model.blocks[3].drop_path.keep_units.dtype == torch.int64

    torch.manual_seed(0)
    drop = DropPath(0.3)
    drop.compile(backend="aot_eager")
    y = drop(torch.ones(20000, 1, 4))
    kept = y[:, 0, 0] != 0
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    assert bool((y[~kept] == 0).all()) and abs(kept.float().mean().item() - 0.7) < 0.02
    assert counters["stats"]["unique_graphs"] == 3  # the compiled path ran
    drop.drop_prob = 0.5  # a new rate reaches the compiled draw's buffer
    assert int(drop.keep_units) == 1 << 29 and drop.active
    drop.drop_prob = 0
    assert not drop.active and torch.equal(drop(x := torch.randn(3, 2)), x)


def test_drop_path_at_rate_one_drops_every_sample_and_the_rates_follow_linspace():
    """--drop_path 1.0 is allowed; the last block then drops its branch for every sample, eager and compiled, as
    timm's drop_path does (keep 0 gave 0 / 0 = NaN). The rates rise as MAE's torch.linspace(0, rate, depth)."""
    from lomar_fast.models.vit import DropPath, drop_path_rates

    x = torch.randn(6, 3, 4)
    for compiled in (False, True):
        drop = DropPath(1.0).train()
        if compiled:
            drop.compile(backend="aot_eager")
        y = drop(x)
        assert torch.equal(y, torch.zeros_like(x)), compiled
    for depth in (1, 2, 12):
        for rate in (0.1, 1.0):
            assert drop_path_rates(rate, depth) == pytest.approx(torch.linspace(0, rate, depth).tolist(), abs=1e-7)
    model = create_model("vit_tiny_patch16", img_size=32, num_classes=3, depth=2, drop_path=1.0).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_compiled_blocks_of_two_shapes_get_two_static_graphs():
    """MAE's encoder and decoder blocks see two shapes. Each gets a graph specialized to its shape: dynamo would
    otherwise make the second one a dynamic-shape graph (symbolic sizes, slower kernels)."""
    from lomar_fast.compilation import apply_compile

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append([tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs])
        return gm.forward

    torch._dynamo.reset()
    model = create_model("mae_vit_tiny_patch16", img_size=64)
    assert apply_compile(model, "blocks", backend=recording_backend) == len(model.blocks) + len(model.decoder_blocks)
    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    for _ in range(2):
        model(images)
    assert len(graphs) == 2 and all(isinstance(s, tuple) for g in graphs for s in g), graphs
    assert {g[2][1] for g in graphs} == {1 + 4, 1 + 16}  # cls + the visible patches; cls + every patch


def test_normalize_images_copies_its_channel_stats_to_the_device_once():
    """Building mean/std with torch.tensor(..., device=x.device) is a copy from host memory: on a GPU it made
    the host wait for the device twice per call (MAE's forward, the fine-tuning step, the reference gather).
    The tensors are cached per device and dtype, and stay usable by autograd after an inference-mode call."""
    from torch.overrides import TorchFunctionMode

    from lomar_fast import images

    class Factories(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") in ("tensor", "as_tensor") and kwargs.get("device") is not None:
                self.calls.append(func.__name__)
            return func(*args, **kwargs)

    images._STATS.clear()
    x = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    with torch.inference_mode():
        first = images.normalize_images(x)
    with Factories() as seen:
        again = images.normalize_images(x)
    assert seen.calls == []
    torch.testing.assert_close(again, first)
    mean = torch.tensor(images.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(images.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(again, (x.permute(0, 3, 1, 2).float() / 255 - mean) / std)
    scale = torch.ones(1, requires_grad=True)  # the cached stats work in a graph autograd records
    ((images.normalize_images(x) * scale).sum()).backward()
    assert scale.grad is not None


def _same_loss_and_gradients(monkeypatch, env: str, values: tuple[str, ...]):
    """A tiny LoMaR's loss and every gradient with ``$env`` set to each of ``values`` in turn equal the first's;
    returns the model."""
    torch.manual_seed(0)
    m = tiny_lomar(embed_dim=64, num_heads=2)
    g = torch.Generator().manual_seed(2)
    images = smooth_images(2, 64, g)
    windows, masks = m.sample(2, generator=g)
    results = {}
    for value in values:
        monkeypatch.setenv(env, value)
        m.zero_grad()
        loss, _, _ = m(images, windows, masks)
        loss.backward()
        results[value] = (loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None])
    loss0, grads0 = results[values[0]]
    assert len(grads0) == sum(1 for p in m.parameters() if p.requires_grad)
    for value in values[1:]:
        loss, grads = results[value]
        torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
        for a, b in zip(grads, grads0):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    return m


def test_lomar_loss_and_gradients_are_the_same_on_every_attention_path(monkeypatch):
    """$LOMAR_ATTN_PATH changes how the attention is computed, not the model: loss and every gradient agree. The
    flex path runs here through FlexAttention's unfused implementation (it refuses a CPU backward; the refusal is
    lifted for the test), the model's packed q, k, v views and table included."""
    import torch.nn.attention.flex_attention as fa

    from lomar_fast.ops import window_attention as wa_mod

    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    monkeypatch.setattr(wa_mod, "FLEX_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(wa_mod, "_flex_attention", lambda: fa.flex_attention)
    used = []
    real_flex = wa_mod.window_attention_flex
    monkeypatch.setattr(wa_mod, "window_attention_flex", lambda *a, **k: used.append(1) or real_flex(*a, **k))
    m = _same_loss_and_gradients(monkeypatch, wa_mod.ATTN_PATH_ENV, ("sdpa", "math", "flex"))
    assert len(used) == len(m.blocks)  # the flex run took the flex path in every block


def test_lomar_loss_and_gradients_are_the_same_on_every_irpe_path(monkeypatch):
    """$LOMAR_IRPE_PATH changes how the iRPE term is computed, not the model: loss and every gradient agree."""
    _same_loss_and_gradients(monkeypatch, "LOMAR_IRPE_PATH", ("reference", "bmm", "bmm_aligned"))
