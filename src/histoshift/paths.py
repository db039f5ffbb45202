"""The layout of a root folder, in one place: every stage finds its inputs and outputs here.

  input/          yours (the competition's HDF5 files); never written
  folds/          folds.csv
  work/cache/     the validated uint8 cache (prepare)
  work/features/  feature stores (heads on features), one folder per key (embed)
  work/stain_gan/ stain-normalising generators (aug.stain_norm: gan), one folder per key (stain-gan)
  work/robust/    backbones tuned for stain robustness (model.robustify), one folder per key (robustify)
  work/runs/      one folder per config, seed and fold (train, infer)
  work/stack/     the combiner comparison, the choice and the test scores (stack)
  work/report/    report.md and plots (report)
  submissions/    submission.csv and the earlier ones (submit)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path

    input = property(lambda self: self.root / "input")
    folds_csv = property(lambda self: self.root / "folds" / "folds.csv")
    cache = property(lambda self: self.root / "work" / "cache")
    features = property(lambda self: self.root / "work" / "features")
    stain_gan = property(lambda self: self.root / "work" / "stain_gan")
    robust = property(lambda self: self.root / "work" / "robust")
    runs = property(lambda self: self.root / "work" / "runs")
    stack = property(lambda self: self.root / "work" / "stack")
    report = property(lambda self: self.root / "work" / "report")
    submissions = property(lambda self: self.root / "submissions")

    @classmethod
    def of_cache(cls, cache_dir: Path) -> "Paths":
        """The root a cache folder belongs to (work/cache -> the root)."""
        return cls(Path(cache_dir).parent.parent)
