"""Foundation models offline and from local copies, the one-line failures, the feature-store key,
resumable embedding and the GPU batch fitting's out-of-memory fallback."""
from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from histoshift.cli import main
from histoshift.data.cache import Cache
from histoshift.config import load_config
from histoshift.models.foundation import RECIPES, resolve_recipe
from histoshift.models.foundation.loader import load_foundation
from histoshift.models.foundation.recipe import RecipeError
from histoshift.models.foundation.standin import DAVIT_SHRINK, SHRINK, standin_overrides, write_standin
from histoshift.models.weights import WeightsError
from helpers import fm_config

REPO = Path(__file__).resolve().parents[2]


def _copy(prepared_root, tmp_path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_local_folder_and_weights_file_keep_the_recipe(name, hf_cache, tmp_path):
    """A downloaded copy of the repo (dir:, a Kaggle dataset) and, for timm models, a bare weights file
    (file:) give the same embedding as the hub cache: same normalisation, same rule."""
    recipe = resolve_recipe(name, standin_overrides(RECIPES[name]))
    cached = write_standin(recipe, hf_cache)
    local = write_standin(recipe, tmp_path / "kaggle" / name, layout="dir")
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        hub = load_foundation(recipe, "hub")
        want = hub(hub.preprocess(x))
        folder = load_foundation(recipe, f"dir:{local}")
        torch.testing.assert_close(folder(folder.preprocess(x)), want)
        assert folder.preprocess == hub.preprocess and folder.preprocess.mean == RECIPES[name].mean
    if recipe.library == "transformers":
        with pytest.raises(WeightsError, match="dir:PATH"):
            load_foundation(recipe, f"file:{cached / 'model.safetensors'}")
        return
    # a weights file alone: the architecture comes from the recipe, here shrunk to the stand-in's size
    shrink, weights_file = (DAVIT_SHRINK, recipe.weights_file) if recipe.adapter else (SHRINK, "model.safetensors")
    small = resolve_recipe(name, {**standin_overrides(RECIPES[name]), "arch_kwargs": shrink,
                                  "embed_dim": want.shape[1]})
    with torch.no_grad():
        file = load_foundation(small, f"file:{cached / weights_file}")
        torch.testing.assert_close(file(file.preprocess(x)), want)
    if name in ("dinov2_s", "medimageinsight"):  # the card's full size does not fit these weights
        with pytest.raises((WeightsError, RecipeError), match="has shape|missing|embeds"):
            load_foundation(RECIPES[name], f"file:{cached / weights_file}")


def test_offline_without_a_cached_copy_says_how_to_get_one(hf_cache, prepared_root, tmp_path, capsys):
    root = _copy(prepared_root, tmp_path)
    fm_config(tmp_path / "c.yaml", "virchow2")
    assert main(["--root", str(root), "train", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "paige-ai/Virchow2: not in the Hugging Face cache" in err[0]
    assert "hf download paige-ai/Virchow2" in err[0] and "dir:PATH" in err[0]


def test_missing_optional_dependency_is_named(monkeypatch, hf_cache):
    write_standin(RECIPES["phikon2"], hf_cache)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(WeightsError, match="optional package `transformers` is not installed"):
        load_foundation(RECIPES["phikon2"], "hub")


class _GatedHub(http.server.BaseHTTPRequestHandler):
    """A loopback server answering every request as the hub answers for a gated repo without access."""

    def _gated(self):
        self.send_response(403)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model paige-ai/Virchow2 is restricted.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _gated

    def log_message(self, *args):
        pass


def _train_with_hub(endpoint: str, root: Path, config: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(cache),
           "HF_HUB_ETAG_TIMEOUT": "3", "HF_HUB_DOWNLOAD_TIMEOUT": "3", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "histoshift", "--root", str(root), "train", "--config", str(config)],
                          env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_gated_model_and_unreachable_hub_each_get_one_line(prepared_root, tmp_path):
    root = _copy(prepared_root, tmp_path)
    fm_config(tmp_path / "c.yaml", "virchow2")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        gated = _train_with_hub(f"http://127.0.0.1:{server.server_port}", root, tmp_path / "c.yaml", tmp_path / "empty")
    finally:
        server.shutdown()
        server.server_close()  # the port now refuses connections: an unreachable hub
    assert gated.returncode == 2, gated.stderr
    (line,) = gated.stderr.strip().splitlines()
    assert line.startswith("error: ")
    assert "paige-ai/Virchow2 is gated: accept its licence at https://huggingface.co/paige-ai/Virchow2" in line
    assert "HF_TOKEN" in line
    closed = _train_with_hub(f"http://127.0.0.1:{server.server_port}", root, tmp_path / "c.yaml", tmp_path / "empty")
    assert closed.returncode == 2, closed.stderr
    # one probe of the endpoint (hub.endpoint_reachable), no retries with back-off: ours is the one error line
    (line,) = [l for l in closed.stderr.strip().splitlines() if l.startswith("error:")]
    assert closed.stderr.strip().splitlines()[-1] == line
    assert "not in the Hugging Face cache" in line and "cannot be reached" in line


def test_store_key_follows_every_feature_setting(hf_cache, prepared_root, tmp_path):
    """(c) every setting that changes the features changes the key; head settings do not."""
    from histoshift.features.store import feature_spec, store_key

    write_standin(RECIPES["virchow2"], hf_cache)
    cache_dir = prepared_root / "work" / "cache"
    fm_config(tmp_path / "c.yaml", "virchow2")

    def key(*overrides, precision="no", weights_cache=None):
        return store_key(
            feature_spec(load_config(tmp_path / "c.yaml", list(overrides)), Cache.open(cache_dir), precision)
        )

    base = key()
    assert base == key() and base.startswith("virchow2-8v-hed2-no-")
    changed = {
        "precision": key(precision="bf16"),
        "views": key("model.feature_views=1"),
        "hed views": key("model.feature_hed_views=4"),
        "hed sigma": key("model.feature_hed_sigma=0.1"),
        "stain norm": key("aug.stain_norm=reinhard"),
        "weights": key("model.weights=none"),
        **{f"recipe.{k}": key(f"model.recipe_overrides.{k}={v}") for k, v in {
            "mean": "[0.5,0.5,0.5]", "std": "[0.2,0.2,0.2]", "input_size": 112, "interpolation": "bilinear",
            "crop_pct": 0.875, "embedding": "cls", "precision": "bf16",
            "create_kwargs": "{act_layer: torch.nn.GELU}", "arch_kwargs": "{reg_tokens: 0}",
            "architecture": "vit_large_patch14_224"}.items()},
    }
    changed["recipe.hub_id"] = key("model.weights=none", "model.recipe_overrides.hub_id=someone/else")
    assert changed["recipe.hub_id"] != key("model.weights=none")
    for what, k in changed.items():
        assert k != base, f"{what} does not change the feature-store key"
    assert len(set(changed.values())) == len(changed)
    write_standin(RECIPES["virchow2"], hf_cache, seed=1)  # another snapshot of the repo (refs/main moves)
    assert key() != base
    for same in ("optim.lr=0.1", "model.head_hidden=7", "train.epochs=9", "algorithm.name=erm", "train.seed=3"):
        assert key(same) == key(), same
    other_cache = tmp_path / "cache2"
    shutil.copytree(cache_dir, other_cache)
    manifest = json.loads((other_cache / "manifest.json").read_text())
    manifest["files"]["test"]["mtime_ns"] += 1  # the same content from files copied elsewhere: the same store
    (other_cache / "manifest.json").write_text(json.dumps(manifest))
    assert store_key(feature_spec(load_config(tmp_path / "c.yaml"), Cache.open(other_cache), "no")) == key()
    manifest["cache_id"] = "0123456789abcdef"  # other cached images
    (other_cache / "manifest.json").write_text(json.dumps(manifest))
    assert store_key(feature_spec(load_config(tmp_path / "c.yaml"), Cache.open(other_cache), "no")) != key()


@pytest.mark.slow
def test_embedding_resumes_at_the_first_unfinished_chunk(hf_cache, prepared_root, tmp_path, monkeypatch):
    """A killed embedding keeps its finished chunks: rerun, only the chunks without a marker are computed."""
    from accelerate import Accelerator

    import histoshift.features.store as layout
    from histoshift.data.cache import Cache
    from histoshift.features.embedder import embed
    from histoshift.stain.transform import InputTransform

    monkeypatch.setattr(layout, "CHUNK_ROWS", 16)
    write_standin(RECIPES["hoptimus0"], hf_cache)
    fm_config(tmp_path / "c.yaml", "hoptimus0")
    cfg = load_config(tmp_path / "c.yaml")
    cache = Cache.open(prepared_root / "work" / "cache")
    spec, transform = layout.feature_spec(cfg, cache, "no"), InputTransform(cfg.aug)
    store = embed(cfg, cache, tmp_path / "features", Accelerator(cpu=True), "no", transform, spec)
    full = np.array(store.arrays["train"])
    n = len(full)
    assert n > 32 and full.shape[1] == 8 + 2 and np.isfinite(full).all()
    # as a run killed after the first chunk of train leaves it: no meta.json, one marker, rows written so far
    (store.path / "meta.json").unlink()
    for marker in (store.path / "progress").glob("train-*"):
        if marker.name != "train-0":
            marker.unlink()
    arr = np.load(store.path / "features_train.npy", mmap_mode="r+")
    arr[:16] = 7.0  # a finished chunk must be kept, not recomputed
    arr[16:] = 0.0
    arr.flush()
    del arr
    resumed = embed(cfg, cache, tmp_path / "features", Accelerator(cpu=True), "no", transform, spec)
    got = np.array(resumed.arrays["train"])
    assert (got[:16] == 7.0).all()
    np.testing.assert_array_equal(got[16:], full[16:])  # the HED views too: drawn per chunk, reproducible
    assert (resumed.path / "meta.json").exists()


@pytest.mark.slow
def test_out_of_memory_halves_the_batch(hf_cache, prepared_root, tmp_path, monkeypatch, capsys):
    from histoshift.data.cache import Cache
    from histoshift.features.embedder import Embedder
    from histoshift.stain.transform import InputTransform
    from histoshift.models.backbone import PatchClassifier

    write_standin(RECIPES["hoptimus0"], hf_cache)
    fm_config(tmp_path / "c.yaml", "hoptimus0", embed_batch_size=16)
    cfg = load_config(tmp_path / "c.yaml")
    model = PatchClassifier(cfg.model).eval()
    embedder = Embedder(model.backbone, model.preprocess, cfg, InputTransform(cfg.aug), torch.device("cpu"), "no")
    images = np.array(Cache.open(prepared_root / "work" / "cache").images("train")[:20])
    want = embedder(images, 8, 0)
    real_forward, sizes = embedder._forward, []

    limit = [5]

    def forward(batch, n_views, jitter=None, centers=None):  # a device that holds at most 5 patches x 8 views
        sizes.append(len(batch))
        if len(batch) > limit[0]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")  # torch's wording
        return real_forward(batch, n_views, jitter, centers)

    monkeypatch.setattr(embedder, "_forward", forward)
    got = embedder(images, 8, 0)
    assert embedder.batch == 4 and sizes[:3] == [16, 8, 4]
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-3)
    assert "batch halved to 4 patches" in capsys.readouterr().out
    # later chunks run at the batch found (no search); one that no longer fits (memory taken by something else)
    # halves it again
    sizes.clear()
    np.testing.assert_array_equal(embedder(images, 8, 0), got)
    assert set(sizes) == {4}
    limit[0] = 3
    np.testing.assert_allclose(embedder(images, 8, 0).astype(np.float32), got.astype(np.float32), atol=2e-3)
    assert embedder.batch == 2 and "batch halved to 2 patches" in capsys.readouterr().out


@pytest.mark.slow
def test_fine_tuned_recipe_run_infers_without_the_hub(hf_cache, prepared_root, tmp_path):
    """Partial fine-tuning of a recipe backbone; its run folder records the architecture, so `infer`
    rebuilds the model with the cache gone."""
    write_standin(RECIPES["dinov2_s"], hf_cache)
    root = _copy(prepared_root, tmp_path)
    (tmp_path / "ft.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {
                    "recipe": "dinov2_s",
                    "recipe_overrides": {"input_size": 56},
                    "weights": "hub",
                    "train_last_blocks": 1,
                    "drop_path_rate": 0.1,
                },
                "train": {"epochs": 1, "batch_size": 16, "target_batch_size": 8, "eval_batch_size": 32},
            }
        )
    )
    r = ["--root", str(root)]
    assert main(r + ["train", "--config", str(tmp_path / "ft.yaml"), "--fold", "0"]) == 0
    shutil.rmtree(hf_cache)
    assert main(r + ["infer"]) == 0
    run = root / "work" / "runs" / "ft" / "seed0" / "fold0"
    built = json.loads((run / "backbone.json").read_text())["kwargs"]
    assert built["depth"] == 2 and built["drop_path_rate"] == 0.1  # the stand-in's size, as built
    assert len(np.loadtxt(run / "tta_test.csv", delimiter=",", skiprows=1, ndmin=2)) > 0


def test_recipe_configs_reject_conflicting_settings(tmp_path):
    from histoshift.config import ConfigError

    shipped = sorted((REPO / "configs").glob("fm_*.yaml"))
    assert len(shipped) >= 8 and all(load_config(p).model.recipe in RECIPES for p in shipped)
    with pytest.raises(ConfigError, match="defines the backbone"):
        load_config(shipped[0], ["model.input_size=224"])
    # recipe names and fields are checked against the registry by the stages (config.py imports none)
    from histoshift.tasks import load_experiment

    with pytest.raises(ConfigError, match="unknown recipe field 'meen'"):
        load_experiment(shipped[0], ["model.recipe_overrides.meen=[0,0,0]"])
    with pytest.raises(ConfigError, match="unknown foundation model"):
        load_experiment(shipped[0], ["model.recipe=uni3"])
    assert main(["recipes"]) == 0 and main(["--root", str(tmp_path), "embed", "--config", str(shipped[0]),
                                           "model.recipe=uni3"]) == 2
    with pytest.raises(ConfigError, match="hub \\| dir:PATH"):
        load_config(shipped[0], ["model.weights=package:efficientnet_lite0"])


def test_downloaded_constants_never_override_the_card(hf_cache, tmp_path, capsys):
    """A repo config that disagrees with the card is named in a note; the recipe's constants are used."""
    recipe = RECIPES["virchow2"]
    folder = write_standin(recipe, hf_cache)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["mean"] = [0.5, 0.5, 0.5]
    (folder / "config.json").write_text(json.dumps(config))
    assert load_foundation(recipe, "hub").preprocess.mean == recipe.mean
    assert "paige-ai/Virchow2's downloaded config says mean [0.5, 0.5, 0.5]" in capsys.readouterr().out
    local = write_standin(RECIPES["phikon2"], tmp_path / "phikon2", layout="dir")
    (local / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(RECIPES["phikon2"].mean), "image_std": list(RECIPES["phikon2"].std), "resample": 2}))
    assert load_foundation(RECIPES["phikon2"], f"dir:{local}").preprocess.interpolation == "bicubic"
    out = capsys.readouterr().out
    assert "says interpolation bilinear; the recipe uses bicubic" in out and "says mean" not in out


@pytest.mark.slow
def test_a_new_hub_snapshot_never_leaves_a_stale_head(hf_cache, prepared_root, tmp_path, capsys):
    """A finished head records its feature store; new weights (the repo's refs/main moved) make the
    rerun refuse instead of keeping a head trained on the old features; --force retrains on new ones."""
    root = _copy(prepared_root, tmp_path)
    write_standin(RECIPES["hoptimus0"], hf_cache)
    fm_config(tmp_path / "c.yaml", "hoptimus0")
    train = ["--root", str(root), "train", "--config", str(tmp_path / "c.yaml"), "--fold", "0"]
    assert main(train) == 0
    assert main(train) == 0 and "is done with this config, skipping" in capsys.readouterr().out
    write_standin(RECIPES["hoptimus0"], hf_cache, seed=1)
    assert main(train) == 2
    assert "other inputs (the feature store (new weights, views or cache) changed since)" in capsys.readouterr().err
    # infer refuses the head too, before embedding anything with the new weights
    assert main(["--root", str(root), "infer"]) == 2
    assert (
        "the feature store (new weights, views or cache) changed since the run was trained" in capsys.readouterr().err
    )
    assert len(list((root / "work" / "features").iterdir())) == 1
    assert main(train + ["--force"]) == 0
    assert len(list((root / "work" / "features").iterdir())) == 2
    run = root / "work" / "runs" / "c" / "seed0" / "fold0"
    assert json.loads((run / "inputs.json").read_text())["features"].startswith("hoptimus0-8v-hed2-no-")


def test_an_unreachable_endpoint_is_known_in_one_probe(monkeypatch):
    """hub.endpoint_reachable: a refused connection answers at once (the hub client would retry ~20 s); behind a
    proxy the hub client decides."""
    import socket
    import time

    from histoshift.models.foundation.hub import endpoint_reachable

    for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    port = listening.getsockname()[1]
    endpoint_reachable.cache_clear()
    assert endpoint_reachable(f"http://127.0.0.1:{port}")
    listening.close()
    endpoint_reachable.cache_clear()
    t0 = time.time()
    assert not endpoint_reachable(f"http://127.0.0.1:{port}") and time.time() - t0 < 2
    endpoint_reachable.cache_clear()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert endpoint_reachable(f"http://127.0.0.1:{port}")
    endpoint_reachable.cache_clear()
