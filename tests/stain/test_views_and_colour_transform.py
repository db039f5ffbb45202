"""Dihedral views, HED jitter (numpy and torch agree), both augmentation backends, input preparation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from histoshift.config import AugCfg
from histoshift.data.augment import N_VIEWS, dihedral, random_dihedral, random_views, to_float
from histoshift.models.preprocess import Preprocess, normalize
from histoshift.stain.hed import hed_transform, hed_transform_np
from histoshift.stain.transform import InputTransform


def augment_batch(u8: torch.Tensor, aug: AugCfg, generator=None) -> torch.Tensor:
    """The torch backend as the image task runs it: views on the uint8 batch, then the input transform."""
    return InputTransform(aug).train(random_views(u8, generator) if aug.dihedral else to_float(u8), generator)


def build_albumentations(aug: AugCfg, seed=None):
    return InputTransform(aug.model_copy(update={"backend": "albumentations"})).worker_pipeline(seed)


def _img(seed=0, side=96):
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def test_the_eight_dihedral_views_are_distinct_and_cover_the_group():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = [dihedral(x, k) for k in range(N_VIEWS)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert torch.equal(views[0], x)
    assert torch.equal(views[1], torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(views[4], torch.flip(x, dims=(-1,)))
    # closed under composition: a view of a view is again one of the eight
    for a in range(N_VIEWS):
        for b in range(N_VIEWS):
            assert any(torch.equal(dihedral(dihedral(x, a), b), v) for v in views)


def test_random_dihedral_maps_each_image_to_one_of_its_views():
    x = torch.rand(16, 3, 8, 8)
    out = random_dihedral(x, torch.Generator().manual_seed(0))
    for i in range(16):
        assert any(torch.equal(out[i:i + 1], dihedral(x[i:i + 1], k)) for k in range(N_VIEWS))


def test_hed_identity_and_numpy_torch_agreement():
    img = _img(1)
    same = hed_transform_np(img, np.ones(3), np.zeros(3))
    assert np.abs(same.astype(int) - img).max() <= 1
    alpha, beta = np.array([1.05, 0.95, 1.0]), np.array([0.02, -0.01, 0.0])
    a = hed_transform_np(img, alpha, beta)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255
    b = hed_transform(x, torch.tensor(alpha)[None], torch.tensor(beta)[None])
    b = (b[0].permute(1, 2, 0) * 255).round().numpy()
    assert np.abs(a.astype(int) - b).max() <= 1
    assert np.abs(a.astype(int) - img).mean() > 1  # it does change the colours


def test_hed_jitter_moves_the_hematoxylin_channel():
    img = _img(2)
    more_h = hed_transform_np(img, np.array([1.3, 1.0, 1.0]), np.zeros(3))
    from histoshift.stain.hed import HED_FROM_RGB

    def h_amount(im):
        od = -np.log((im.astype(np.float64) + 1) / 256)
        return (od @ HED_FROM_RGB)[..., 0].mean()

    assert h_amount(more_h) > h_amount(img) * 1.15


def test_albumentations_pipeline():
    cfg = AugCfg(backend="albumentations", dihedral=True, hed_sigma=0.05, brightness=0.1, contrast=0.1)
    tf = build_albumentations(cfg)
    img = _img(3)
    out = tf(image=img)["image"]
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out, img)
    off = build_albumentations(AugCfg(dihedral=False, hed_sigma=0.0, brightness=0.0, contrast=0.0))
    assert np.array_equal(off(image=img)["image"], img)


def test_torch_batch_augmentation_shapes_range_and_randomness():
    cfg = AugCfg(backend="torch", dihedral=True, hed_sigma=0.05, brightness=0.1, contrast=0.1)
    u8 = torch.from_numpy(np.stack([_img(i) for i in range(8)]))
    out = augment_batch(u8, cfg, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 96, 96) and out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    again = augment_batch(u8, cfg, torch.Generator().manual_seed(1))
    assert not torch.equal(out, again)
    off = augment_batch(u8, AugCfg(dihedral=False, hed_sigma=0, brightness=0, contrast=0))
    assert torch.equal(off, to_float(u8))


@pytest.mark.parametrize("size", [96, 112, 224])
def test_normalize_resizes_and_standardises(size):
    x = torch.full((2, 3, 96, 96), 0.5)
    out = normalize(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), size)
    assert out.shape == (2, 3, size, size)
    torch.testing.assert_close(out, torch.zeros_like(out))


def _two_paths(cfg: AugCfg, img: np.ndarray, n: int = 400):
    """n augmented copies of one image by each backend, as float arrays in [0, 1] (N x 3 x H x W)."""
    tf = build_albumentations(cfg, seed=0)
    alb = np.stack([tf(image=img)["image"] for _ in range(n)]).transpose(0, 3, 1, 2) / 255.0
    tor = augment_batch(
        torch.from_numpy(np.repeat(img[None], n, axis=0)), cfg, torch.Generator().manual_seed(0)
    ).numpy()
    return alb, tor


def test_backends_draw_the_same_dihedral_views():
    from scipy.stats import chisquare

    img = _img(5, side=8)
    alb, tor = _two_paths(AugCfg(dihedral=True, hed_sigma=0, brightness=0, contrast=0), img, n=800)
    x = to_float(torch.from_numpy(img[None]))
    views = [np.rint(dihedral(x, k)[0].numpy() * 255) for k in range(N_VIEWS)]

    def counts(batch):
        ids = [next(k for k, v in enumerate(views) if np.array_equal(np.rint(b * 255), v)) for b in batch]
        return np.bincount(ids, minlength=N_VIEWS)

    for c in (counts(alb), counts(tor)):
        assert (c > 0).all() and chisquare(c).pvalue > 0.001  # all 8 views, uniformly


@pytest.mark.parametrize("cfg", [AugCfg(dihedral=False, hed_sigma=0.05, brightness=0, contrast=0),
                                 AugCfg(dihedral=False, hed_sigma=0, brightness=0.1, contrast=0.1)],
                         ids=["hed", "brightness-contrast"])
def test_backends_draw_from_the_same_colour_distribution(cfg):
    from scipy.stats import ks_2samp

    img = _img(6, side=16)
    alb, tor = _two_paths(cfg, img, n=2000)
    for c in range(3):  # per-channel mean intensity of each augmented copy
        a, t = alb[:, c].mean(axis=(1, 2)), tor[:, c].mean(axis=(1, 2))
        assert ks_2samp(a, t).pvalue > 0.001, (
            f"channel {c}: {a.mean():.4f}+-{a.std():.4f} vs {t.mean():.4f}+-{t.std():.4f}"
        )
        assert a.std() > 0.002  # the transform really varies the colour
        assert abs(a.std() / t.std() - 1) < 0.1


def test_preprocess_follows_timm_data_config_with_an_overlay():
    """One source for mean/std/resize/crop: timm's data config, overlaid by a recipe (or the configured side)."""
    timm_cfg = {"mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5), "input_size": (3, 224, 224),
                "interpolation": "bicubic", "crop_pct": 0.875}
    assert Preprocess.from_data_config(timm_cfg) == Preprocess((0.1, 0.2, 0.3), (0.5, 0.5, 0.5), 224, "bicubic", 0.875)
    ours = Preprocess.from_data_config(timm_cfg, size=96, crop_pct=1.0, mean=(0.7, 0.6, 0.7))
    assert ours == Preprocess((0.7, 0.6, 0.7), (0.5, 0.5, 0.5), 96, "bicubic", 1.0)
    assert Preprocess.from_data_config(timm_cfg | {"interpolation": "random"}).interpolation == "bilinear"
    x = torch.rand(2, 3, 96, 96)
    cropped = Preprocess.from_data_config(timm_cfg, size=64)(x)  # 96 -> 73 px, centre 64 px
    assert cropped.shape == (2, 3, 64, 64)


def test_grayscale_views_are_exactly_channel_equal_at_training_and_inference():
    from histoshift.stain.jitter import LUMA, to_gray

    u8 = torch.from_numpy(np.stack([_img(i) for i in range(6)]))
    gray = AugCfg(grayscale=True, hed_sigma=0.05, brightness=0.1, contrast=0.1)
    for x in (augment_batch(u8, gray, torch.Generator().manual_seed(0)), InputTransform(gray).infer(to_float(u8))):
        assert x.shape == (6, 3, 96, 96)
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    rgb = to_float(u8)
    want = LUMA[0] * rgb[:, 0] + LUMA[1] * rgb[:, 1] + LUMA[2] * rgb[:, 2]
    torch.testing.assert_close(InputTransform(gray).infer(to_float(u8))[:, 0], want)
    # the colour jitter happens before: two draws differ, each still gray
    a = augment_batch(u8, gray, torch.Generator().manual_seed(1))
    assert not torch.equal(a, augment_batch(u8, gray, torch.Generator().manual_seed(2)))
    torch.testing.assert_close(to_gray(to_gray(rgb)), to_gray(rgb))  # the luma weights sum to 1
    assert not torch.equal(InputTransform(AugCfg()).infer(to_float(u8)), InputTransform(gray).infer(to_float(u8)))


def test_grayscale_changes_the_feature_store_key_only_when_on():
    from histoshift.config import load_config
    from histoshift.features.store import feature_spec, store_key

    class _Cache:
        id = "c0ffee"

    plain = feature_spec(load_config(overrides=["model.kind=feature", "model.weights=none"]), _Cache(), "no")
    gray = feature_spec(load_config(overrides=["model.kind=feature", "model.weights=none", "aug.grayscale=true"]),
                        _Cache(), "no")
    assert "grayscale" not in plain and gray["grayscale"] is True  # stores of colour configs keep their keys
    assert store_key(plain) != store_key(gray)


def _channel_spread(batch: torch.Tensor) -> float:
    """How much the copies of one image differ in colour: the std over copies of each channel's mean, averaged."""
    return float(batch.mean(dim=(2, 3)).std(dim=0).mean())


def _generator_standin(x: torch.Tensor) -> torch.Tensor:
    """A stand-in for the stain GAN's generator: every patch given one mean colour (a trained one maps every
    center to one appearance), the layout kept."""
    target = torch.tensor([0.7, 0.5, 0.7], dtype=x.dtype).view(1, 3, 1, 1)
    return (x - x.mean(dim=(2, 3), keepdim=True) + target).clamp(0, 1)


@pytest.mark.parametrize("jitter", [dict(hed_sigma=0.08, brightness=0.0, contrast=0.0),
                                    dict(hed_sigma=0.0, brightness=0.1, contrast=0.1)], ids=["hed", "brightness"])
@pytest.mark.parametrize("norm", ["reinhard", "macenko", "gan"])
def test_albumentations_with_a_stain_normaliser_keeps_its_colour_jitter(norm, jitter):
    """The colour order is normalise -> jitter -> grayscale for both backends. The albumentations workers used to
    jitter and the device to normalise after, which undid the jitter: the normalised copies came out alike. Each
    jitter alone (HED, brightness/contrast) must survive each normaliser (the GAN's generator: a stand-in)."""
    from histoshift.stain.classical import CLASSICAL

    img = _img(7, side=32)
    aug = AugCfg(backend="albumentations", stain_norm=norm, **jitter)
    normaliser = _generator_standin if norm == "gan" else CLASSICAL[norm]
    transform = InputTransform(aug, _generator_standin if norm == "gan" else None)
    assert not transform.workers_jitter  # with a normaliser the workers make the views only
    workers = transform.worker_pipeline(seed=0)
    x = to_float(torch.from_numpy(np.stack([workers(image=img)["image"] for _ in range(64)])))
    fixed = transform.train(x, torch.Generator().manual_seed(0))  # what the image task feeds
    plain = normaliser(x)  # normalised, never jittered: only the views differ
    assert _channel_spread(plain) < 2e-3
    assert _channel_spread(fixed) > 5 * max(_channel_spread(plain), 2e-3), "the colour jitter did not survive"
    # the order itself: the jitter (same draws) applied to the normalised batch, not the other way round
    torch.testing.assert_close(fixed, transform.jitter(normaliser(x), torch.Generator().manual_seed(0)))
    old = normaliser(transform.jitter(x, torch.Generator().manual_seed(0)))  # the old order
    assert not torch.allclose(old, fixed, atol=1e-3)
    if norm != "macenko":  # Reinhard and the generator match every copy's colours to one reference: jitter gone
        assert _channel_spread(old) * 3 < _channel_spread(fixed)


def test_the_image_task_feeds_its_batches_through_the_colour_transform(prepared_root):
    """ImageTask.feed: the albumentations workers' uint8 views -> float -> the config's InputTransform.train (a
    normaliser, then the jitter), as the transform test above checks it."""
    from accelerate import Accelerator

    from histoshift.config import load_config
    from histoshift.data.cache import Cache
    from histoshift.paths import Paths
    from histoshift.tasks import ImageTask

    cfg = load_config(None, ["aug.backend=albumentations", "aug.stain_norm=reinhard", "aug.hed_sigma=0.08",
                             "aug.brightness=0", "aug.contrast=0", "model.weights=none"])
    task = ImageTask(cfg, Cache.open(prepared_root / "work" / "cache"), Paths(prepared_root), Accelerator(), "no")
    task.build_model()  # (its preprocessing: feed also gives the model's input)
    raw = torch.from_numpy(np.stack([_img(7, side=32)] * 16))
    batch = {"image": raw, "label": torch.zeros(16), "domain": torch.zeros(16, dtype=torch.long)}
    torch.manual_seed(0)
    fed = task.feed(batch, None)["images"]
    torch.manual_seed(0)
    torch.testing.assert_close(fed, task.transform.train(to_float(raw)))
    assert _channel_spread(fed) > 5e-3  # jittered after the normaliser: the copies differ in colour


def test_both_backends_jitter_once_and_in_the_same_order():
    img = _img(8, side=32)
    none = AugCfg(backend="albumentations", hed_sigma=0.05)
    assert InputTransform(none).workers_jitter  # without a normaliser: on the workers, as before
    u8 = torch.from_numpy(img[None])
    x = to_float(u8)
    torch.testing.assert_close(InputTransform(none).train(x), x)  # the device does not jitter a second time
    torch_backend = InputTransform(none.model_copy(update={"backend": "torch"}))
    assert not torch_backend.workers_jitter and not torch.equal(
        torch_backend.train(x, torch.Generator().manual_seed(0)), x
    )
    with pytest.raises(ValueError, match="stain-gan"):
        InputTransform(AugCfg(stain_norm="gan"))  # the generator is an explicit argument, never attached to a config
