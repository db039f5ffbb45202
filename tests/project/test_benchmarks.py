"""The benchmark scripts keep working: bench/gpu.sh --smoke runs speed.py, fm.py and scale.py at tiny sizes on
the CPU. Their numbers are not asserted (benchmarks are not tests); their output's shape and sense are."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_sh_smoke_runs_every_benchmark_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable, "OUT": str(out)}
    proc = subprocess.run(["bash", "bench/gpu.sh", "--smoke"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800)  # a bound for a hung script, not a speed test
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "gpu.log").read_text()
    for name in ("speed", "fm", "scale"):
        assert f"== {name} done in" in log, log[-2000:]

    (speed,) = out.glob("speed-cpu-*-smoke.json")
    models = json.loads(speed.read_text())["models"]
    whats = [m["what"] for m in models]
    for part in ("engine.fit, image task", "infer TTA", "Embedder", "engine.fit, feature task"):
        assert sum(w.startswith(part) for w in whats) == 1, whats
    for m in models:
        assert m["loop_img_s"] > 0 and m["ceiling_img_s"] > 0
        assert m["ratio"] == pytest.approx(m["loop_img_s"] / m["ceiling_img_s"], rel=1e-6)

    rows = json.loads((out / "fm.json").read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["dinov2_s", "phikon"]
    for r in rows:
        assert r["path_images_per_s"] > 0 and r["ceiling_images_per_s"] > 0 and r["gflops_per_image"] > 0
        assert r["competition_hours"] is None  # a cut-down model projects nothing

    (line,) = (out / "scale.jsonl").read_text().splitlines()
    scale = json.loads(line)
    assert (scale["n"], scale["views"], scale["dim"]) == (1500, 8, 32)
    assert set(scale["seconds"]) == {"train", "infer", "stack", "submit", "total"}
    assert scale["seconds"]["total"] >= sum(v for k, v in scale["seconds"].items() if k != "total") - 0.5
    assert scale["peak_rss_mb"] > 50 and scale["peak_gpu_mb"] is None
    assert scale["accuracy"] > 0.75  # the synthetic clusters are learnable: far above chance
    assert scale["store_bytes"] >= 1500 * 8 * 32 * 2
