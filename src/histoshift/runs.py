"""The fixed layout of a run folder: runs/<config name>/seed<S>/fold<K>/.

  config.yaml        the resolved config
  inputs.json        the task kind ("image" | "feature", tasks.py) and what else the run was computed
                     from: the cache's split digests, the folds file's digest, a head's feature store,
                     a pseudo-label round's source
  metrics.jsonl      one line per epoch (rewritten from the saved state on resume)
  state-epoch<N>/    Accelerate state after epoch N (model, optimizer, scheduler, RNG, progress); a
                     rerun after a crash resumes from the newest complete one; removed when done
  model.safetensors  the final weights (backbone + head)
  backbone.json      a fine-tuned foundation model's architecture as built (rebuilt from it without the hub)
  oof.csv            plain-view logits of the held-out center: id, center, label, logit
  summary.json       per-center accuracy and AUC (held-out center out of fold; others in sample, <= 2,000 each)
  tta_*.csv          the infer stage's TTA logits, predictions.json what each was predicted from: predictions.py
                     (`run.tta`)
  done               written last by training: the run is complete
Beside the folder, fold<K>.lock is held by the process that trains or predicts with the run.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .checkpoint import EPOCH_STATES, last_state
from .config import Config, load_config
from .lineage import StaleError, changed

INPUT_NAMES = {
    "cache.train": "the cached train.h5",
    "cache.val": "the cached val.h5",
    "cache.test": "the cached test.h5",
    "folds": "folds.csv",
    "features": "the feature store (new weights, views or cache)",
    "stain_gan": "the stain GAN's generator (trained again)",
    "features_content": "the stored features (embedded again since)",
    **{f"features_content.{s}": f"the stored {s} features (embedded again since)" for s in ("train", "val", "test")},
    "pseudo": "the stack's test predictions it took pseudo-labels from",
    "task": "the kind of model",
}


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def of(cls, runs_root: Path, name: str, seed: int, fold: int) -> "RunDir":
        return cls(Path(runs_root) / name / f"seed{seed}" / f"fold{fold}")

    @property
    def name(self) -> str:
        return f"{self.path.parent.parent.name}/{self.path.parent.name}/{self.path.name}"

    @property
    def model_name(self) -> str:
        """The ensemble member this run belongs to: config name and seed (its folds share it)."""
        return f"{self.path.parent.parent.name}/{self.path.parent.name}"

    @property
    def fold(self) -> int:
        return int(self.path.name.removeprefix("fold"))

    @property
    def config_name(self) -> str:
        return self.path.parent.parent.name

    @property
    def seed(self) -> int:
        return int(self.path.parent.name.removeprefix("seed"))

    config = property(lambda self: self.path / "config.yaml")
    inputs = property(lambda self: self.path / "inputs.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoint = property(lambda self: self.path / "model.safetensors")
    backbone_build = property(lambda self: self.path / "backbone.json")
    oof = property(lambda self: self.path / "oof.csv")
    summary = property(lambda self: self.path / "summary.json")
    done = property(lambda self: self.path / "done")
    predictions = property(lambda self: self.path / "predictions.json")
    lock = property(lambda self: self.path.with_name(f"{self.path.name}.lock"))

    @cached_property
    def cfg(self) -> Config:
        """The run's resolved config, read once."""
        return load_config(self.config)

    @property
    def kind(self) -> str:
        """The task kind the run was trained as (tasks.TASKS)."""
        kind = self.recorded_inputs().get("task")
        if kind is None:
            raise StaleError(
                f"{self.inputs}: records no task kind (a run of an older version); retrain it (train --force)"
            )
        return kind

    def last_state(self) -> Path | None:
        """The newest complete saved state (a state being written when the process died has no marker)."""
        return last_state(self.path, EPOCH_STATES)

    def recorded_inputs(self) -> dict:
        """inputs.json as written by training ({} before the run has one)."""
        return _record(self.inputs)

    @cached_property
    def tta(self) -> "RunPredictions":
        """The run's TTA prediction files and what each was predicted from (predictions.py)."""
        from .predictions import RunPredictions

        return RunPredictions(self)

    def check_inputs(self, cache_digests: dict) -> None:
        """Refuse (StaleError) a run trained on another version of the cache."""
        moved = changed(self.recorded_inputs().get("cache", {}), cache_digests)
        if moved:
            raise StaleError(f"{self.path} was trained on another version of {', '.join(f'{s}.h5' for s in moved)}: "
                             "retrain it (train --force) or restore the files it was trained on")

    def check_lineage(self, task_inputs: dict) -> None:
        """Refuse a run whose task data (a head's feature store) are not the ones it was trained on."""
        recorded = self.recorded_inputs()
        moved = changed({k: recorded.get(k) for k in task_inputs}, task_inputs)
        if moved:
            raise StaleError(f"{self.path}: {' and '.join(INPUT_NAMES.get(k, k) for k in moved)} changed since the run "
                             "was trained; retrain it (train --force)")

    @property
    def is_done(self) -> bool:
        return self.done.exists() and self.checkpoint.exists()


def _record(path: Path) -> dict:
    """A JSON record of a run folder; {} when it is not written yet."""
    return json.loads(path.read_text()) if path.exists() else {}


RUN_FOLDER = re.compile(r"seed\d+/fold\d+")


def find_runs(runs_root: Path) -> list[RunDir]:
    """Every finished run under runs_root, sorted by path; folders moved aside by `train --force`
    (fold1.old-<stamp>) are not runs."""
    done = Path(runs_root).glob("*/seed*/fold*/done")
    runs = (RunDir(p.parent) for p in done if RUN_FOLDER.fullmatch(f"{p.parent.parent.name}/{p.parent.name}"))
    return sorted(runs, key=lambda r: str(r.path))
