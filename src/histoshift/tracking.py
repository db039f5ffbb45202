"""Experiment trackers through Accelerate (`train.log_with`, `stack --log-with`; LOG_WITH= for the scripts).

Accelerate has TensorBoard, Weights & Biases, MLflow, Comet, Aim, ClearML, DVCLive, SwanLab and trackio built
in; this module only says where their files go and what is logged, so the run folder stays the record:
  train   the resolved config as hyperparameters, every epoch's metrics (step = epoch), the final per-center
          accuracy, AUC, Brier score and ECE (step = the last epoch); files in the run's tracker/ folder
  stack   every combiner's leave-one-center-out accuracy and calibration per held-out center, and the pick;
          files in work/stack/tracker/
Local files live inside the folders the lineage and --force rules cover (a run moved aside takes its curves
along). Hosted trackers are configured as their own documentation says (API keys, servers); W&B writes its
local copy into the tracker folder; MLflow, unless MLFLOW_TRACKING_URI is set, into work/mlruns/.
Each tracker's package must be installed (tensorboard: the `[track]` extra, in requirements.txt).
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

TRACKER_DIR = "tracker"


def accelerator_kwargs(names: list[str], folder: Path) -> dict:
    """Arguments for `Accelerator(...)`: the trackers and the folder their local files go to."""
    if not names:
        return {}
    _check_installed(names)
    return {"log_with": list(names), "project_dir": str(Path(folder) / TRACKER_DIR)}


def _check_installed(names: list[str]) -> None:
    import importlib.util

    from .config import ConfigError

    package = {"tensorboard": "tensorboard", "comet_ml": "comet_ml"}
    missing = [n for n in names if importlib.util.find_spec(package.get(n, n)) is None]
    if missing:
        extra = " (pip install -e '.[track]')" if missing == ["tensorboard"] else ""
        raise ConfigError(f"log_with: the tracker package {', '.join(missing)} is not installed{extra}; "
                          "install it or leave it out")


def start(accelerator, names: list[str], project: str, config: dict, root: Path) -> None:
    """Start the trackers of an Accelerator made with `accelerator_kwargs` (nothing when there are none)."""
    if not names:
        return
    if "mlflow" in names and "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ["MLFLOW_TRACKING_URI"] = (Path(root).resolve() / "work" / "mlruns").as_uri()
    init = {"wandb": {"dir": accelerator.project_dir, "name": project}} if "wandb" in names else {}
    accelerator.init_trackers(project.replace("/", "-"), config=config, init_kwargs=init)


def finish(accelerator) -> None:
    """Close the trackers (their files complete). Not `Accelerator.end_training`: that also destroys the
    process group, and under `accelerate launch` the next fold of the same process still needs it."""
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            tracker.finish()


def numbers(record: dict, prefix: str = "") -> dict:
    """The numeric values of a record (what a scalar tracker takes), keys prefixed."""
    return {f"{prefix}{k}": float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def per_center_values(table: pd.DataFrame, prefix: str = "final/") -> dict:
    """A per-center metrics table (metrics.per_center) as `final/center<c>/<metric>` scalars."""
    out = {}
    for row in table.to_dict(orient="records"):
        out |= numbers({k: v for k, v in row.items() if k not in ("center", "held_out")},
                       f"{prefix}center{int(row['center'])}/")
    return out


def log_stack(stack_dir: Path, choice, names: list[str], root: Path) -> None:
    """The stack stage's comparison table and choice (a stack.folder.StackChoice) to the trackers (files in
    work/stack/tracker/)."""
    if not names:
        return
    from accelerate import Accelerator

    stack_dir = Path(stack_dir)
    table = pd.read_csv(stack_dir / "comparison.csv")
    acc = Accelerator(**accelerator_kwargs(names, stack_dir))
    config = {"method": choice.method, "members": len(choice.members), "cache": str(choice.cache_id or "")}
    start(acc, names, "stack", config, root)
    values = {}
    for row in table.to_dict(orient="records"):
        method = row.get("method", "")
        center = row.get("held_out_center", row.get("center", ""))
        values |= numbers({k: v for k, v in row.items() if k not in ("method", "held_out_center", "center")},
                          f"{method}/center{center}/")
    values |= numbers(choice.loco_accuracy, "loco_accuracy/")
    acc.log(values, step=0)
    acc.log({"picked": choice.method}, step=0)
    finish(acc)
