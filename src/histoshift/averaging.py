"""Weight averaging (`train.average`), for every kind of model, from the field's libraries: timm's ModelEmaV3 for the
exponential average, torch's AveragedModel (torch.optim.swa_utils) for the uniform ones.

  none  the last step's weights
  ema   an exponential moving average of every step's weights (train.ema_decay, reached through timm's warm-up
        ramp, so that a short run is not dominated by its first weights); the held-out center is scored on it
  swa   the uniform mean of every step's weights from train.average_start (a share of the steps) on; reads no label
  swad  dense averaging (Cha et al., NeurIPS 2021): the uniform mean of every step's weights over the window of
        epochs around the lowest held-out loss, every epoch of it within train.swad_tolerance x that loss. The
        window is chosen on the held-out center's labels after training, so, as with early stopping, that center's
        out-of-fold accuracy is optimistic (the stack's choice names such members)

A model with batch-norm layers gets its statistics recomputed for the averaged weights on one pass over the
training stream (torch.optim.swa_utils.update_bn) before it is scored, saved or adapted (AdaBN starts from the
averaged weights). The averages are saved with every epoch's state, so a resumed run keeps them.

Where this deviates from the papers: SWA averages under the loop's own schedule (warm-up, then cosine), not under
SWALR's constant or annealed SWA learning rate (Izmailov et al. 2018); SWAD judges its window once per epoch on the
held-out loss (Cha et al. evaluate every few hundred iterations and open the window after a patience rule), so the
window is epoch-grained and can include warm-up epochs whose loss is within the tolerance.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

AVERAGES = ("none", "ema", "swa", "swad")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


class Averager:
    """`train.average: none`: nothing to average (the base of the others)."""
    name = "none"
    reads_heldout_labels = False

    def __init__(self, model: nn.Module, cfg, steps_per_epoch: int):
        self.cfg, self.steps_per_epoch = cfg, steps_per_epoch
        self.window: list[int] = []  # the epochs averaged

    def after_step(self, model: nn.Module, step: int) -> None: ...

    def after_epoch(self, model: nn.Module, epoch: int) -> None: ...

    def scored(self, model: nn.Module) -> nn.Module:
        """The model the held-out center is scored on after each epoch."""
        return model

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load(self, state: dict[str, torch.Tensor]) -> None: ...

    def final(self, model: nn.Module, losses: list[float]) -> dict | None:
        """The averaged weights (`losses`: the held-out loss of each epoch), None to keep the model's own."""
        return None


class Ema(Averager):
    name = "ema"

    def __init__(self, model, cfg, steps_per_epoch):
        from timm.utils import ModelEmaV3

        super().__init__(model, cfg, steps_per_epoch)
        # float32 accumulators whatever the model's dtype (timm: the only option for float16); timm releases before
        # the keyword existed copy the model as it is, float32 here (weights stay float32 under autocast)
        dtype = {"dtype": torch.float32} if "dtype" in inspect.signature(ModelEmaV3).parameters else {}
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True, warmup_power=0.75, **dtype)

    def after_step(self, model, step):
        self.ema.update(model, step=step)

    def scored(self, model):
        return self.ema.module

    def state(self):
        return _cpu(self.ema.module.state_dict())

    def load(self, state):
        self.ema.module.load_state_dict(state)

    def final(self, model, losses):
        return self.ema.module.state_dict()


class Swa(Averager):
    """The uniform mean of every step's weights from train.average_start on."""
    name = "swa"

    def __init__(self, model, cfg, steps_per_epoch):
        super().__init__(model, cfg, steps_per_epoch)
        self.avg = AveragedModel(model, use_buffers=True)
        self.first_step = math.floor(cfg.average_start * steps_per_epoch * cfg.epochs)

    def after_step(self, model, step):
        if step > self.first_step:
            self.avg.update_parameters(model)

    def state(self):
        return _cpu(self.avg.state_dict())

    def load(self, state):
        self.avg.load_state_dict(state)

    def final(self, model, losses):
        epochs = self.cfg.epochs
        self.window = [e for e in range(1, epochs + 1) if e * self.steps_per_epoch > self.first_step]
        return {k.removeprefix("module."): v for k, v in self.avg.state_dict().items() if k != "n_averaged"}


class Swad(Averager):
    """Each epoch's dense mean is kept (on the CPU: one model copy an epoch); the window is picked at the end."""
    name = "swad"
    reads_heldout_labels = True

    def __init__(self, model, cfg, steps_per_epoch):
        super().__init__(model, cfg, steps_per_epoch)
        self.model, self.means = model, []  # means[e]: epoch e+1's mean weights
        self._fresh()

    def _fresh(self):
        self.avg = AveragedModel(self.model, use_buffers=True)

    def after_step(self, model, step):
        self.avg.update_parameters(model)

    def after_epoch(self, model, epoch):
        self.means.append({k.removeprefix("module."): v for k, v in _cpu(self.avg.state_dict()).items()
                           if k != "n_averaged"})
        self._fresh()

    def state(self):
        return {f"{e}/{k}": v for e, mean in enumerate(self.means) for k, v in mean.items()}

    def load(self, state):
        self.means = [{} for _ in range(1 + max((int(k.split("/", 1)[0]) for k in state), default=-1))]
        for key, v in state.items():
            e, k = key.split("/", 1)
            self.means[int(e)][k] = v

    def final(self, model, losses):
        self.window = swad_window(losses, self.cfg.swad_tolerance)
        picked = [self.means[e - 1] for e in self.window]
        out = {}
        for k, v in picked[0].items():  # every epoch has the same number of steps: the mean of the means
            out[k] = (sum(m[k].double() for m in picked) / len(picked)).to(v.dtype) if v.is_floating_point() else v
        return out


def swad_window(losses: list[float], tolerance: float) -> list[int]:
    """The epochs (1-based) averaged by SWAD: the lowest held-out loss's epoch, widened both ways while each
    neighbour's loss stays within `tolerance` x the lowest (SWAD's r)."""
    best = min(range(len(losses)), key=losses.__getitem__)
    bound = tolerance * losses[best]
    lo = hi = best
    while lo > 0 and losses[lo - 1] <= bound:
        lo -= 1
    while hi + 1 < len(losses) and losses[hi + 1] <= bound:
        hi += 1
    return list(range(lo + 1, hi + 2))


KINDS = {c.name: c for c in (Averager, Ema, Swa, Swad)}


def make_averager(model: nn.Module, cfg, steps_per_epoch: int) -> Averager:
    """`cfg`: the config's train section."""
    return KINDS[cfg.average](model, cfg, steps_per_epoch)


def refresh_batchnorm(model: nn.Module, inputs) -> int:
    """Batch-norm statistics recomputed for averaged weights over `inputs` (model inputs, one pass of the
    training stream): torch's update_bn. Returns the layers refreshed (0: nothing to do)."""
    if not has_batchnorm(model):
        return 0
    update_bn(inputs, model)
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
