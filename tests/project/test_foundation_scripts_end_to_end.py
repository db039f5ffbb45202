"""`CONFIG_SET=foundation bash train.sh` then `bash infer.sh` offline, from a Hugging Face cache of stand-ins, in a
copy of the repository (minutes; a file of its own so that a second test worker runs it beside the demo's)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from histoshift.data.h5_reader import list_ids
from histoshift.stages.submit import check_submission

from helpers import clone as make_clone
from helpers import small_demo


@pytest.mark.slow
def test_foundation_model_set_offline_from_a_hub_cache(tmp_path):
    """`CONFIG_SET=foundation bash train.sh && bash infer.sh` with HF_HUB_OFFLINE=1 and a Hugging Face
    cache that holds stand-ins (random weights) of the set's models: preflight passes, every model embeds
    through the ordinary hub path, its heads join the stack stage as ensemble members, a submission is
    written - with the published MedImageInsight recipe (configs/paper_medimageinsight_mlp.yaml) in the set."""
    clone = make_clone(tmp_path)
    cache = tmp_path / "hf-cache"
    env = {**os.environ, "PY": sys.executable, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "TQDM_DISABLE": "1", "PYTHONPATH": str(clone / "src"), "CONFIG_SET": "foundation",
           "ALLOW_DEGENERATE": "1"}  # random stand-in features: a one-class submission is possible
    members = [line.split("/")[-1].removesuffix(".yaml") for line in
               (clone / "configs" / "sets" / "foundation.txt").read_text().splitlines() if line and line[0] != "#"]
    recipes = ",".join(
        yaml.safe_load((clone / "configs" / f"{m}.yaml").read_text())["model"]["recipe"] for m in members
    )
    for name in members + ["paper_medimageinsight_mlp"]:  # heads in batches of 32 (the shipped 256 needs 86 patches
        # a center, 3.6x the embedding on two cores); nothing else in the clone's configs changes
        path = clone / "configs" / f"{name}.yaml"
        cfg = yaml.safe_load(path.read_text())
        cfg["train"].update(batch_size=32, target_batch_size=16)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    subprocess.run([sys.executable, "-m", "histoshift", "fm-standin", "--recipe", recipes, "--out", str(cache)],
                   env=env, check=True, capture_output=True, timeout=1800)
    small_demo(clone, env, per_center=24, test_size=24)  # random stand-in features: nothing to learn

    def script(name: str) -> str:
        proc = subprocess.run(["bash", name], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=5400)  # a bound for a hung script, not a speed test
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{name} failed:\n{log[-4000:]}"
        return log

    # the published MedImageInsight recipe (frozen + MLP) in the same run, after the set's MedImageInsight config:
    # its preflight passes and it trains on that config's store (one embedding for both heads)
    sets = clone / "configs" / "sets" / "foundation.txt"
    sets.write_text(sets.read_text() + "configs/paper_medimageinsight_mlp.yaml\n")
    log = script("train.sh")
    assert f"preflight: {len(members) + 1} config(s) ready" in log
    assert log.count("| in the Hugging Face cache |") == len(members) + 1  # preflight's table
    assert log.count("embed: medimageinsight-") == 1  # embedded once, for both MedImageInsight configs
    demo = clone / "demo"
    stores = sorted(p.name for p in (demo / "work" / "features").iterdir())
    assert len(stores) == len(members) and all("-8v-hed4-" in s for s in stores)
    # The stand-in is in lion-ai/MedImageInsights' own layout: 2024.09.27/config.yaml, the .pt weights file with
    # image_encoder.* keys
    (snapshot,) = (cache / "models--lion-ai--MedImageInsights" / "snapshots").iterdir()
    assert (snapshot / "2024.09.27" / "vision_model" / "medimageinsigt-v1.0.0.pt").is_file()
    (store,) = [demo / "work" / "features" / s for s in stores if s.startswith("medimageinsight-")]
    meta = json.loads((store / "meta.json").read_text())
    assert (
        meta["dim"] == 16 and meta["spec"]["backbone"]["weights"]["revision"] == snapshot.name
    )  # the stand-in's projection
    log = script("infer.sh")
    assert log.count("STAND-IN") == 0  # infer.sh never loads a backbone: the heads' TTA predictions exist
    sub = pd.read_csv(demo / "submissions" / "submission.csv")
    check_submission(sub, list_ids(demo / "input" / "test.h5"))
    choice = json.loads((demo / "work" / "stack" / "choice.json").read_text())
    assert sorted({m.split("/")[0] for m in choice["members"]}) == sorted(members + ["paper_medimageinsight_mlp"])

