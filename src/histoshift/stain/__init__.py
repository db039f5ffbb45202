"""Colour: everything a config's stain settings do, in one place.

  hed.py        HED colour deconvolution and its jitter (Ruifrok & Johnston; Tellez et al.)
  jitter.py     brightness/contrast jitter, luma and grayscale
  classical.py  Reinhard and Macenko normalisation on whole batches
  gan.py        the stain GAN (MultiStain-CycleGAN): networks, its folder and key, the loaded generator
  albu.py       the albumentations backend's per-image views and jitter (CPU workers)
  transform.py  InputTransform: the one order normalise -> jitter -> grayscale, for both backends
The GAN's training is the `stain-gan` stage (stages/stain_gan.py).
"""
