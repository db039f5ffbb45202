"""A run's prediction files: the TTA logits the infer stage writes into a run folder (runs.py's layout) and
predictions.json, which records what each was predicted from, so that a stale file is predicted again and never
read in silence.

  tta_heldout.csv, tta_test.csv          8-view logits of the held-out and the test center (plain)
  tta_*_adapted.csv                      adapted to that center first (AdaBN, a feature shift, self-training);
                                         folders predicted before 2026-12-07 have tta_*_adabn.csv: still read
  tta_*_fourier-b<beta>.csv              a Fourier transfer set (its settings recorded, beta among them)
  predictions.json                       per file: the checkpoint's and the cache's digests (and a named set's
                                         settings); for adapted files how many layers changed and what else the
                                         adaptation recorded (in words: stack.folder.adaptation_text)
"""
from __future__ import annotations

import json
from pathlib import Path

from .lineage import digest_file
from .safeio import write_csv, write_json
from .stack.sets import ADAPTED, PLAIN, PredictionSet

PARTS = ("heldout", "test")
LEGACY_ADAPTED = "_adabn"  # the adapted files' name before 2026-12-07 (after the first adaptation, AdaBN)


def set_suffix(pset: PredictionSet) -> str:
    """The file-name suffix of a prediction set's files: plain '', adapted '_adapted', Fourier '_fourier-b<beta>'
    (rendered from the typed set, never parsed back)."""
    files = pset.files
    if files.kind == "fourier":
        return "_" + files.name
    return "_adapted" if files.kind == "adapted" else ""


def _record(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


class RunPredictions:
    """The TTA files of one run (`run.tta`) and their record."""

    def __init__(self, run):
        self.run = run  # a runs.RunDir (its folder, checkpoint and predictions.json; not imported: runs imports this)

    heldout = property(lambda self: self.path("heldout"))
    test = property(lambda self: self.path("test"))

    def path(self, part: str, pset: PredictionSet = PLAIN) -> Path:
        """TTA logits of `part` ('heldout' | 'test') in the prediction set `pset` (stack.sets): plain, adapted to
        that center first, or a Fourier set. Adapted files of a folder predicted before they were renamed
        (tta_*_adabn.csv) are read where no new one exists."""
        path, legacy = self._files(part, pset)
        return legacy if legacy is not None and not path.exists() and legacy.exists() else path

    def _files(self, part: str, pset: PredictionSet) -> tuple[Path, Path | None]:
        """The file of `part` in `pset` as written now, and, for the adapted set, its name before 2026-12-07."""
        legacy = self.run.path / f"tta_{part}{LEGACY_ADAPTED}.csv" if pset.files.kind == "adapted" else None
        return self.run.path / f"tta_{part}{set_suffix(pset)}.csv", legacy

    def lineage(self, cache_id: str, settings: dict | None = None) -> dict:
        """What a TTA file of this run must have been predicted from now: this checkpoint, this cache (and, for a
        set made with settings of its own, e.g. Fourier transfer's donors, those settings)."""
        return {
            "checkpoint": digest_file(self.run.checkpoint),
            "cache": cache_id,
            **({"settings": settings} if settings else {}),
        }

    def write(self, part: str, pset: PredictionSet, table, cache_id: str, adaptation: dict | None = None,
              settings: dict | None = None) -> None:
        """Write a TTA table and note in predictions.json what it was predicted from (checkpoint, cache, the set's
        settings) and, for adapted predictions, how many layers the adaptation changed and what else it recorded
        (self-training: its confidence threshold and pseudo-label counts). A legacy adapted file of `part` is
        replaced (removed with its record) by the new one."""
        path, legacy = self._files(part, pset)
        write_csv(path, table, float_format="%.6g")
        recorded = _record(self.run.predictions)
        if legacy is not None and legacy.exists():
            legacy.unlink()
            recorded = {k: v for k, v in recorded.items() if k.partition(":")[0] != legacy.name}
        recorded[path.name] = self.lineage(cache_id, settings)
        if adaptation is not None:
            recorded[f"{path.name}:adapted"] = adaptation["changed"]
            if len(adaptation) > 1:
                recorded[f"{path.name}:adaptation"] = {k: v for k, v in adaptation.items() if k != "changed"}
        write_json(self.run.predictions, recorded)

    def adapted_layers(self) -> int:
        """Layers the adapted TTA files changed (0: they equal the plain ones); recorded by infer --adapt."""
        recorded = _record(self.run.predictions)
        return sum(recorded.get(f"{self.path(part, ADAPTED).name}:adapted", 1) for part in PARTS)

    def adaptation(self, part: str = "test") -> dict | None:
        """What the adapted TTA file of `part` was adapted by (method; self-training: threshold, pseudo-labels)."""
        return _record(self.run.predictions).get(f"{self.path(part, ADAPTED).name}:adaptation")

    def stale(self, cache_id: str, pset: PredictionSet = PLAIN, settings: dict | None = None) -> list[str]:
        """The TTA files (heldout, test) that are missing or were predicted from another checkpoint, cache or
        settings."""
        recorded = _record(self.run.predictions)
        want = self.lineage(cache_id, settings)
        return [p.name for p in (self.path(part, pset) for part in PARTS)
                if not p.exists() or recorded.get(p.name) != want]

    def fresh(self, cache_id: str, pset: PredictionSet = PLAIN, settings: dict | None = None) -> bool:
        return not self.stale(cache_id, pset, settings)

    def fourier_sets(self) -> list[PredictionSet]:
        """The Fourier sets this run has files of (both parts), from the beta its record keeps (never from a file
        name), by beta."""
        recorded = _record(self.run.predictions)
        betas = {v["settings"]["beta"] for k, v in recorded.items()
                 if ":" not in k and isinstance(v, dict) and "beta" in v.get("settings", {})}
        sets = [PredictionSet.fourier(b) for b in sorted(betas)]
        return [s for s in sets if all(self.path(part, s).exists() for part in PARTS)]

    def recorded_settings(self, pset: PredictionSet, part: str = "test") -> dict | None:
        """The settings a prediction set's file was predicted with (None: not predicted, or none recorded)."""
        return (_record(self.run.predictions).get(self.path(part, pset).name) or {}).get("settings")
