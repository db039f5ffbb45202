"""Resumable training states, written and read without unpickling anything.

A state is a folder `<prefix><N>/` beside the work it belongs to (a run's `state-epoch<N>/`, a stain GAN's
`state-step<N>/`): Accelerate writes the prepared models (safetensors), the optimizers and the RNG states,
which its `load_state` reads with torch's weights_only loader; the loop's own position goes to `loop.json`;
extra tensors (e.g. early stopping's best weights) go to safetensors files; `complete` is written last, and
older states of the same prefix are removed after. Nothing is registered as an Accelerate custom object:
those are read back with weights_only=False (accelerate's checkpointing.load_custom_state), and a state folder
is input - a pickle planted in an unfinished run's state would run its code on the next resume.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .lineage import StaleError
from .safeio import atomic, require_free, write_json, write_text

LOOP_STATE = "loop.json"  # the loop's own state in a saved state folder: JSON, never a pickle
COMPLETE = "complete"
EPOCH_STATES = "state-epoch"  # a training run's states (runs.RunDir), one per epoch
STEP_STATES = "state-step"  # the stain GAN's and robustify's states, every checkpoint_every steps


@contextmanager
def exclusive_folder(accelerator, folder: Path, marker: str, force: bool, what: str, stage: str):
    """A trained artefact's folder, worked on by one process at a time (the main process holds the lock for all
    under `accelerate launch`; it dies with its holder); with `force`, a finished one (its `marker` file exists) is
    moved aside first, never deleted."""
    from .safeio import Lock

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    main = accelerator.is_main_process
    with Lock(folder.parent / f".{folder.name}.lock", f"{what} {folder}") if main else nullcontext():
        if force and (folder / marker).exists() and main:
            aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(aside)
            print(f"{stage}: moved the previous {what} to {aside}")
        accelerator.wait_for_everyone()
        folder.mkdir(exist_ok=True)
        yield folder


def last_state(parent: Path, prefix: str) -> Path | None:
    """The newest complete state `parent/<prefix><N>` (one being written when the process died has no marker)."""
    states = [p for p in Path(parent).glob(f"{prefix}*") if (p / COMPLETE).exists() and p.name[len(prefix):].isdigit()]
    return max(states, key=lambda p: int(p.name[len(prefix):]), default=None)


def clear_states(parent: Path, prefix: str) -> None:
    """Every saved state `parent/<prefix>*` removed: the work they resume is finished and its result written."""
    for old in Path(parent).glob(f"{prefix}*"):
        shutil.rmtree(old, ignore_errors=True)


def save_state(
    accelerator, folder: Path, loop: dict, nbytes: int, what: str, tensors: dict[str, dict] | None = None
) -> None:
    """Everything needed to resume, in `folder` (named <prefix><N>); `tensors`: file name -> a flat dict of
    tensors saved beside it as safetensors. `nbytes`: the free space to ask for first (`what` names it). Written
    into a new hidden folder (mkdtemp: exclusive, a random name) and renamed into place when complete: no window
    in which a link planted at `folder` could be written through, and no half-written folder under its name."""
    from accelerate.utils import broadcast_object_list
    from safetensors.torch import save_file

    folder = Path(folder)
    prefix = folder.name.rstrip("0123456789")
    tmp = [None]
    if accelerator.is_main_process:
        require_free(folder.parent, nbytes, what)
        for left in folder.parent.glob(f".{prefix}*.tmp"):  # a save a crash interrupted
            shutil.rmtree(left, ignore_errors=True)
        tmp = [tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp")]  # new, never a link
    tmp = Path(broadcast_object_list(tmp)[0])
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / LOOP_STATE, loop)
        for name, flat in (tensors or {}).items():
            with atomic(tmp / name) as part:
                save_file(flat, str(part))
        write_text(tmp / COMPLETE, time.strftime("%Y-%m-%d %H:%M:%S\n"))
        if folder.is_symlink():  # rmtree refuses a link; the rename below never follows one
            folder.unlink()
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished save of the same epoch
        os.rename(tmp, folder)  # a directory onto a name: fails (ENOTDIR, ENOTEMPTY) if a link was planted since
        for old in folder.parent.glob(f"{prefix}*"):
            if old != folder and old.name[len(prefix):].isdigit():
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_state(accelerator, folder: Path, again: str) -> dict:
    """The loop state of a folder `save_state` wrote, after Accelerate restored the models, optimizers and
    RNG states from it. Anything that is not what this repository writes is refused with one line ending in
    `again` (how to start over)."""
    from accelerate.utils import load as load_weights_only  # torch.load, weights_only=True, numpy RNG allowed

    folder = Path(folder)
    loop = folder / LOOP_STATE
    try:
        state = json.loads(loop.read_text())
        if not isinstance(state, dict):
            raise TypeError(f"expected a mapping, got {type(state).__name__}")
    except (OSError, ValueError, TypeError) as e:
        raise StaleError(f"{loop}: not a saved loop state ({type(e).__name__}: {e}); {again}") from None
    foreign = sorted(p.name for p in folder.glob("custom_checkpoint_*"))
    if foreign:  # this repository never writes them: a planted or foreign state, never opened
        raise StaleError(f"{folder}: holds {', '.join(foreign)}, which this repository never writes (a state "
                         f"from elsewhere); not loaded. {again}")
    try:
        for rng in sorted(folder.glob("random_states_*.pkl")):  # Accelerate would skip a bad one in silence
            load_weights_only(rng)  # and resume with other random numbers: checked here first
        accelerator.load_state(str(folder))
    except pickle.UnpicklingError as e:  # what torch's weights_only loader raises for anything but tensors
        first = str(e).strip().splitlines()[0]
        raise StaleError(f"{folder}: a file of the saved state holds more than tensors and is not loaded "
                         f"({first}); {again}") from None
    return state
