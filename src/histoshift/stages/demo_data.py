"""Stage `demo-data`: the synthetic demo dataset (NOT tissue) in the competition layout."""
from __future__ import annotations

from pathlib import Path

from . import Stage, seed

STAGE = Stage("write the synthetic demo dataset (NOT tissue) in the competition layout",
              "nothing", "input/{train,val,test}.h5 (or --out), unless one of them exists",
              flow="-> input/*.h5 (synthetic)")


def arguments(p) -> None:
    p.add_argument("--out", default=None, help="folder for the h5 files (default: <root>/input)")
    p.add_argument("--per-center", type=int, default=160, help="patches per labelled center (five centers)")
    p.add_argument("--test-size", type=int, default=240, help="patches of the test center")
    p.add_argument("--seed", type=seed, default=0, help="random seed of the generated images")


def run(a, paths) -> None:
    from ..data.demo import make_demo

    out = Path(a.out) if a.out else paths.input
    for name in ("train.h5", "val.h5", "test.h5"):
        if (out / name).exists():
            print(f"demo-data: {out / name} exists, keeping it")
            return
    make_demo(out, per_center=a.per_center, test_size=a.test_size, seed=a.seed)
    print(f"demo-data: wrote a synthetic demo dataset (NOT real tissue) to {out}")
