"""A run's prediction files: the TTA logits the infer stage writes into a run folder (runs.py's layout) and
predictions.json, which records what each was predicted from, so that a stale file is predicted again and never
read in silence.

  tta_heldout.csv, tta_test.csv          8-view logits of the held-out and the test center (plain)
  tta_*_adabn.csv                        adapted to that center first (the file name is the first adaptation's)
  tta_*_<name>.csv                       a named prediction set, e.g. fourier-b0.05 (its settings recorded)
  predictions.json                       per file: the checkpoint's and the cache's digests (and a named set's
                                         settings); for adapted files how many layers changed and what else the
                                         adaptation recorded (in words: stack.folder.adaptation_text)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .lineage import digest_file
from .safeio import write_csv, write_json

SET_NAME = re.compile(r"[a-z][a-z0-9.-]*")  # a named prediction set becomes part of a file name


def set_suffix(adapted: bool | str) -> str:
    """The file-name suffix of a prediction set: plain '', adapted '_adabn', a named set '_<name>'."""
    if isinstance(adapted, bool):
        return "_adabn" if adapted else ""
    if not SET_NAME.fullmatch(adapted) or adapted in ("adabn",):
        raise ValueError(f"not a prediction set name: {adapted!r}")
    return f"_{adapted}"


def _record(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


class RunPredictions:
    """The TTA files of one run (`run.tta`) and their record."""

    def __init__(self, run):
        self.run = run  # a runs.RunDir (its folder, checkpoint and predictions.json; not imported: runs imports this)

    heldout = property(lambda self: self.path("heldout"))
    test = property(lambda self: self.path("test"))

    def path(self, part: str, adapted: bool | str = False) -> Path:
        """TTA logits of `part` ('heldout' | 'test'): plain (False), adapted to that center first (True; named
        after the first adaptation, AdaBN), or another prediction set by name (e.g. 'fourier-b0.05')."""
        return self.run.path / f"tta_{part}{set_suffix(adapted)}.csv"

    def lineage(self, cache_id: str, settings: dict | None = None) -> dict:
        """What a TTA file of this run must have been predicted from now: this checkpoint, this cache (and, for a
        set made with settings of its own, e.g. Fourier transfer's donors, those settings)."""
        return {
            "checkpoint": digest_file(self.run.checkpoint),
            "cache": cache_id,
            **({"settings": settings} if settings else {}),
        }

    def write(self, part: str, adapted: bool | str, table, cache_id: str, adaptation: dict | None = None,
              settings: dict | None = None) -> None:
        """Write a TTA table and note in predictions.json what it was predicted from (checkpoint, cache, the set's
        settings) and, for adapted predictions, how many layers the adaptation changed and what else it recorded
        (self-training: its confidence threshold and pseudo-label counts)."""
        path = self.path(part, adapted)
        write_csv(path, table, float_format="%.6g")
        recorded = _record(self.run.predictions)
        recorded[path.name] = self.lineage(cache_id, settings)
        if adaptation is not None:
            recorded[f"{path.name}:adapted"] = adaptation["changed"]
            if len(adaptation) > 1:
                recorded[f"{path.name}:adaptation"] = {k: v for k, v in adaptation.items() if k != "changed"}
        write_json(self.run.predictions, recorded)

    def adapted_layers(self) -> int:
        """Layers the adapted TTA files changed (0: they equal the plain ones); recorded by infer --adapt."""
        recorded = _record(self.run.predictions)
        return sum(recorded.get(f"{self.path(part, True).name}:adapted", 1) for part in ("heldout", "test"))

    def adaptation(self, part: str = "test") -> dict | None:
        """What the adapted TTA file of `part` was adapted by (method; self-training: threshold, pseudo-labels)."""
        return _record(self.run.predictions).get(f"{self.path(part, True).name}:adaptation")

    def stale(self, cache_id: str, adapted: bool | str = False, settings: dict | None = None) -> list[str]:
        """The TTA files (heldout, test) that are missing or were predicted from another checkpoint, cache or
        settings."""
        recorded = _record(self.run.predictions)
        want = self.lineage(cache_id, settings)
        return [p.name for p in (self.path(part, adapted) for part in ("heldout", "test"))
                if not p.exists() or recorded.get(p.name) != want]

    def fresh(self, cache_id: str, adapted: bool | str = False, settings: dict | None = None) -> bool:
        return not self.stale(cache_id, adapted, settings)

    def named_sets(self, prefix: str, part: str = "test") -> set[str]:
        """The named prediction sets (e.g. 'fourier-b0.05') starting with `prefix` that have a file of `part`."""
        head = self.path(part).stem + "_"
        return {p.stem.removeprefix(head) for p in self.run.path.glob(f"{head}{prefix}*.csv")}

    def recorded_settings(self, name: str, part: str = "test") -> dict | None:
        """The settings a named prediction set's file was predicted with (None: not predicted)."""
        return (_record(self.run.predictions).get(self.path(part, name).name) or {}).get("settings")
