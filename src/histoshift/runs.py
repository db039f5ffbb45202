"""The fixed layout of a run folder: runs/<config name>/seed<S>/fold<K>/.

  config.yaml        the resolved config
  inputs.json        what else the run was computed from (a frozen head: its feature store's key)
  metrics.jsonl      one line per epoch (append-only)
  model.safetensors  the final weights (backbone + head)
  backbone.json      a fine-tuned foundation model's architecture as built (rebuilt from it without the hub)
  oof.csv            plain-view logits of the held-out center: id, center, label, logit
  summary.json       per-center accuracy and AUC (held-out center out of fold; others in sample, <= 2,000 each)
  tta_heldout.csv    8-view logits of the held-out center (infer stage)
  tta_test.csv       8-view logits of the test center (infer stage)
  tta_*_adabn.csv    the same with batch-norm statistics re-estimated on that center first (infer --adabn)
  done               written last by training: the run is complete
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from .config import load_config


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

    def tta_path(self, part: str, adabn: bool = False) -> Path:
        """8-view logits of `part` ('heldout' | 'test'), plain or after AdaBN on that center."""
        return self.path / f"tta_{part}{'_adabn' if adabn else ''}.csv"

    def tta_fresh(self, adabn: bool = False) -> bool:
        """Both TTA files exist and are newer than the checkpoint they came from."""
        paths = [self.tta_path(part, adabn) for part in ("heldout", "test")]
        return all(p.exists() and p.stat().st_mtime >= self.checkpoint.stat().st_mtime for p in paths)

    @property
    def is_done(self) -> bool:
        return self.done.exists() and self.checkpoint.exists()


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
    model.load_state_dict(load_file(str(run.checkpoint)))
    return cfg, model
