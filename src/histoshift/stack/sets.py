"""A prediction set and a stack candidate's label as typed values, rendered to text only for file names and tables.

  PredictionSet  which TTA logits: plain (8 dihedral views), adapted (`infer --adapt`: AdaBN, a head's feature
                 shift or self-training, re-done on each center), both (plain and adapted side by side, one set),
                 or a Fourier transfer set (`infer --fourier`: its beta; the stack's: also the first `donors`
                 views). A run folder's files are named from it (predictions.py); the stack compares them.
  Label          one candidate of the stack: a combiner on a prediction set, thresholded to the known positive
                 share or not (`prior`).

    Label("mean", PredictionSet.fourier(0.03, 3), prior=True)  renders  "mean+fourier-b0.03-n3@prior"

The text is never read back: the stack's decision record (stack.folder) keeps the typed record (`Label.record`,
`Label.from_record`), and every module asks the fields. (Before 2026-12-07 a label was the text itself, "+adabn"
for any adaptation: decision records of that form are refused with one line; the run folders' `tta_*_adabn.csv`
files still read, predictions.py.)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import ClassVar

METHODS = ("mean", "rank", "stack")  # the combiners (stack/combine.py), in the order ties go
KINDS = ("plain", "adapted", "both", "fourier")  # the kinds of prediction set, in the order ties go
_SUFFIX = {"plain": "", "adapted": "+adapt", "both": "+both"}


@dataclass(frozen=True)
class PredictionSet:
    kind: str = "plain"
    beta: float | None = None  # Fourier transfer: the disc radius (a share of the patch side; stain/fourier.py)
    donors: int | None = None  # Fourier transfer: the first this many donor views (None: every view predicted)

    def __post_init__(self):
        fourier = self.kind == "fourier"
        if (self.kind not in KINDS or fourier != (self.beta is not None)
                or (not fourier and self.donors is not None)
                or (fourier and (self.beta < 0 or (self.donors is not None and self.donors < 1)))):
            raise ValueError(f"not a prediction set: kind {self.kind!r}, beta {self.beta}, donors {self.donors}")

    @classmethod
    def fourier(cls, beta: float, donors: int | None = None) -> "PredictionSet":
        return cls("fourier", float(beta), None if donors is None else int(donors))

    @property
    def adapted(self) -> bool:
        """Adapted predictions are in it (alone or beside the plain ones)."""
        return self.kind in ("adapted", "both")

    @property
    def files(self) -> "PredictionSet":
        """The set whose TTA files it reads (a Fourier set's every view); `both` reads two sets: refused."""
        if self.kind == "both":
            raise ValueError("the joined set (plain and adapted) has no files of its own")
        return replace(self, donors=None)

    @property
    def suffix(self) -> str:
        """Rendered for tables and labels: '', '+adapt', '+both', '+fourier-b0.03-n3' (n: the donors used)."""
        if self.kind != "fourier":
            return _SUFFIX[self.kind]
        return f"+fourier-b{self.beta:g}" + (f"-n{self.donors}" if self.donors is not None else "")

    @property
    def name(self) -> str:
        """In words for messages: 'plain', 'adapt', 'both', 'fourier-b0.03-n3'."""
        return self.suffix.lstrip("+") or "plain"

    def order(self) -> tuple:
        """How ties go: plain, adapted, both, Fourier by beta and donors."""
        return KINDS.index(self.kind), self.beta or 0.0, self.donors or 0


PLAIN, ADAPTED, BOTH = PredictionSet(), PredictionSet("adapted"), PredictionSet("both")


@dataclass(frozen=True)
class Label:
    combiner: str
    pset: PredictionSet = PLAIN
    prior: bool = False  # thresholded so that the known share of patches is predicted positive (prior matching)

    PRIOR: ClassVar[str] = "@prior"

    def __post_init__(self):
        if self.combiner not in METHODS:
            raise ValueError(f"not a combiner: {self.combiner!r} (one of {', '.join(METHODS)})")

    def __str__(self) -> str:
        return self.combiner + self.pset.suffix + (self.PRIOR if self.prior else "")

    def matched(self) -> "Label":
        """The same combiner and set, thresholded to the known positive share."""
        return replace(self, prior=True)

    def record(self) -> dict:
        """As the decision record keeps it (dataclasses.asdict's form): combiner, pset (kind, beta, donors), prior."""
        return asdict(self)

    @classmethod
    def from_record(cls, data: dict) -> "Label":
        """From `record()`'s dict; ValueError, TypeError or KeyError on anything else."""
        if not isinstance(data, dict) or not isinstance(data.get("pset"), dict) or not isinstance(data["prior"], bool):
            raise ValueError(f"not a label record: {data!r}")
        return cls(data["combiner"], PredictionSet(**data["pset"]), data["prior"])
