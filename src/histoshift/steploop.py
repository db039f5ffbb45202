"""One resumable loop for every trainer: the training engine's epochs, the stain GAN's steps, robustify's steps.

Written once here: resume from the newest complete state (`<folder>/<prefix><N>/`, checkpoint.py: nothing
unpickled), run the units, stop on a non-finite loss with one line, keep records (the mean of each loss over
`record_every` units, plus what the caller's `evaluate` adds), save a state every `checkpoint_every` units (never
after the last: the caller's finish replaces it) and hand the records to the caller. What only the caller knows
(a scheduler, early stopping's best epoch, averaged weights) travels through the `state`/`restore` hooks as JSON
and tensor files inside the same state folder.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import checkpoint
from .errors import require_finite
from .progress import bar


@dataclass
class Evaluated:
    """What a unit's evaluation adds to its record, and whether the loop ends after it (early stopping)."""
    record: dict = field(default_factory=dict)
    stop: bool = False


@dataclass
class Trained:
    """What the loop did: the records (one every `record_every` units), the units done and the seconds spent
    (the resumed part included)."""
    records: list[dict]
    done: int
    seconds: float
    stopped: bool = False


@dataclass
class StepLoop:
    accelerator: object
    folder: Path  # where the state folders live (a run folder, a GAN's or a tuned backbone's folder)
    prefix: str  # the state folders' prefix: "state-epoch", "state-step"
    total: int  # units to run
    unit: str  # "epoch" | "step": the records' key and the messages' word
    where: str  # the progress lines' subject ("train <run>", "stain-gan <key>"); a failure names `folder`
    stop_hint: str  # what a non-finite loss's line ends with (what to change; what is not marked done)
    again: str  # how to start over, for a state that cannot be read
    nbytes: int  # free space to ask for before each saved state
    checkpoint_every: int = 1
    record_every: int = 1
    resume: bool = True
    progress_bar: bool = False  # a bar over the units (steps); epochs draw their own over their steps

    def run(self, train: Callable[[int], dict[str, float]], *,
            evaluate: Callable[[int, dict], Evaluated] | None = None,
            state: Callable[[], tuple[dict, dict]] = lambda: ({}, {}),
            restore: Callable[[dict, Path], None] | None = None,
            on_record: Callable[[dict], None] = lambda record: None,
            on_resume: Callable[[Trained], None] | None = None) -> Trained:
        """`train(u)`: unit u (0-based) -> its scalar losses (every one checked finite). `evaluate(u, losses)`: after
        the check, what the record adds and whether to stop. `state()`: (JSON, {file: flat tensors}) saved with
        each state; `restore(json, folder)` reads them back on resume. `on_record(record)` sees every record."""
        acc = self.accelerator
        done, seconds, records = 0, 0.0, []
        saved = checkpoint.last_state(self.folder, self.prefix) if self.resume else None
        if saved is not None:
            loop = checkpoint.load_state(acc, saved, self.again)
            try:  # the loop's fields and the caller's (a scheduler, early stopping): one line when one is wrong
                done, seconds, records, extra = _unpack(loop)
                if restore is not None:
                    restore(extra, saved)
            except (KeyError, TypeError, ValueError) as e:
                raise checkpoint.StaleError(f"{saved / checkpoint.LOOP_STATE}: not a saved loop state "
                                            f"({type(e).__name__}: {e}); {self.again}") from None
            acc.print(f"{self.where}: resuming after {self.unit} {done} of {self.total}")
            if on_resume is not None:
                on_resume(Trained(list(records), done, seconds))
        t0, logs, stopped = time.time() - seconds, {}, False
        units: Iterable[int] = range(done, self.total)
        if self.progress_bar:
            units = bar(units, main=acc.is_local_main_process, unit=self.unit, desc=self.where, initial=done,
                        total=self.total)
        for u in units:
            losses = train(u)
            require_finite(losses.values(), f"{self.folder}: the loss became non-finite in {self.unit} {u + 1} "
                                            f"({_short(losses)}); {self.stop_hint}")
            for k, v in losses.items():
                logs.setdefault(k, []).append(v)
            if self.progress_bar:
                units.set_postfix({k: f"{v:.3f}" for k, v in list(losses.items())[:3]})
            judged = evaluate(u, losses) if evaluate is not None else Evaluated()
            done, stopped = u + 1, judged.stop
            if done % self.record_every == 0 or done == self.total or stopped:
                record = {self.unit: done, "seconds": round(time.time() - t0, 1),
                          **{k: round(float(np.mean(v)), 5) for k, v in logs.items()}, **judged.record}
                records.append(record)
                logs = {}
                on_record(record)
            if done % self.checkpoint_every == 0 and done < self.total and not stopped:
                extra, tensors = state()
                checkpoint.save_state(acc, self.folder / f"{self.prefix}{done}",
                                      {"done": done, "seconds": time.time() - t0, "records": records, **extra},
                                      self.nbytes, f"saving the {self.unit} {done} state", tensors)
            if stopped:
                break
        return Trained(records, done, time.time() - t0, stopped)


def _unpack(loop: dict) -> tuple[int, float, list, dict]:
    """A saved loop state: (units done, seconds, records, the caller's JSON). States written before this loop existed
    still resume: the engine's `progress` mapping, the GAN's and robustify's `step`."""
    loop = dict(loop)
    if "progress" in loop:  # the engine's earlier layout
        progress = loop.pop("progress")
        loop.update(done=progress["epoch"], seconds=progress["seconds"], records=progress["records"],
                    step=progress.get("step", 0), best_epoch=progress.get("best_epoch", 0),
                    best_acc=progress.get("best_acc", -1.0))
    elif "done" not in loop and "step" in loop:  # the GAN's and robustify's earlier layout
        loop["done"] = loop.pop("step")
    done, seconds, records = int(loop.pop("done")), float(loop.pop("seconds")), list(loop.pop("records"))
    return done, seconds, records, loop


def _short(losses: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in list(losses.items())[:4])
