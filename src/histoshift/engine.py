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
import time
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from .averaging import make_averager, refresh_batchnorm
from .checkpoint import LOOP_STATE, load_state, save_state
from .config import Config, ConfigError
from .data.loader import cycle
from .metrics import per_center
from .precision import autocast
from .progress import bar
from .runs import RunDir
from .errors import require_finite
from .lineage import StaleError
from .safeio import append_text, write_text
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


class Progress:
    """The loop's position and history, saved with every epoch's state as JSON (`loop.json`)."""

    def __init__(self):
        self.epoch, self.step, self.seconds, self.records = 0, 0, 0.0, []
        self.best_epoch, self.best_acc = 0, -1.0  # early stopping: the best held-out epoch so far

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seconds": self.seconds, "records": list(self.records),
                "best_epoch": self.best_epoch, "best_acc": self.best_acc}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step, self.seconds = state["epoch"], state["step"], state["seconds"]
        self.records = list(state["records"])
        self.best_epoch, self.best_acc = state.get("best_epoch", 0), state.get("best_acc", -1.0)


BEST_WEIGHTS = "best_model.safetensors"  # early stopping: the best epoch's weights, beside a saved state
AVERAGE_WEIGHTS = "average.safetensors"  # train.average: the averages so far, beside a saved state
AGAIN = "train --force starts the fold again"


def save_epoch_state(accelerator: Accelerator, run: RunDir, epoch: int, nbytes: int, scheduler, progress: Progress,
                     best: dict | None = None, average: dict | None = None) -> None:
    """Everything needed to resume after `epoch`, in run/state-epoch<N>/ (checkpoint.save_state: no pickle
    is ever read back): the scheduler and the progress in loop.json, early stopping's best weights and the
    weight averages beside."""
    extra = {name: t for name, t in ((BEST_WEIGHTS, best), (AVERAGE_WEIGHTS, average)) if t}
    save_state(
        accelerator,
        run.state_dir(epoch),
        {"progress": progress.state_dict(), "scheduler": scheduler.state_dict()},
        nbytes,
        f"saving the epoch {epoch} state",
        extra,
    )


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


def load_epoch_state(accelerator: Accelerator, folder, scheduler, progress: Progress) -> None:
    """The state `save_epoch_state` wrote (checkpoint.load_state: nothing unpickled, foreign files refused)."""
    state = load_state(accelerator, folder, AGAIN)
    try:
        scheduler.load_state_dict(state["scheduler"])
        progress.load_state_dict(state["progress"])
    except (KeyError, TypeError, ValueError) as e:
        raise StaleError(f"{folder / LOOP_STATE}: not a saved loop state ({type(e).__name__}: {e}); {AGAIN}") from None


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


def fit(cfg: Config, task, algorithm, streams, heldout_predictor, accelerator: Accelerator, run: RunDir,
        precision: str, resume: bool):
    """Train `algorithm` (whose `.model` is the task's model) for cfg.train.epochs; returns the trained (or
    averaged) model (unwrapped), the held-out center's plain-view table of it, the seconds spent, the model's
    bytes and what train.average did."""
    optimizer = build_optimizer(cfg.optim, algorithm.param_groups())
    algorithm, optimizer = accelerator.prepare(algorithm, optimizer)
    core = accelerator.unwrap_model(algorithm)
    if cfg.train.compile:
        core.model.forward = torch.compile(core.model.forward)
    src_loader, _ = streams.epoch(0)
    if len(src_loader) == 0:
        raise ConfigError(f"fold {run.fold}: fewer labelled training patches than one batch "
                          f"(train.batch_size={cfg.train.batch_size}): lower train.batch_size")
    steps_per_epoch = cfg.train.steps_per_epoch or len(src_loader)
    total = steps_per_epoch * cfg.train.epochs
    factor = warmup_cosine(total, cfg.optim.warmup_frac)
    probe_steps = cfg.train.probe_epochs * steps_per_epoch  # a linear probe first: backbone lr 0
    schedules = [(lambda s: 0.0 if s < probe_steps else factor(s)) if g.get("name") == "backbone" else factor
                 for g in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
    progress = Progress()
    state_bytes = 3 * sum(p.numel() * p.element_size() for p in core.parameters())  # weights + two AdamW moments
    patience, best = cfg.train.early_stop_patience, None
    averager = make_averager(core.model, cfg.train, steps_per_epoch)
    if resume:
        load_epoch_state(accelerator, run.last_state(), scheduler, progress)
        if patience and (run.last_state() / BEST_WEIGHTS).exists():
            best = load_file(str(run.last_state() / BEST_WEIGHTS))
        if (run.last_state() / AVERAGE_WEIGHTS).exists():
            averager.load(load_file(str(run.last_state() / AVERAGE_WEIGHTS)))
        accelerator.print(f"train {run.name}: resuming after epoch {progress.epoch} of {cfg.train.epochs}")
        if accelerator.is_main_process:  # the history as of the saved epoch (a later line may predate the kill)
            write_text(run.metrics, "".join(json.dumps(r) + "\n" for r in progress.records))

    t0, oof = time.time() - progress.seconds, None
    for epoch in range(progress.epoch, cfg.train.epochs):
        algorithm.train()
        src_loader, tgt_loader = streams.epoch(epoch)  # the data order is a function of (seed, epoch)
        if core.embeds_each_epoch:  # e.g. AIVA's clusters: the epoch's batches, in order, before its first step
            core.before_epoch((task.feed(s, t) for s, t in zip(src_loader, tgt_loader)),
                              lambda t: gather_rows(accelerator, t), seed=cfg.train.seed * 1000 + epoch)
        src_iter = cycle(src_loader)
        tgt_iter = cycle(tgt_loader) if core.uses_target else None
        logs: dict[str, list[float]] = {}
        steps = bar(range(steps_per_epoch), main=accelerator.is_local_main_process, unit="step",
                    desc=f"{run.name} epoch {epoch + 1}/{cfg.train.epochs}")
        for _ in steps:
            batch = task.feed(next(src_iter), next(tgt_iter) if tgt_iter is not None else None)
            batch = core.extend_batch(batch, task.to_model)  # e.g. Stain-AgLr's altered copies
            with autocast(accelerator.device, precision):
                out = algorithm(batch, progress=progress.step / total)
            accelerator.backward(out["loss"])
            if cfg.optim.grad_clip > 0:
                accelerator.clip_grad_norm_(algorithm.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            core.model.after_step(optimizer)  # e.g. a sparse probe's proximal L1 step
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            averager.after_step(core.model, progress.step)
            for k, v in out.items():
                if k != "logits" and v.ndim == 0:
                    logs.setdefault(k, []).append(float(v.detach()))
            steps.set_postfix(loss=f"{np.mean(logs['loss'][-20:]):.3f}")
        require_finite(logs["loss"], f"{run.path}: the training loss became non-finite in epoch {epoch + 1} "
                       f"(step {progress.step}); lower optim.lr or check the inputs - the run is not marked done")
        averager.after_epoch(core.model, epoch + 1)
        oof = heldout_predictor(averager.scored(core.model)).rename(columns={"v0": "logit"})
        held = per_center(check_finite(oof, f"{run.path} (held-out center {run.fold}, epoch {epoch + 1})")).iloc[0]
        record = {
            "epoch": epoch + 1,
            "step": progress.step,
            "seconds": round(time.time() - t0, 1),
            "lr_backbone": scheduler.get_last_lr()[0],
            **{f"train_{k}": round(float(np.mean(v)), 5) for k, v in logs.items()},
            "heldout_center": run.fold,
            "heldout_acc": round(held["accuracy"], 5),
            "heldout_auc": round(held["auc"], 5),
            "heldout_loss": round(heldout_loss(oof), 5),
            "heldout_brier": round(held["brier"], 5),
            "heldout_ece": round(held["ece"], 5),
        }
        accelerator.print(json.dumps(record))
        accelerator.log(numbers(record), step=epoch + 1)  # the trackers of train.log_with (none: nothing)
        progress.epoch, progress.seconds = epoch + 1, time.time() - t0
        progress.records.append(record)
        if accelerator.is_main_process:
            append_text(run.metrics, json.dumps(record) + "\n")  # never through a planted link
        if patience and held["accuracy"] > progress.best_acc:
            progress.best_epoch, progress.best_acc = epoch + 1, float(held["accuracy"])
            best = {k: v.detach().cpu().clone().contiguous() for k, v in core.model.state_dict().items()}
        stop = bool(patience) and epoch + 1 - progress.best_epoch >= patience
        if epoch + 1 < cfg.train.epochs and not stop:  # a kill from here on resumes after this epoch
            save_epoch_state(accelerator, run, epoch + 1, state_bytes, scheduler, progress, best, averager.state())
        if stop:
            accelerator.print(f"train {run.name}: early stop after epoch {epoch + 1}: no better held-out accuracy "
                              f"for {patience} epochs (best {progress.best_acc:.4f}, epoch {progress.best_epoch})")
            break
    if patience and best is not None:  # the best epoch's weights and its held-out predictions
        core.model.load_state_dict(best)  # copy_ across devices
        oof = heldout_predictor(core.model).rename(columns={"v0": "logit"})
    averaged = averager.final(core.model, [r["heldout_loss"] for r in progress.records])
    info = {"average": averager.name}
    if averaged is not None:  # scored, saved and adapted from the averaged weights; batch norm refreshed for them
        core.model.load_state_dict(averaged)
        src_loader, _ = streams.epoch(cfg.train.epochs)  # one more pass over the training stream
        info["batchnorm_refreshed"] = refresh_batchnorm(core.model, (task.feed(b, None)["x"] for b in src_loader))
        info["window"] = averager.window
        oof = heldout_predictor(core.model).rename(columns={"v0": "logit"})
        accelerator.print(f"train {run.name}: train.average={averager.name} " + json.dumps(info))
    return core.model, oof, time.time() - t0, state_bytes // 3, info
