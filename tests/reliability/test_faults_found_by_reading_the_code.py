"""Faults found by reading the code and by a rerun of the earlier fault probe: each ends in one line naming what
is wrong (exit 2), or is survived with nothing lost."""
from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

from histoshift.cli import main
from histoshift.config import ConfigError

from helpers import one_error_line, random_items, write_h5

CONFIGS = "configs"


def test_an_input_size_a_transformers_vit_cannot_take_is_refused_when_the_config_is_read():
    from histoshift.tasks import load_experiment

    with pytest.raises(ConfigError, match="Phikon's ViTModel takes 224x224 inputs"):
        load_experiment(f"{CONFIGS}/fm_phikon_frozen.yaml", ["model.recipe_overrides={input_size: 112}"])
    with pytest.raises(ConfigError, match="input_size 100: not a multiple of Phikon-v2's patch size 16"):
        load_experiment(f"{CONFIGS}/fm_phikon2_frozen.yaml", ["model.recipe_overrides={input_size: 100}"])
    # DINOv2-style models interpolate their position embeddings: another multiple of the patch is fine
    assert load_experiment(f"{CONFIGS}/fm_phikon2_frozen.yaml", ["model.recipe_overrides={input_size: 112}"])


def test_an_overridden_library_is_named_not_the_hubs_files():
    from histoshift.tasks import load_experiment

    with pytest.raises(ConfigError, match="model.recipe_overrides.library: transformers has no model "
                                          "'vit_giant_patch14_reg4_dinov2'"):
        load_experiment(f"{CONFIGS}/fm_hoptimus0_frozen.yaml", ["model.recipe_overrides={library: transformers}"])


@pytest.mark.parametrize("content, says", [
    (b"\x00" + bytes(range(256)) * 8, "neither a safetensors file nor a torch checkpoint"),
    (b"PK\x03\x04" + bytes(100), "looks like a torch checkpoint but cannot be read"),
    (b"\x80\x04\x95" + bytes(60), "looks like a torch checkpoint but cannot be read")])
def test_a_weights_file_that_is_not_weights_says_what_it_is(tmp_path, content, says):
    from histoshift.models.weights import WeightsError, read_state_dict

    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=says) as e:
        read_state_dict(path)
    assert str(path) in str(e.value)
    if content[:1] == b"\x00":  # not a pickle at all: the line does not blame pickling
        assert "pickle" not in str(e.value).replace("a pickle)", "")


def test_messages_print_numbers_not_numpy_reprs(prepared_root, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    assert main(["--root", str(root), "folds"]) == 0
    out = capsys.readouterr().out
    assert "folds [0, 1, 3, 4]" in out and "np.int64" not in out


def _edit_in_place(path, rng) -> None:
    """New bytes of the same size, the modification time set back (as `touch -r` or a careless tool does): an HDF5
    file's first image inverted (still valid), any other file's bytes overwritten near its end."""
    import h5py

    st = path.stat()
    if path.suffix == ".h5":
        with h5py.File(path, "r+") as f:
            key = sorted(f.keys())[0]
            f[key]["img"][...] = 1.0 - f[key]["img"][...]
    else:
        with open(path, "r+b") as f:
            f.seek(st.st_size - 2048)
            f.write(rng.integers(0, 256, 1024, dtype=np.uint8).tobytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.slow
def test_a_test_file_changed_in_place_makes_infer_stack_and_submit_refuse(finished, capsys):
    """Same size, same modification time, other bytes: only the change time moved. Every stage that reads the
    cache compares the bytes then (and only then) with the digest prepare recorded."""
    time.sleep(0.01)
    _edit_in_place(finished / "input" / "test.h5", np.random.default_rng(0))
    before = (finished / "submissions" / "submission.csv").read_bytes()
    for stage in (["infer"], ["infer", "--force"], ["stack"], ["submit", "--allow-degenerate"]):
        assert main(["--root", str(finished), *stage]) == 2, stage
        line = one_error_line(capsys)
        assert "test.h5 changed since the cache was built (in place" in line and "run prepare" in line, line
    assert (finished / "submissions" / "submission.csv").read_bytes() == before
    assert main(["--root", str(finished), "prepare"]) == 0  # plain prepare notices too, and rebuilds
    assert "changed since the cache was built (in place" in capsys.readouterr().out


@pytest.mark.slow
def test_a_copied_root_is_not_stale_and_prepare_says_up_to_date(prepared_root, tmp_path, capsys):
    """A copy moves every change time: the bytes are compared once, found equal, and the manifest remembers."""
    from histoshift.data.cache import check_inputs

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    check_inputs(root / "input", root / "work" / "cache")
    assert main(["--root", str(root), "prepare"]) == 0
    assert "is up to date" in capsys.readouterr().out
    write_h5(root / "input" / "val.h5", random_items(np.random.default_rng(3), range(5000, 5024), 1))
    assert main(["--root", str(root), "prepare", "--verify"]) == 0
    assert f"{root / 'input' / 'val.h5'} changed since the cache was built" in capsys.readouterr().out


@pytest.mark.slow
def test_submit_refuses_a_stack_made_from_a_checkpoint_retrained_since(finished, capsys):
    """The rule the report stage applies: a member retrained (or removed) after the stack makes its scores stale."""
    from safetensors.torch import load_file, save_file

    checkpoint = finished / "work" / "runs" / "head" / "seed0" / "fold1" / "model.safetensors"
    weights = load_file(str(checkpoint))
    save_file({k: v + 0.5 if v.is_floating_point() else v for k, v in weights.items()}, str(checkpoint))
    before = (finished / "submissions" / "submission.csv").read_bytes()
    assert main(["--root", str(finished), "submit", "--allow-degenerate"]) == 2
    line = one_error_line(capsys)
    assert "made from head/seed0/fold1's previous checkpoint" in line and "before submitting" in line, line
    assert (finished / "submissions" / "submission.csv").read_bytes() == before


@pytest.mark.parametrize("weights", ["hub", "dir"])
def test_a_truncated_weights_file_is_named_not_the_config(hf_cache, prepared_root, tmp_path, capsys, weights):
    from histoshift.models.foundation import RECIPES
    from histoshift.models.foundation.standin import write_standin

    from helpers import fm_config

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    if weights == "hub":
        folder = write_standin(RECIPES["hoptimus0"], hf_cache)
        fm_config(tmp_path / "c.yaml", "hoptimus0")
    else:
        folder = write_standin(RECIPES["hoptimus0"], tmp_path / "copy", layout="dir")
        fm_config(tmp_path / "c.yaml", "hoptimus0", weights=f"dir:{folder}")
    blob = (folder / "model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    assert main(["--root", str(root), "embed", "--config", str(tmp_path / "c.yaml")]) == 2
    line = one_error_line(capsys)
    assert "model.safetensors: truncated" in line and "config.json" not in line, line


@pytest.mark.slow
def test_a_disk_that_fills_while_embedding_names_the_store(prepared_root, tmp_path, capsys, monkeypatch):
    import errno

    import yaml

    from histoshift.features import store

    from helpers import tiny_config

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    (tmp_path / "h.yaml").write_text(yaml.safe_dump(tiny_config("feature")))

    real = store.write_text

    def full(path, text):
        if path.parent.name != "progress":
            return real(path, text)
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write() reports it: no file name

    monkeypatch.setattr(store, "write_text", full)
    assert main(["--root", str(root), "embed", "--config", str(tmp_path / "h.yaml")]) == 2
    line = one_error_line(capsys)
    assert "features_train.npy: disk full while storing rows 0-" in line and "it resumes" in line, line


@pytest.mark.slow
def test_a_cache_folder_that_cannot_be_replaced_is_one_line_and_leaves_nothing(prepared_root, tmp_path, capsys,
                                                                                monkeypatch):
    """work/cache on a read-only bind mount (os.path.ismount says no, the rename says EBUSY)."""
    import json

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    cache = root / "work" / "cache"
    before = (cache / "manifest.json").read_text()

    def busy(self, target, _rename=type(cache).rename):
        if os.fspath(self) == os.fspath(cache):
            raise OSError(16, "Device or resource busy", os.fspath(self))
        return _rename(self, target)

    monkeypatch.setattr(type(cache), "rename", busy)
    assert main(["--root", str(root), "prepare", "--force"]) == 2
    line = one_error_line(capsys)
    assert f"{cache}: the new cache cannot take its place (Device or resource busy" in line, line
    assert (cache / "manifest.json").read_text() == before and json.loads(before)["cache_id"]
    assert not [p.name for p in cache.parent.iterdir() if p.name.startswith(".cache.")
                and not p.name.endswith(".lock")]


@pytest.mark.slow
@pytest.mark.parametrize("epochs", [1, 3])
def test_the_free_space_asked_for_is_what_a_run_writes(prepared_root, tmp_path, monkeypatch, epochs):
    """The check before training asks for the run's measured peak (plus a small margin), not four models' worth."""
    import yaml

    from histoshift import checkpoint
    from histoshift.stages import train as train_stage

    from helpers import tiny_config

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tiny_config(algorithm={"name": "dann"}, train={"epochs": epochs})))
    run = root / "work" / "runs" / "t" / "seed0" / "fold0"
    sizes, asked = [], []

    def folder_size() -> int:
        return sum(p.stat().st_size for p in run.rglob("*") if p.is_file())

    real_save, real_writes = checkpoint.save_state, train_stage.run_writes

    def save_and_measure(*args, **kwargs):  # the moment two states exist: the new one complete, the old not yet gone
        real_rmtree = shutil.rmtree

        def measure_first(path, *a, **k):
            sizes.append(folder_size())
            return real_rmtree(path, *a, **k)

        checkpoint.shutil.rmtree = measure_first
        try:
            return real_save(*args, **kwargs)
        finally:
            checkpoint.shutil.rmtree = real_rmtree

    monkeypatch.setattr(checkpoint, "save_state", save_and_measure)
    monkeypatch.setattr(train_stage, "run_writes", lambda *a: asked.append(real_writes(*a)[0]) or real_writes(*a))
    assert main(["--root", str(root), "train", "--config", str(tmp_path / "t.yaml"), "--fold", "0"]) == 0
    peak = max(sizes + [folder_size()])
    assert bool(sizes) == (epochs > 1)  # the states were measured as they were saved (two at once at the peak)
    assert asked and asked[0] >= peak, (asked, peak)
    assert asked[0] < 3 * peak + (1 << 20), (asked, peak)  # close to what was written, not a multiple of it


def _embedded_standin(hf_cache, prepared_root, tmp_path):
    """A root whose feature store was embedded from H-optimus-0's stand-in in the hub cache: (its snapshot folder,
    the embed command)."""
    from histoshift.models.foundation import RECIPES
    from histoshift.models.foundation.standin import write_standin

    from helpers import fm_config

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    folder = write_standin(RECIPES["hoptimus0"], hf_cache)
    fm_config(tmp_path / "c.yaml", "hoptimus0")
    embed = ["--root", str(root), "embed", "--config", str(tmp_path / "c.yaml")]
    assert main(embed) == 0
    return folder, embed


@pytest.mark.slow
def test_a_hub_blob_edited_in_place_is_refused_not_reused(hf_cache, prepared_root, tmp_path, capsys):
    """Hub blobs are content-addressed: a weights file edited in place (size and modification time kept) is
    tampering. The store embedded from it is not reused in silence; the line names the file and the fix."""
    folder, embed = _embedded_standin(hf_cache, prepared_root, tmp_path)
    time.sleep(0.01)
    _edit_in_place((folder / "model.safetensors").resolve(), np.random.default_rng(1))
    capsys.readouterr()
    assert main(embed) == 2
    line = one_error_line(capsys)
    assert "model.safetensors: its blob" in line and "does not match its content hash" in line, line
    assert "--force-download" in line


@pytest.mark.slow
def test_a_hub_cache_copied_elsewhere_is_verified_and_reused(hf_cache, prepared_root, tmp_path, capsys):
    """Change times move with a copy: the blobs are hashed, found whole, and the store is reused as it is."""
    folder, embed = _embedded_standin(hf_cache, prepared_root, tmp_path)
    blob = (folder / "model.safetensors").resolve()
    st = blob.stat()
    blob.chmod(0o600)  # a metadata change moves the change time, not the bytes
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    assert main(embed) == 0 and "embedding that again" not in capsys.readouterr().out
