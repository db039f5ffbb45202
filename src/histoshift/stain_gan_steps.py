"""The stain GAN's training steps (the `stain-gan` stage runs them on steploop.StepLoop): MultiStain-CycleGAN's
objective as stain/gan.py's models learn it.

A step: a batch of source-center and of target-center patches (random dihedral views), each HED- and
brightness-jittered; the generator colours the jittered gray of a source patch like the target (least-squares
adversarial loss against the patch discriminator, an L1 loss keeping its gray, weighted `gray_weight`) and rebuilds a
target patch from its jittered copy (L1, weighted `rgb_weight`); then the discriminator learns target patches from
coloured ones. Adam (beta1 0.5), lr constant then linearly to 0 over the second half. The batches and the jitter
are a function of (seed, step, process): a resumed run sees the same ones.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data.augment import random_dihedral, to_float
from .stain.gan import Generator, PatchDiscriminator
from .stain.hed import random_hed
from .stain.jitter import brightness_contrast, luma


def random_batch(cache, rows, n: int, rng, device) -> torch.Tensor:
    """n random patches of `rows` (distinct when there are enough) as float B x 3 x H x W in [0, 1] on the device
    (sorted: sequential reads)."""
    pick = rows.iloc[np.sort(rng.choice(len(rows), n, replace=len(rows) < n))]
    return to_float(torch.from_numpy(cache.gather(pick)).to(device))


def colour_jitter(x: torch.Tensor, sigma: float, generator) -> torch.Tensor:
    """The generator's input augmentation: HED stain jitter, then brightness and contrast (then it sees gray)."""
    if sigma > 0:
        x = random_hed(x, sigma, generator)
    return brightness_contrast(x, 0.1, 0.1, generator)


class GanSteps:
    """The generator and discriminator, their optimisers (prepared by Accelerate) and one training step."""

    def __init__(self, cfg, cache, spec: dict, accelerator):
        g = self.g = cfg.stain_gan
        torch.manual_seed(g.seed)
        gen, disc = Generator(g.channels, g.blocks), PatchDiscriminator(2 * g.channels)
        opt_g = torch.optim.Adam(gen.parameters(), lr=g.lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=g.lr, betas=(0.5, 0.999))
        self.gen, self.disc, self.opt_g, self.opt_d = accelerator.prepare(gen, disc, opt_g, opt_d)
        self.acc, self.cache = accelerator, cache
        index = cache.index
        self.sources = index[index["center"].isin(spec["sources"])]
        self.target = index[index["center"] == spec["target"]]
        self.nbytes = 4 * sum(p.numel() * p.element_size() for m in (gen, disc) for p in m.parameters())

    def step(self, step: int) -> dict[str, float]:
        g, acc = self.g, self.acc
        rng = np.random.default_rng([g.seed, step, acc.process_index])
        jitter = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        lr = g.lr * min(1.0, 2.0 * (1.0 - step / g.steps))  # constant, then linear decay over the second half
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = lr
        x = random_dihedral(random_batch(self.cache, self.sources, g.batch_size, rng, acc.device), jitter)
        t = random_dihedral(random_batch(self.cache, self.target, g.batch_size, rng, acc.device), jitter)
        x_in, t_in = colour_jitter(x, g.hed_sigma, jitter), colour_jitter(t, g.hed_sigma, jitter)
        fake, rebuilt = self.gen(x_in), self.gen(t_in)
        score = self.disc(fake)
        losses = {"adv": F.mse_loss(score, torch.ones_like(score)),
                  "gray": F.l1_loss(luma(fake), luma(x_in)), "rgb": F.l1_loss(rebuilt, t)}
        loss_g = losses["adv"] + g.gray_weight * losses["gray"] + g.rgb_weight * losses["rgb"]
        self.opt_g.zero_grad(set_to_none=True)
        acc.backward(loss_g)
        self.opt_g.step()
        real, made = self.disc(t), self.disc(fake.detach())
        losses["disc"] = 0.5 * (F.mse_loss(real, torch.ones_like(real)) + F.mse_loss(made, torch.zeros_like(made)))
        self.opt_d.zero_grad(set_to_none=True)
        acc.backward(losses["disc"])
        self.opt_d.step()
        return {k: float(v.detach()) for k, v in losses.items()}
