"""Reinhard and Macenko stain normalisation (batched, torch)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from histoshift.data.demo import render_patch
from histoshift.stain.classical import CLASSICAL, LAB_REF_MEAN, lab_to_rgb, macenko, reinhard, rgb_to_lab

from helpers import tiny_config


def _same_tissue_two_centers(seed=5, label=1):
    a = render_patch(np.random.default_rng(seed), label, 0)
    b = render_patch(np.random.default_rng(seed), label, 2)  # same nuclei, center 2's stain
    return torch.from_numpy(np.stack([a, b])).double()


def test_lab_round_trip():
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64) * 0.9 + 0.05
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(x)), x, atol=1e-6, rtol=1e-6)
    white = rgb_to_lab(torch.ones(1, 3, 2, 2, dtype=torch.float64))
    torch.testing.assert_close(
        white[0, :, 0, 0], torch.tensor([100.0, 0.0, 0.0], dtype=torch.float64), atol=1e-3, rtol=0
    )


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_normalisation_brings_two_stainings_of_the_same_tissue_together(method):
    x = _same_tissue_two_centers()
    before = (x[0] - x[1]).abs().mean()
    y = CLASSICAL[method](x)
    after = (y[0] - y[1]).abs().mean()
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert after < 0.6 * before, (float(before), float(after))


def test_reinhard_matches_the_reference_lab_mean():
    x = _same_tissue_two_centers()
    lab = rgb_to_lab(reinhard(x)).mean(dim=(2, 3))
    torch.testing.assert_close(lab[:, 0], torch.full((2,), LAB_REF_MEAN[0], dtype=torch.float64), atol=2.0, rtol=0)


def test_reinhard_transfer_takes_each_reference_images_statistics():
    """With a reference batch (robustify's pair=reinhard view), patch i takes reference i's CIELAB mean and
    spread: center 0's tissue rendered in center 2's colours, and an image's own statistics leave it unchanged."""
    x = _same_tissue_two_centers()
    swapped = reinhard(x, x.flip(0))
    lab, ref = rgb_to_lab(swapped), rgb_to_lab(x.flip(0))
    torch.testing.assert_close(lab.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=2.0, rtol=0)  # gamut clamping
    torch.testing.assert_close(lab.std(dim=(2, 3)), ref.std(dim=(2, 3)), atol=2.0, rtol=0)
    assert (swapped[0] - x[1]).abs().mean() < 0.7 * (x[0] - x[1]).abs().mean()  # measured 0.65
    torch.testing.assert_close(reinhard(x, x), x, atol=1e-4, rtol=0)


def test_macenko_leaves_blank_patches_alone():
    blank = torch.ones(2, 3, 16, 16, dtype=torch.float64) * 0.97
    torch.testing.assert_close(macenko(blank), blank)
    from histoshift.config import AugCfg

    with pytest.raises(ValueError, match="stain_norm"):
        AugCfg(stain_norm="vahadane")


def test_macenko_survives_single_stain_patches_in_a_batch():
    """One stain everywhere gives a rank-deficient stain matrix (CUDA's lstsq raised on such a patch in
    a real run); the batch must still normalise, each patch exactly as it would alone."""
    tissue = _same_tissue_two_centers()[:1]
    od = (
        torch.tensor([0.65, 0.70, 0.29], dtype=torch.float64)[None, :, None, None]
        * torch.linspace(0.3, 1.5, 16, dtype=torch.float64)[None, None, :, None]
    )
    one_stain = (torch.exp(-od) * 256 - 1).div(255).expand(1, 3, 16, 16).clamp(0, 1)
    one_stain = torch.nn.functional.interpolate(one_stain, size=tissue.shape[-2:], mode="nearest")
    both = torch.cat([tissue, one_stain])
    out = macenko(both)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1], macenko(tissue))
    torch.testing.assert_close(out[1:], macenko(one_stain))


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
@pytest.mark.slow
def test_stain_norm_switch_trains_and_predicts(prepared_root, tmp_path, method):
    from histoshift.config import load_config
    from histoshift.runs import RunDir
    from histoshift.paths import Paths
    from histoshift.stages.train import train_fold

    path = tmp_path / "sn.yaml"
    path.write_text(yaml.safe_dump({
        **tiny_config(algorithm={"name": "dann"}, aug={"stain_norm": method},
                      train={"steps_per_epoch": 2, "eval_batch_size": 32})}))
    run = RunDir.of(tmp_path / "runs", "sn", 0, 3)
    train_fold(load_config(path), Paths(prepared_root), run)
    assert pd.read_csv(run.oof).logit.notna().all()
