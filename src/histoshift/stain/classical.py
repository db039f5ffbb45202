"""Optional stain normalisation on whole batches (`aug.stain_norm`): every patch, at training and
at inference, is mapped to one reference appearance before the colour jitter.

  reinhard  per-image mean and standard deviation of each CIELAB channel matched to a reference
  macenko   per-image H and E stain vectors estimated from optical density (Macenko et al. 2009),
            concentrations rescaled to the reference's 99th percentiles, re-rendered with the
            reference stain matrix
(`gan`, a generator the `stain-gan` stage trains, is stain/gan.py; stain/transform.py applies either.)

A published report on this competition found that stain normalisation hurt (Phikon-v2 + DANN,
val 0.973 -> 0.942), so all stay off by default; they exist to be measured.
"""
from __future__ import annotations

import torch

# CIELAB reference (mean, std per L, a, b channel) of a typical H&E patch
LAB_REF_MEAN = (68.0, 22.0, -14.0)
LAB_REF_STD = (15.0, 9.0, 7.0)
# Macenko reference: H and E optical-density directions and their 99th-percentile concentrations
STAIN_REF = ((0.5626, 0.7201, 0.4062), (0.2159, 0.8012, 0.5581))
MAX_CONC_REF = (1.9705, 1.0308)

_RGB2XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.950456, 1.0, 1.088754)


def _f(t):
    return torch.where(t > 0.008856, t.clamp_min(1e-12) ** (1 / 3), 7.787 * t + 16 / 116)


def _f_inv(t):
    return torch.where(t > 0.206893, t ** 3, (t - 16 / 116) / 7.787)


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W sRGB in [0, 1] -> CIELAB (D65)."""
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    m = torch.as_tensor(_RGB2XYZ, dtype=x.dtype, device=x.device)
    xyz = (
        torch.einsum("ij,bjhw->bihw", m, lin)
        / torch.as_tensor(_WHITE, dtype=x.dtype, device=x.device)[None, :, None, None]
    )
    fx, fy, fz = _f(xyz).unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    L, a, b = lab.unbind(1)
    fy = (L + 16) / 116
    xyz = torch.stack([_f_inv(fy + a / 500), _f_inv(fy), _f_inv(fy - b / 200)], dim=1)
    xyz = xyz * torch.as_tensor(_WHITE, dtype=lab.dtype, device=lab.device)[None, :, None, None]
    m_inv = torch.linalg.inv(torch.as_tensor(_RGB2XYZ, dtype=lab.dtype, device=lab.device))
    lin = torch.einsum("ij,bjhw->bihw", m_inv, xyz).clamp(0, 1)
    return torch.where(lin > 0.0031308, 1.055 * lin ** (1 / 2.4) - 0.055, 12.92 * lin).clamp(0, 1)


def _lab_stats(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lab.mean(dim=(2, 3), keepdim=True), lab.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)


def reinhard(x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's CIELAB mean and standard deviation matched to the fixed reference, or with `reference` (a
    batch of the same size) to those of the reference image at the same position (a stain transfer)."""
    lab = rgb_to_lab(x)
    mean, std = _lab_stats(lab)
    if reference is None:
        ref_mean = torch.as_tensor(LAB_REF_MEAN, dtype=x.dtype, device=x.device)[None, :, None, None]
        ref_std = torch.as_tensor(LAB_REF_STD, dtype=x.dtype, device=x.device)[None, :, None, None]
    else:
        ref_mean, ref_std = _lab_stats(rgb_to_lab(reference))
    return lab_to_rgb((lab - mean) / std * ref_std + ref_mean)


def macenko(x: torch.Tensor, beta: float = 0.15, alpha: float = 1.0) -> torch.Tensor:
    """Patches with too little stained tissue (fewer than 10% pixels above `beta` OD) pass unchanged."""
    b, _, h, w = x.shape
    od = -torch.log((x.clamp(0, 1) * 255 + 1) / 256).flatten(2).transpose(1, 2)  # B x N x 3
    tissue = (od > beta).all(dim=2)  # B x N
    enough = tissue.float().mean(1) > 0.1
    weights = tissue.float().unsqueeze(2)
    count = weights.sum(1, keepdim=True).clamp_min(1)
    centred = (od - (od * weights).sum(1, keepdim=True) / count) * weights
    cov = centred.transpose(1, 2) @ centred / count
    _, vecs = torch.linalg.eigh(cov + 1e-6 * torch.eye(3, dtype=x.dtype, device=x.device))
    plane = vecs[:, :, 1:]  # the two largest directions, B x 3 x 2
    proj = od @ plane  # B x N x 2
    phi = torch.atan2(proj[..., 1], proj[..., 0]).masked_fill(~tissue, float("nan"))
    lo = torch.nanquantile(phi, alpha / 100, dim=1).nan_to_num(0.0)
    hi = torch.nanquantile(phi, 1 - alpha / 100, dim=1).nan_to_num(0.0)
    v1 = (plane @ torch.stack([torch.cos(lo), torch.sin(lo)], 1).unsqueeze(2)).squeeze(2)
    v2 = (plane @ torch.stack([torch.cos(hi), torch.sin(hi)], 1).unsqueeze(2)).squeeze(2)
    v1, v2 = v1 * torch.sign(v1.sum(1, keepdim=True)), v2 * torch.sign(v2.sum(1, keepdim=True))
    h_first = (v1[:, 0] > v2[:, 0]).unsqueeze(1)  # hematoxylin absorbs more red
    stains = torch.stack([torch.where(h_first, v1, v2), torch.where(h_first, v2, v1)], dim=2)  # B x 3 x 2
    stains = stains / stains.norm(dim=1, keepdim=True).clamp_min(1e-6)
    # least squares through the (slightly ridged) normal equations: CUDA's lstsq refuses the rank-deficient
    # stain matrices of patches without two stains, which pass unchanged below anyway
    gram = stains.transpose(1, 2) @ stains + 1e-6 * torch.eye(2, dtype=x.dtype, device=x.device)
    conc = torch.linalg.solve(gram, stains.transpose(1, 2) @ od.transpose(1, 2))  # B x 2 x N
    max_conc = torch.quantile(conc, 0.99, dim=2, keepdim=True).clamp_min(1e-6)
    ref_max = torch.as_tensor(MAX_CONC_REF, dtype=x.dtype, device=x.device)[None, :, None]
    conc = conc / max_conc * ref_max
    ref = torch.as_tensor(STAIN_REF, dtype=x.dtype, device=x.device).T  # 3 x 2
    out = (256 * torch.exp(-(ref @ conc)) - 1) / 255
    out = out.clamp(0, 1).view(b, 3, h, w)
    return torch.where(enough[:, None, None, None], out, x)


CLASSICAL = {"reinhard": reinhard, "macenko": macenko}  # aug.stain_norm -> the batch function (gan: stain/gan.py)
