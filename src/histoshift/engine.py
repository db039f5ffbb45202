"""The training engine: one loop for every kind of model and every algorithm.

The loop owns optimisation through Accelerate (`prepare`, `backward`, gradient clipping, the fp16
loss scaler); the algorithm only computes outputs and losses; the task (tasks/) supplies the batches
and turns them into model inputs. AdamW with one parameter group per part (backbone, head, domain
head...), linear warm-up then cosine decay, a linear probe first when asked (backbone lr 0). After
every epoch the held-out center is scored; by default that never selects a model (the last epoch's
weights are kept). train.early_stop_patience is the one exception: it keeps the epoch with the best
held-out accuracy, so that run's held-out accuracy is optimistic (the stack's choice records such members);
train.average averages the weights (averaging.py: EMA, SWA, or SWAD, whose window is picked on the held-out loss).
The whole state is saved after every epoch, so a killed run resumes after its last finished epoch with
the batches an uninterrupted run would have seen. A non-finite loss stops the run (errors.require_finite).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from .averaging import make_averager, refresh_batchnorm
from .checkpoint import EPOCH_STATES
from .config import Config, ConfigError
from .data.loader import cycle
from .metrics import per_center
from .precision import autocast
from .progress import bar
from .runs import RunDir
from .safeio import append_text, write_text
from .steploop import Evaluated, StepLoop
from .tracking import numbers
from .tta import check_finite


def warmup_cosine(total_steps: int, warmup_frac: float) -> Callable[[int], float]:
    warmup = max(1, int(round(total_steps * warmup_frac)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


BEST_WEIGHTS = "best_model.safetensors"  # early stopping: the best epoch's weights, beside a saved state
AVERAGE_WEIGHTS = "average.safetensors"  # train.average: the averages so far, beside a saved state
AGAIN = "train --force starts the fold again"


def build_optimizer(cfg, groups: list[dict]) -> torch.optim.Optimizer:
    """`optim.name` over the algorithm's parameter groups (each with its own lr), from maintained libraries:
    timm's factory for the names it knows, pytorch-optimizer for Nero (which constrains its weights itself
    and takes no weight decay: optim.weight_decay does not apply to it) and AvaGrad (Savarese et al. 2021,
    decoupled weight decay; its step is normalised by the adaptive rates' norm, so its lr is on SGD's scale)."""
    if cfg.name in ("nero", "avagrad"):
        try:
            from pytorch_optimizer import load_optimizer
        except ImportError:
            raise ConfigError(f"optim.name={cfg.name} needs the pytorch-optimizer package (pip install "
                              "pytorch-optimizer; it is in requirements.txt)") from None
        return load_optimizer(cfg.name)(groups, **({"weight_decay": cfg.weight_decay} if cfg.name == "avagrad" else {}))
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(groups, opt=cfg.name, weight_decay=cfg.weight_decay)


def gather_rows(accelerator: Accelerator, t: torch.Tensor) -> torch.Tensor:
    """Every process's rows of `t` concatenated (processes may hold different numbers of rows)."""
    if accelerator.num_processes == 1:
        return t
    counts = accelerator.gather(torch.tensor([len(t)], device=t.device)).tolist()
    padded = accelerator.gather(accelerator.pad_across_processes(t, dim=0))
    width = max(counts)
    return torch.cat([padded[i * width:i * width + n] for i, n in enumerate(counts)])


def heldout_loss(oof) -> float:
    """The held-out center's mean binary cross-entropy (from logits: log(1 + e^z) - y z, stable)."""
    z, y = oof["logit"].to_numpy(np.float64), oof["label"].to_numpy(np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


@dataclass
class Fitted:
    """What `fit` hands the train stage: the trained (or averaged) model, unwrapped; the held-out center's plain-view
    table of it; the seconds spent; the model's bytes; what train.average did."""
    model: nn.Module
    oof: pd.DataFrame
    seconds: float
    model_bytes: int
    average: dict


def fit(cfg: Config, task, algorithm, streams, heldout_predictor, accelerator: Accelerator, run: RunDir,
        precision: str, resume: bool) -> Fitted:
    """Train `algorithm` (whose `.model` is the task's model) for cfg.train.epochs through the one resumable loop
    (steploop.py): an epoch of steps, the held-out center scored, early stopping judged, a state saved."""
    epochs = _Epochs(cfg, task, algorithm, streams, heldout_predictor, accelerator, run, precision)
    loop = StepLoop(accelerator, run.path, EPOCH_STATES, cfg.train.epochs, "epoch", f"train {run.name}",
                    "lower optim.lr or check the inputs - the run is not marked done", AGAIN, epochs.state_bytes,
                    resume=resume)
    trained = loop.run(epochs.train, evaluate=epochs.evaluate, state=epochs.state, restore=epochs.restore,
                       on_record=epochs.record, on_resume=epochs.resumed)
    if epochs.patience and epochs.best is not None:  # the best epoch's weights and its held-out predictions
        epochs.core.model.load_state_dict(epochs.best)  # copy_ across devices
        epochs.oof = epochs.score(epochs.core.model)
    info = epochs.average([r["heldout_loss"] for r in trained.records])
    return Fitted(epochs.core.model, epochs.oof, trained.seconds, epochs.state_bytes // 3, info)


class _Epochs:
    """The engine's unit of work for the loop: one epoch of optimiser steps, then the held-out center's scores."""

    def __init__(self, cfg, task, algorithm, streams, heldout_predictor, accelerator, run, precision):
        self.cfg, self.task, self.streams, self.acc, self.run, self.precision = (cfg, task, streams, accelerator,
                                                                                 run, precision)
        self.heldout = heldout_predictor
        optimizer = build_optimizer(cfg.optim, algorithm.param_groups())
        self.algorithm, self.optimizer = accelerator.prepare(algorithm, optimizer)
        self.core = core = accelerator.unwrap_model(self.algorithm)
        if cfg.train.compile:
            core.model.forward = torch.compile(core.model.forward)
        src_loader, _ = streams.epoch(0)
        if len(src_loader) == 0:
            raise ConfigError(f"fold {run.fold}: fewer labelled training patches than one batch "
                              f"(train.batch_size={cfg.train.batch_size}): lower train.batch_size")
        self.steps_per_epoch = cfg.train.steps_per_epoch or len(src_loader)
        self.total = self.steps_per_epoch * cfg.train.epochs
        factor = warmup_cosine(self.total, cfg.optim.warmup_frac)
        probe_steps = cfg.train.probe_epochs * self.steps_per_epoch  # a linear probe first: backbone lr 0
        schedules = [(lambda s: 0.0 if s < probe_steps else factor(s)) if g.get("name") == "backbone" else factor
                     for g in self.optimizer.param_groups]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedules)
        self.step, self.best_epoch, self.best_acc, self.best, self.oof = 0, 0, -1.0, None, None
        self.state_bytes = 3 * sum(p.numel() * p.element_size() for p in core.parameters())  # + two AdamW moments
        self.patience = cfg.train.early_stop_patience
        self.averager = make_averager(core.model, cfg.train, self.steps_per_epoch)

    def train(self, epoch: int) -> dict[str, float]:
        cfg, core, acc = self.cfg, self.core, self.acc
        self.algorithm.train()
        src_loader, tgt_loader = self.streams.epoch(epoch)  # the data order is a function of (seed, epoch)
        if core.embeds_each_epoch:  # e.g. AIVA's clusters: the epoch's batches, in order, before its first step
            core.before_epoch((self.task.feed(s, t) for s, t in zip(src_loader, tgt_loader)),
                              lambda t: gather_rows(acc, t), seed=cfg.train.seed * 1000 + epoch)
        src_iter = cycle(src_loader)
        tgt_iter = cycle(tgt_loader) if core.uses_target else None
        logs: dict[str, list[float]] = {}
        steps = bar(range(self.steps_per_epoch), main=acc.is_local_main_process, unit="step",
                    desc=f"{self.run.name} epoch {epoch + 1}/{cfg.train.epochs}")
        for _ in steps:
            batch = self.task.feed(next(src_iter), next(tgt_iter) if tgt_iter is not None else None)
            batch = core.extend_batch(batch, self.task.to_model)  # e.g. Stain-AgLr's altered copies
            with autocast(acc.device, self.precision):
                out = self.algorithm(batch, progress=self.step / self.total)
            acc.backward(out["loss"])
            if cfg.optim.grad_clip > 0:
                acc.clip_grad_norm_(self.algorithm.parameters(), cfg.optim.grad_clip)
            self.optimizer.step()
            core.model.after_step(self.optimizer)  # e.g. a sparse probe's proximal L1 step
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.averager.after_step(core.model, self.step)
            for k, v in out.items():
                if k != "logits" and v.ndim == 0:
                    logs.setdefault(k, []).append(float(v.detach()))
            steps.set_postfix(loss=f"{np.mean(logs['loss'][-20:]):.3f}")
        return {f"train_{k}": float(np.mean(v)) for k, v in logs.items()}

    def score(self, model) -> pd.DataFrame:
        return self.heldout(model).rename(columns={"v0": "logit"})

    def evaluate(self, epoch: int, losses: dict) -> Evaluated:
        self.averager.after_epoch(self.core.model, epoch + 1)
        self.oof = self.score(self.averager.scored(self.core.model))
        where = f"{self.run.path} (held-out center {self.run.fold}, epoch {epoch + 1})"
        held = per_center(check_finite(self.oof, where)).iloc[0]
        if self.patience and held["accuracy"] > self.best_acc:
            self.best_epoch, self.best_acc = epoch + 1, float(held["accuracy"])
            self.best = {k: v.detach().cpu().clone().contiguous() for k, v in self.core.model.state_dict().items()}
        stop = bool(self.patience) and epoch + 1 - self.best_epoch >= self.patience
        if stop:
            self.acc.print(f"train {self.run.name}: early stop after epoch {epoch + 1}: no better held-out accuracy "
                           f"for {self.patience} epochs (best {self.best_acc:.4f}, epoch {self.best_epoch})")
        record = {"step": self.step, "lr_backbone": self.scheduler.get_last_lr()[0], "heldout_center": self.run.fold,
                  "heldout_acc": round(held["accuracy"], 5), "heldout_auc": round(held["auc"], 5),
                  "heldout_loss": round(heldout_loss(self.oof), 5), "heldout_brier": round(held["brier"], 5),
                  "heldout_ece": round(held["ece"], 5)}
        return Evaluated(record, stop)

    def record(self, record: dict) -> None:
        self.acc.print(json.dumps(record))
        self.acc.log(numbers(record), step=record["epoch"])  # the trackers of train.log_with (none: nothing)
        if self.acc.is_main_process:
            append_text(self.run.metrics, json.dumps(record) + "\n")  # never through a planted link

    def state(self) -> tuple[dict, dict]:
        extra = {"scheduler": self.scheduler.state_dict(), "step": self.step, "best_epoch": self.best_epoch,
                 "best_acc": self.best_acc}
        tensors = {name: t for name, t in ((BEST_WEIGHTS, self.best), (AVERAGE_WEIGHTS, self.averager.state())) if t}
        return extra, tensors

    def restore(self, extra: dict, folder) -> None:
        self.scheduler.load_state_dict(extra["scheduler"])  # (a state without these: the loop's one line)
        self.step, self.best_epoch, self.best_acc = extra["step"], extra["best_epoch"], extra["best_acc"]
        if self.patience and (folder / BEST_WEIGHTS).exists():
            self.best = load_file(str(folder / BEST_WEIGHTS))
        if (folder / AVERAGE_WEIGHTS).exists():
            self.averager.load(load_file(str(folder / AVERAGE_WEIGHTS)))

    def resumed(self, trained) -> None:
        if self.acc.is_main_process:  # the history as of the saved epoch (a later line may predate the kill)
            write_text(self.run.metrics, "".join(json.dumps(r) + "\n" for r in trained.records))

    def average(self, heldout_losses: list[float]) -> dict:
        """train.average's weights loaded, scored and saved (batch norm refreshed for them); what it did."""
        averaged = self.averager.final(self.core.model, heldout_losses)
        info = {"average": self.averager.name}
        if averaged is not None:
            model = self.core.model
            model.load_state_dict(averaged)
            src_loader, _ = self.streams.epoch(self.cfg.train.epochs)  # one more pass over the training stream
            info["batchnorm_refreshed"] = refresh_batchnorm(model, (self.task.feed(b, None)["x"] for b in src_loader))
            info["window"] = self.averager.window
            self.oof = self.score(model)
            self.acc.print(f"train {self.run.name}: train.average={self.averager.name} " + json.dumps(info))
        return info
