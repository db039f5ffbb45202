"""Fourier test-time transfer (stain/fourier.py) against the definition: the target keeps its phase and every
amplitude outside the low-frequency disc, takes the donor's inside it; beta 0 swaps the mean colour only; donors
are the nearest in the swapped log-amplitudes."""
from __future__ import annotations

import numpy as np
import torch

from histoshift.data.demo import render_patch
from histoshift.stain.fourier import (Donors, amplitude_swap, descriptor, fourier_transfer, low_frequency_mask,
                                      nearest_donors)


def _patches(centers=(0, 2), seed=5):
    return torch.from_numpy(np.stack([render_patch(np.random.default_rng(seed + i), i % 2, c)
                                      for i, c in enumerate(centers)])).double()


def test_the_mask_is_a_disc_around_zero_frequency():
    m = low_frequency_mask(8, 8, 0.25)  # radius 2 frequency indices
    assert m[0, 0] and m[0, 2] and m[2, 0] and m[0, -2] and m[1, 1] and not m[2, 2] and not m[0, 3]
    assert int(m.sum()) == 13  # the lattice points with u^2 + v^2 <= 4
    assert int(low_frequency_mask(96, 96, 0.0).sum()) == 1  # beta 0: the mean only


def test_the_swap_keeps_the_phase_and_high_frequencies_and_takes_the_donors_low_amplitudes():
    x = _patches()
    target, donor = x[:1], x[1:]
    out = amplitude_swap(target, donor, 0.05)
    fo, ft, fd = torch.fft.fft2(out), torch.fft.fft2(target), torch.fft.fft2(donor)
    mask = low_frequency_mask(96, 96, 0.05)
    torch.testing.assert_close(fo.abs()[..., ~mask], ft.abs()[..., ~mask], atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(fo.abs()[..., mask], fd.abs()[..., mask], atol=1e-8, rtol=1e-8)
    strong = ft.abs() > 1e-6  # the phase wherever the target has any amplitude
    phase = torch.angle(fo * ft.conj())[strong]
    assert phase.abs().max() < 1e-6
    # high frequencies untouched: the image minus its low-pass part is the target's
    low = lambda f: torch.fft.ifft2(torch.where(mask, f, 0)).real  # noqa: E731
    torch.testing.assert_close(out - low(fo), target - low(ft), atol=1e-8, rtol=0)


def test_beta_zero_swaps_the_mean_colour_only():
    x = _patches()
    out = fourier_transfer(x[:1], x[1:], 0.0)
    torch.testing.assert_close(out.mean(dim=(2, 3)), x[1:].mean(dim=(2, 3)), atol=1e-3, rtol=0)
    shift = out - x[:1]  # one constant a channel, except where the result was clamped to [0, 1]
    inside = (out > 0) & (out < 1)
    for c in range(3):
        values = shift[0, c][inside[0, c]]
        assert values.max() - values.min() < 1e-6 and inside[0, c].float().mean() > 0.5  # white background clamps
    assert out.min() >= 0 and out.max() <= 1 and out.dtype == x.dtype


def test_donors_are_the_nearest_in_the_swapped_amplitudes_and_views_come_per_donor():
    pool = _patches(centers=(0, 3, 4, 0, 3, 4), seed=11)
    target = _patches(centers=(2, 2), seed=20)
    d_pool, d_target = descriptor(pool, 0.03), descriptor(target, 0.03)
    idx = nearest_donors(d_target, d_pool, 3)
    brute = torch.cdist(d_target, d_pool).argsort(1)[:, :3]
    assert torch.equal(idx, brute)
    views = Donors(pool, torch.tensor([0, 3, 4, 0, 3, 4])).views(target, torch.tensor([2, 2]), 0.03, 3)
    assert views.shape == (3, 2, 3, 96, 96)
    torch.testing.assert_close(views[1, 0], fourier_transfer(target[:1], pool[idx[0, 1]][None], 0.03)[0])
    # the transferred image sits nearer its donor than the target did, in what was swapped
    before = torch.cdist(d_target[:1], d_pool[idx[0, 0]][None])
    after = torch.cdist(descriptor(views[0, :1], 0.03), d_pool[idx[0, 0]][None])
    assert float(after) < 0.5 * float(before)
