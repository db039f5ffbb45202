"""Fourier domain adaptation at test time, "feather-light" (Zakazov et al., DART 2022, pp. 88-97): a target image
keeps its Fourier phase and its high frequencies; the amplitudes of its lowest frequencies - the global colour and
illumination, where a scanner or a stain protocol shows - are taken from a source image:

    t' = F^-1([M_beta * A(s) + (1 - M_beta) * A(t)] * exp(i P(t)))

per RGB channel, with M_beta the disc of frequencies within beta * min(H, W) of zero (beta 0: the mean colour
only). Multi-source transfer: each target image gets n donors, the source images most alike in exactly those
low-frequency amplitudes (the paper ranks donors by a spectral-residual similarity; this cheaper one is the
distance between the log-amplitudes that are swapped), and a model's predictions are averaged over the n
transferred images. Batched with torch.fft on the device.

On 96-px patches the betas mean little room: beta 0.01 (radius 0.96) swaps the zero frequency alone - the mean
colour, nothing of its spatial layout - and 0.03 / 0.05 (radius 2.9 / 4.8) a few dozen of the lowest frequencies;
the paper's betas were chosen for larger images.
"""
from __future__ import annotations

import torch

from ..config import ConfigError


def _real(x: torch.Tensor) -> torch.Tensor:
    """float64 stays, anything else computes in float32 (half-precision FFTs take powers of two only)."""
    return x if x.dtype == torch.float64 else x.float()


def low_frequency_mask(h: int, w: int, beta: float, device=None) -> torch.Tensor:
    """H x W booleans in torch.fft's (unshifted) layout: the frequencies within beta * min(H, W) of zero."""
    u = torch.fft.fftfreq(h, device=device)[:, None] * h  # frequency indices, signed
    v = torch.fft.fftfreq(w, device=device)[None, :] * w
    return (u ** 2 + v ** 2).sqrt() <= beta * min(h, w)


def amplitude_swap(target: torch.Tensor, donor: torch.Tensor, beta: float) -> torch.Tensor:
    """B x C x H x W target images with the low-frequency amplitudes of the donors (same shape): unclamped."""
    ft, fd = torch.fft.fft2(_real(target)), torch.fft.fft2(_real(donor).to(_real(target).dtype))
    mask = low_frequency_mask(target.shape[-2], target.shape[-1], beta, target.device)
    amplitude = torch.where(mask, fd.abs(), ft.abs())
    return torch.fft.ifft2(torch.polar(amplitude, ft.angle())).real


def fourier_transfer(target: torch.Tensor, donor: torch.Tensor, beta: float) -> torch.Tensor:
    """`amplitude_swap` clamped to [0, 1], in the target's dtype."""
    return amplitude_swap(target, donor, beta).clamp(0, 1).to(target.dtype)


def descriptor(x: torch.Tensor, beta: float) -> torch.Tensor:
    """B x K: each image's log-amplitudes inside M_beta, every channel (what a transfer would replace)."""
    mask = low_frequency_mask(x.shape[-2], x.shape[-1], beta, x.device)
    return torch.log1p(torch.fft.fft2(_real(x)).abs()[..., mask]).flatten(1)


def nearest_donors(
    target: torch.Tensor, pool: torch.Tensor, n: int, forbidden: torch.Tensor | None = None
) -> torch.Tensor:
    """B x n indices into `pool` (P x K descriptors): each target descriptor's n nearest, nearest first, never a
    pair `forbidden` (B x P booleans) marks; fewer than n allowed donors is a ConfigError."""
    d = torch.cdist(target, pool)
    if forbidden is not None:
        d = d.masked_fill(forbidden, float("inf"))
    idx = d.topk(min(n, len(pool)), dim=1, largest=False).indices
    if torch.isinf(d.gather(1, idx)).any():
        raise ConfigError(f"Fourier transfer: fewer than {n} donors of other centers in the pool; lower "
                          "infer --fourier-donors")
    return idx


class Donors:
    """The donor pool on the device and, per beta, its descriptors. `views(x, centers, beta, n)`: each image of x
    transferred to its n nearest donors of another center than its own (a held-out training center never
    donates to itself, so leave-one-center-out scores stay honest): n x B x C x H x W."""

    def __init__(self, images: torch.Tensor, centers: torch.Tensor):
        self.images, self.centers = images, centers
        self._descriptors: dict[float, torch.Tensor] = {}

    def views(self, x: torch.Tensor, centers: torch.Tensor, beta: float, n: int) -> torch.Tensor:
        if beta not in self._descriptors:
            self._descriptors[beta] = descriptor(self.images, beta)
        forbidden = centers.to(self.centers.device)[:, None] == self.centers[None, :]  # its own center: never
        idx = nearest_donors(descriptor(x, beta), self._descriptors[beta], n, forbidden.to(x.device))
        return torch.stack([fourier_transfer(x, self.images[idx[:, k]].to(x.dtype), beta) for k in range(idx.shape[1])])
