"""What a complete store's check finds, part by part, and what is embedded again: damage costs what is damaged.

A truncated or garbled split file costs that split; chunks that fail their checksums cost those chunks; a damaged
meta.json costs only itself (the chunks are verified and kept); hub weights that changed under the same revision
cost every chunk. What is not damage stops with one line and deletes nothing: the system refusing a read
(permissions, EIO, too many open files) and configuration errors. The check reads a split in full only when the
verification record (verified.py) cannot show, by a stat, that it was found whole before.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..data.cache import SPLITS
from ..verified import Record
from .store import FeatureStore, StoreDamage


@dataclass
class Repair:
    """What a store's check found, and what is embedded again: split files (their chunks with them), chunk
    markers, and meta.json (written last, so always written again)."""
    reasons: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)

    def apply(self, path: Path, say) -> None:
        what = (
            [f"the {s} split's file" for s in self.splits]
            + (
                [
                    f"{len(self.markers)} chunk(s) "
                    f"({', '.join(self.markers[:3])}{' ...' if len(self.markers) > 3 else ''})"
                ]
                if self.markers
                else []
            )
            + ["meta.json"]
        )
        say(f"embed: {path.name}: {'; '.join(self.reasons)}; embedding again {', '.join(what)} (the rest is kept; "
            "nothing stale is trained on)")
        (path / "meta.json").unlink(missing_ok=True)
        for split in self.splits:
            (path / f"features_{split}.npy").unlink(missing_ok=True)
            for marker in (path / "progress").glob(f"{split}-*"):
                marker.unlink()
        for name in self.markers:
            (path / "progress" / name).unlink(missing_ok=True)
        (path / "progress").mkdir(exist_ok=True)


def diagnose(store: FeatureStore, cfg: Config, record: Record) -> Repair | None:
    """Why a complete store cannot be used as it is, part by part: meta.json damaged; hub weight files that changed
    in the cache since it was embedded (every chunk); a split's file unreadable as the store's array (that split);
    chunks that fail their checksum (those chunks). None: whole. Configuration errors and the system refusing a
    read propagate (one line; nothing deleted)."""
    repair = Repair()
    try:
        store.meta
    except StoreDamage as e:
        repair.reasons.append(str(e))
    else:
        moved = hub_changes(store, cfg, record)
        if moved:
            repair.reasons.append(f"{', '.join(moved)} changed in the Hugging Face cache since the store was "
                                  "embedded (same revision)")
            repair.markers = [m.name for m in store.markers()]
            return repair
    for split in SPLITS:
        try:
            store.array(split)
        except StoreDamage as e:
            repair.reasons.append(str(e))
            repair.splits.append(split)
    bad = store.bad_chunks(record, [s for s in SPLITS if s not in repair.splits])
    if bad:
        repair.reasons.append(f"chunk(s) {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} do not match their "
                              "checksums")
        repair.markers = bad
    return repair if repair.reasons else None


def hub_changes(store: FeatureStore, cfg: Config, record: Record) -> list[str]:
    """The hub snapshot files (weights, configs) that are not the ones the store was embedded from: another blob,
    size or config text. A blob that may have changed (a stat differs from when it was last verified) is checked
    against its content hash, once (verified.py); its times alone never re-embed it (a copied cache is reused)."""
    recorded = store.meta.get("weights_files")
    if recorded is None:
        return []
    from ..models.foundation import resolve_recipe
    from ..models.foundation.hub import check_blob, same_file, snapshot_files

    recipe = resolve_recipe(cfg.model.recipe, cfg.model.recipe_overrides)
    now = snapshot_files(recipe, record)
    moved = [name for name, entry in recorded.items() if not same_file(entry, now.get(name))]
    if not moved:
        for name in recorded:
            check_blob(recipe, name, record)
    return moved
