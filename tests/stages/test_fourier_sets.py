"""`infer --fourier`: fine-tuned models predict each patch through its Fourier transfers to donors of other
training centers, one set per beta, recorded with its settings (changed settings predict again); heads on stored
features read the transfers from a store of their own; the stack compares every beta and number of donors leave
one center out."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from histoshift.cli import main
from histoshift.config import ConfigError
from histoshift.data.donors import FourierTTA, donor_rows
from histoshift.stain.fourier import Donors


def test_donors_come_from_other_centers_only():
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(6, 3, 16, 16, generator=g)
    donors = Donors(pool, torch.tensor([0, 0, 3, 3, 4, 4]))
    x = pool[[0, 2]].clone()  # each is its own nearest donor, but of its own center
    from histoshift.stain.fourier import descriptor
    d = torch.cdist(descriptor(x, 0.1), descriptor(pool, 0.1))
    views = donors.views(x, torch.tensor([0, 3]), 0.1, 4)
    assert views.shape == (4, 2, 3, 16, 16)
    order = d[0].argsort().tolist()
    expected = [i for i in order if i not in (0, 1)][0]  # the nearest donor of another center
    from histoshift.stain.fourier import fourier_transfer
    torch.testing.assert_close(views[0, 0], fourier_transfer(x[:1], pool[expected][None], 0.1)[0])
    with pytest.raises(ConfigError, match="fewer than 5 donors of other centers"):
        donors.views(x, torch.tensor([0, 3]), 0.1, 5)


def test_the_pool_is_a_fixed_sample_of_each_training_center(prepared_root):
    from histoshift.data.cache import Cache

    index = Cache.open(prepared_root / "work" / "cache").index
    rows = donor_rows(index, per_center=5)
    assert set(rows["split"]) == {"train"} and not rows["aberrant"].any()
    assert rows.groupby("center").size().to_dict() == {0: 5, 3: 5, 4: 5}
    assert rows["id"].tolist() == donor_rows(index, per_center=5)["id"].tolist()
    with pytest.raises(ConfigError, match="Fourier transfer"):
        FourierTTA(betas=(), donors=3)


@pytest.mark.slow
def test_infer_fourier_writes_a_set_per_beta_that_the_stack_compares(pipeline_root, finished, tmp_path, capsys,
                                                                      monkeypatch):
    from histoshift.data.cache import Cache

    r = ["--root", str(pipeline_root)]
    assert main(r + ["train", "--config", str(tmp_path / "img.yaml")]) == 0  # every fold: the stack needs them
    args = ["infer", "--fourier", "--fourier-betas", "0.02", "0.05", "--fourier-donors", "3"]
    assert main(r + ["infer"]) == 0  # the plain sets first: below, only the Fourier sets read images
    gathered, gather = [], Cache.gather
    monkeypatch.setattr(Cache, "gather", lambda self, table: gathered.append(tuple(table["id"])) or gather(self, table))
    assert main(r + args) == 0
    monkeypatch.setattr(Cache, "gather", gather)
    run = next((pipeline_root / "work" / "runs").rglob("fold0"))
    folds = [p for p in run.parent.iterdir() if p.is_dir() and p.name.startswith("fold")]
    test_ids = tuple(pd.read_csv(run / "tta_test.csv")["id"])
    assert gathered.count(test_ids) == len(folds)  # a fold model reads the test center once for both betas
    for beta in ("0.02", "0.05"):
        for part in ("heldout", "test"):
            t = pd.read_csv(run / f"tta_{part}_fourier-b{beta}.csv")
            assert [c for c in t.columns if c.startswith("v")] == ["v0", "v1", "v2"] and t[
                ["v0", "v1", "v2"]
            ].notna().all().all()
    recorded = json.loads((run / "predictions.json").read_text())["tta_test_fourier-b0.02.csv"]["settings"]
    assert recorded["beta"] == 0.02 and recorded["donors"] == 3 and recorded["per_center"] == 128
    plain = pd.read_csv(run / "tta_heldout.csv")
    assert not plain["v0"].equals(t["v0"])  # the transfers change the logits
    capsys.readouterr()
    assert main(r + args) == 0 and "(Fourier sets) is up to date" in capsys.readouterr().out
    assert main(r + args[:-1] + ["2"]) == 0  # other settings: predicted again
    assert len([c for c in pd.read_csv(run / "tta_test_fourier-b0.02.csv").columns if c.startswith("v")]) == 2
    assert main(r + ["infer"]) == 0 and main(r + ["stack"]) == 0
    methods = set(pd.read_csv(pipeline_root / "work" / "stack" / "comparison.csv").method)
    assert {"mean+fourier-b0.02-n1", "mean+fourier-b0.02-n2", "mean+fourier-b0.05-n2"} <= methods
    choice = json.loads((pipeline_root / "work" / "stack" / "choice.json").read_text())
    assert choice["fourier_vs_pick"]["fourier"].startswith(("mean+fourier", "rank+fourier", "stack+fourier"))

    # a head on stored features: its backbone's transfers embedded once into a store of their own, every fold reads it
    h = ["--root", str(finished), "infer", "--fourier", "--fourier-betas", "0.03", "--fourier-donors", "2"]
    assert main(h) == 0
    stores = [p for p in (finished / "work" / "features").iterdir() if "-fourier-b0.03-" in p.name]
    assert len(stores) == 1 and json.loads((stores[0] / "meta.json").read_text())["spec"]["fourier"]["donors"] == 2
    for fold in (finished / "work" / "runs").rglob("fold*"):
        if fold.is_dir():
            t = pd.read_csv(fold / "tta_heldout_fourier-b0.03.csv")
            assert [c for c in t.columns if c.startswith("v")] == ["v0", "v1"]
    capsys.readouterr()
    assert main(h) == 0 and "(Fourier sets) is up to date" in capsys.readouterr().out
