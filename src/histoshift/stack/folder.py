"""The stack folder's layout and its decision record, beside the run folder's (runs.py).

  work/stack/
    oof_features.csv   per member: mean and spread of the TTA logits of every labelled patch (out of fold)
    test_features.csv  the same for the test center, averaged over each member's fold models
    comparison.csv     every combiner x prediction set x held-out center: accuracy, AUC, Brier, ECE
    test_scores.csv    the chosen combiner's score and 0/1 prediction per test id
    choice.json        the decision (`StackChoice`), written last: scores without it are never submitted

choice.json is written and read here only: every other module gets a typed `StackChoice`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..lineage import StaleError
from ..safeio import write_json
from .sets import Label

CHOICE = "choice.json"
FIRST_ADAPTATION = "AdaBN"  # what adapted predictions were made by before their records named a method


def adaptation_text(record: dict | None, changed: bool = False) -> str:
    """One adaptation record (a task's `adapt`, kept in predictions.json) in words, the one place it is formatted:
    the method (records written before methods were recorded: AdaBN, the only adaptation then), the layers, maps or
    rounds it changed when asked, and self-training's threshold and pseudo-labels."""
    text = record["method"] if record else FIRST_ADAPTATION
    if changed and record:
        text = f"({text}) - {record['changed']} layers/maps/rounds changed"
    if record and "self_training" in record:
        st = record["self_training"]
        text += (f" (confidence >= {st['threshold']}: {st['pseudo_labelled']} pseudo-labelled per round"
                 + (f", positive share {st['positive_share']}" if "positive_share" in st else "") + ")")
    return text


def evidence_line(evidence: dict) -> str:
    paired = evidence.get("paired")  # choices written before the paired interval have the z alone
    diff = f"plain - adapted = {_points(paired)}, " if paired else ""
    return (f"plain '{evidence['plain']}' against adapted '{evidence['adapted']}' on the same out-of-fold patches: "
            f"{diff}McNemar z = {evidence['z_plain_over_adapted']:+.2f}")


def _points(p: dict) -> str:
    """A paired record (paired.Paired.record) in accuracy points with its interval."""
    return (f"{100 * p['diff']:+.1f} points (95% CI {100 * p['lo']:+.1f} to {100 * p['hi']:+.1f}, "
            f"{'decisive' if p['decisive'] else 'not decisive'})")


@dataclass(frozen=True)
class StackChoice:
    members: list[str]  # <config>/seed<S>, the ensemble
    shipped: Label  # what goes to the test center: combiner, prediction set, prior matching (stack.sets)
    ensemble: dict = field(default_factory=dict)  # config -> {"seeds": [...], "folds": [...]}
    loco_accuracy: dict = field(default_factory=dict)  # candidate (as text) -> mean accuracy leave-one-center-out
    loco_calibration: dict = field(default_factory=dict)  # candidate (as text) -> mean Brier and ECE
    rule: str = "loco"  # the choice rule (rules.py); choices written before rules existed used `loco`
    rule_summary: str = ""
    rule_evidence: dict = field(default_factory=dict)  # what the rule measured (paired records, test criteria)
    rule_picks: dict = field(default_factory=dict)  # rule -> the label (as text) it would have picked on the same data
    adapted_vs_plain: dict | None = None  # the paired test between the prediction sets
    fourier_vs_pick: dict | None = None  # the paired test of the best Fourier set against that pick
    adaptations: dict | None = None  # fold run -> how its adapted predictions were made
    prior_matching: dict | None = None  # used only when it raises the LOCO accuracy of the chosen combiner
    test_positive_rate: float = 0.0
    # members whose epoch or averaging window was picked on their held-out center (train.early_stop_patience,
    # train.average=swad): their out-of-fold
    # accuracies, and so this comparison, are optimistic for them
    heldout_selected: list[str] = field(default_factory=list)
    # what the scores were computed from: the cache id, the folds digest, every fold model's checkpoint digest
    lineage: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        """What ships, as text (tables, messages; the key of loco_accuracy): e.g. 'mean+adapt@prior'."""
        return str(self.shipped)

    @property
    def adapted(self) -> bool:
        """Adapted predictions were chosen (alone, or beside the plain ones)."""
        return self.shipped.pset.adapted

    @property
    def cache_id(self) -> str | None:
        return self.lineage.get("cache")

    @property
    def checkpoints(self) -> dict[str, str]:
        return self.lineage.get("checkpoints", {})

    def evidence_line(self) -> str:
        """The paired test between the plain and the adapted prediction sets, in words."""
        return evidence_line(self.adapted_vs_plain) if self.adapted_vs_plain else ""

    def rule_line(self) -> str:
        """Which rule chose, in words, and where the other rules differ."""
        others = {n: p for n, p in self.rule_picks.items() if n != self.rule}
        differ = [f"{n}: {p}" for n, p in others.items() if p != self.rule_picks.get(self.rule)]
        return (f"rule '{self.rule}'" + (f" ({self.rule_summary})" if self.rule_summary else "")
                + (f"; other rules would pick {', '.join(differ)}" if differ else
                   "; every other rule picks the same" if others else ""))

    def fourier_line(self) -> str:
        """The paired test of the best Fourier transfer set against the plain-or-adapted pick, in words."""
        f = self.fourier_vs_pick
        return (f"Fourier transfer '{f['fourier']}' against '{f['against']}' on the same out-of-fold patches: "
                + (f"{_points(f['paired'])}, " if "paired" in f else "")
                + f"McNemar z = {f['z_fourier_over_pick']:+.2f} ({'used' if f['used'] else 'not used'})") if f else ""

    def adaptation_lines(self) -> list[str]:
        """One line per fold model: how its adapted test predictions were made."""
        return [f"{run}: {adaptation_text(rec)}" for run, rec in (self.adaptations or {}).items()]

    def adaptation_methods(self) -> list[str]:
        """The distinct adaptations behind the adapted predictions (AdaBN, a feature shift, self-training...); a
        choice written before adaptations were recorded: AdaBN."""
        records = (self.adaptations or {}).values() or [None]
        return sorted({(rec or {}).get("method", FIRST_ADAPTATION) for rec in records})

    @classmethod
    def from_dict(cls, data: dict, where: Path) -> "StackChoice":
        """From choice.json; a choice of another version (before 2026-12-07 it named what ships as text, "method")
        is refused with one line: the stack stage makes it again in seconds from the run folders."""
        known = {f.name for f in fields(cls)}
        try:
            shipped = Label.from_record(data["shipped"])
            return cls(**{k: v for k, v in data.items() if k in known} | {"shipped": shipped})
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise StaleError(f"{where}: not a choice of this version ({type(e).__name__}: {e}); run the stack stage "
                             "again") from None


@dataclass(frozen=True)
class StackDir:
    path: Path

    oof_features = property(lambda self: self.path / "oof_features.csv")
    test_features = property(lambda self: self.path / "test_features.csv")
    comparison = property(lambda self: self.path / "comparison.csv")
    test_scores = property(lambda self: self.path / "test_scores.csv")
    choice_file = property(lambda self: self.path / CHOICE)
    lock = property(lambda self: self.path.with_name(f".{self.path.name}.lock"))

    def choice(self) -> StackChoice | None:
        """The decision of the last complete stack (None: none)."""
        if not self.choice_file.exists():
            return None
        try:
            data = json.loads(self.choice_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StaleError(f"{self.choice_file}: not valid JSON ({e}); run the stack stage again") from None
        return StackChoice.from_dict(data, self.choice_file)

    def require_choice(self, what: str) -> StackChoice:
        choice = self.choice()
        if choice is None:
            raise StaleError(f"{self.choice_file}: missing (the stack stage writes it last); {what}")
        return choice

    def clear_choice(self) -> None:
        """Before new scores are written: scores without a choice are never submitted."""
        self.choice_file.unlink(missing_ok=True)

    def write_choice(self, choice: StackChoice) -> None:
        write_json(self.choice_file, asdict(choice))

    def require_current(self, cache_id: str, checkpoints: dict[str, str] | None, before: str) -> StackChoice:
        """The choice, refused (one line) when it was made from another cache or from checkpoints that are not the
        current ones (`checkpoints`: fold run -> digest of its checkpoint now, a run removed is missing; None:
        the cache only)."""
        choice = self.require_choice("run the stack stage")
        if choice.cache_id != cache_id:
            raise StaleError(f"{self.choice_file}: computed from another cache ({choice.cache_id}, now {cache_id}); "
                             f"rerun infer and stack {before}")
        moved = [] if checkpoints is None else [n for n, d in choice.checkpoints.items() if checkpoints.get(n) != d]
        if moved:
            raise StaleError(f"{self.choice_file}: made from {moved[0]}'s previous checkpoint"
                             f"{' (and others)' if len(moved) > 1 else ''} (retrained or removed since); rerun infer "
                             f"and stack {before}")
        return choice

    def cache_id(self) -> str | None:
        """The cache id the stack's outputs were computed from (None: no complete stack)."""
        choice = self.choice()
        return choice.cache_id if choice else None
