"""The fixed layout of a run folder: runs/<config name>/seed<S>/fold<K>/.

  config.yaml        the resolved config
  inputs.json        what else the run was computed from: the cache's split digests, the folds file's
                     digest, a frozen head's feature store, a pseudo-label round's source
  metrics.jsonl      one line per epoch (rewritten from the saved state on resume)
  state-epoch<N>/    Accelerate state after epoch N (model, optimizer, scheduler, RNG, progress); a
                     rerun after a crash resumes from the newest complete one; removed when done
  model.safetensors  the final weights (backbone + head)
  backbone.json      a fine-tuned foundation model's architecture as built (rebuilt from it without the hub)
  oof.csv            plain-view logits of the held-out center: id, center, label, logit
  summary.json       per-center accuracy and AUC (held-out center out of fold; others in sample, <= 2,000 each)
  tta_heldout.csv    8-view logits of the held-out center (infer stage)
  tta_test.csv       8-view logits of the test center (infer stage)
  tta_*_adabn.csv    the same with batch-norm statistics re-estimated on that center first (infer --adabn)
  predictions.json   per TTA file: the digests of the checkpoint and of the cache it was predicted from
  done               written last by training: the run is complete
Beside the folder, fold<K>.lock is held by the process that trains or predicts with the run.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from .config import load_config
from .lineage import StaleError, changed, digest_file
from .safeio import write_csv, write_json


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

    config = property(lambda self: self.path / "config.yaml")
    inputs = property(lambda self: self.path / "inputs.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoint = property(lambda self: self.path / "model.safetensors")
    backbone_build = property(lambda self: self.path / "backbone.json")
    oof = property(lambda self: self.path / "oof.csv")
    summary = property(lambda self: self.path / "summary.json")
    tta_heldout = property(lambda self: self.tta_path("heldout"))
    tta_test = property(lambda self: self.tta_path("test"))
    done = property(lambda self: self.path / "done")
    predictions = property(lambda self: self.path / "predictions.json")
    lock = property(lambda self: self.path.with_name(f"{self.path.name}.lock"))

    def state_dir(self, epoch: int) -> Path:
        return self.path / f"state-epoch{epoch}"

    def last_state(self) -> Path | None:
        """The newest complete saved state (a state being written when the process died has no marker)."""
        states = [p for p in self.path.glob("state-epoch*") if (p / "complete").exists()]
        return max(states, key=lambda p: int(p.name.removeprefix("state-epoch")), default=None)

    def tta_path(self, part: str, adabn: bool = False) -> Path:
        """8-view logits of `part` ('heldout' | 'test'), plain or after AdaBN on that center."""
        return self.path / f"tta_{part}{'_adabn' if adabn else ''}.csv"

    def recorded_inputs(self) -> dict:
        """inputs.json as written by training ({} before the run has one)."""
        return _record(self.inputs)

    def prediction_lineage(self, cache_id: str) -> dict:
        """What a TTA file of this run must have been predicted from now: this checkpoint, this cache."""
        return {"checkpoint": digest_file(self.checkpoint), "cache": cache_id}

    def write_tta(self, part: str, adabn: bool, table, cache_id: str) -> None:
        """Write a TTA table and note in predictions.json what it was predicted from (checkpoint, cache)."""
        path = self.tta_path(part, adabn)
        write_csv(path, table, float_format="%.6g")
        recorded = _record(self.predictions)
        recorded[path.name] = self.prediction_lineage(cache_id)
        write_json(self.predictions, recorded)

    def stale_predictions(self, cache_id: str, adabn: bool = False) -> list[str]:
        """The TTA files (heldout, test) that are missing or were predicted from another checkpoint or cache."""
        recorded = _record(self.predictions)
        want = self.prediction_lineage(cache_id)
        return [p.name for p in (self.tta_path(part, adabn) for part in ("heldout", "test"))
                if not p.exists() or recorded.get(p.name) != want]

    def tta_fresh(self, cache_id: str, adabn: bool = False) -> bool:
        return not self.stale_predictions(cache_id, adabn)

    def check_inputs(self, cache_digests: dict) -> None:
        """Refuse (StaleError) a run trained on another version of the cache."""
        moved = changed(self.recorded_inputs().get("cache", {}), cache_digests)
        if moved:
            raise StaleError(f"{self.path} was trained on another version of {', '.join(f'{s}.h5' for s in moved)}: "
                             "retrain it (train --force) or restore the files it was trained on")

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


def load_run_model(run: RunDir):
    """The run's resolved config and its model with the trained weights (no download, no pretrained load)."""
    from .models.backbone import PatchClassifier

    cfg = load_config(run.config)
    if cfg.model.frozen:
        raise ValueError(f"{run.path} holds a head on cached features, not an image model")
    build = json.loads(run.backbone_build.read_text()) if run.backbone_build.exists() else None
    model = PatchClassifier(cfg.model, load_weights=False, build=build)
    try:
        weights = load_file(str(run.checkpoint))
    except Exception as e:  # safetensors raises its own error type, without the path
        raise StaleError(f"{run.checkpoint}: cannot be read as safetensors ({e}); retrain the run (train --force)") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise StaleError(f"{run.checkpoint}: does not fit the model of {run.config} ({first}); "
                         "retrain the run (train --force)") from None
    return cfg, model
