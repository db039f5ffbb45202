"""Worst-case paired intervals of the "what helped and what hurt" comparisons whose per-patch predictions were not
kept (every row measured before 2026-12-07).

    python bench/intervals.py [--out bench/results/intervals-<date>.txt]

Each row is two accuracies on the same 1,454 test patches of center 2 (PCam valid, synthetic stain; the full and the
reduced protocol share them, and several seeds or the re-stained hidden center repeat them), copied from the table
in docs/benchmarks.md with the raw file they were rounded from. `paired.worst_case` gives the widest interval those
two numbers allow (every error of one a patch the other gets right; repeats perfectly correlated, so 1,454
patches count): a row decisive under it is decisive under any discordance; one that is not was not shown to be,
and only a paired re-measurement (bench/regret.py keeps the per-patch predictions) can make it so.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from histoshift.paired import worst_case  # noqa: E402

PATCHES = 1454
# (change, baseline accuracy, with the change, raw file the numbers come from)
ROWS = [
    ("HED stain jitter on top of dihedral views (default)", 0.720, 0.858, "accuracy-2026-11-23-full-key.txt"),
    ("dihedral views alone, over no augmentation", 0.741, 0.720, "accuracy-2026-11-23-full-key.txt"),
    ("DANN over ERM (default)", 0.858, 0.879, "accuracy-2026-11-23-full-key.txt"),
    ("8-view TTA (default)", 0.863, 0.879, "accuracy-2026-11-23-full-key.txt"),
    ("AdaBN on the default single model", 0.879, 0.891, "accuracy-2026-11-23-full-ens.txt"),
    ("ensemble 2 backbones x 4 folds over one model (default)", 0.879, 0.889, "accuracy-2026-11-23-full-ens.txt"),
    ("LightGBM stacker instead of mean logits", 0.889, 0.886, "accuracy-2026-11-23-full-ens.txt"),
    ("AdaBN predictions for the ensemble (reduced)", 0.875, 0.883, "accuracy-2026-11-23-4500p-3ep-lite0-adabn.txt"),
    ("Macenko normalisation (off)", 0.852, 0.832, "accuracy-2026-11-23-4500p-3ep.txt"),
    ("random init instead of ImageNet", 0.852, 0.651, "accuracy-2026-11-23-4500p-3ep.txt"),
    (
        "prior matching at 50% (off unless LOCO says)",
        0.882,
        0.879,
        "accuracy-2026-11-24-4500p-3ep-aglr-prior-oracle.txt",
    ),
    (
        "per-center standardisation, frozen Lite0 (default for heads)",
        0.792,
        0.811,
        "accuracy-2026-12-01-4500p-3ep-frozen.txt",
    ),
    ("per-center standardisation, frozen Lite1", 0.800, 0.828, "accuracy-2026-12-01-4500p-3ep-frozen.txt"),
    ("MultiStain-GAN, CPU-sized (off)", 0.820, 0.760, "accuracy-2026-12-02-4500p-3ep-stain-gan.txt"),
    ("Nero instead of AdamW (off)", 0.820, 0.604, "accuracy-2026-12-02-4500p-3ep-stain-more.txt"),
    ("class reweighting (off)", 0.820, 0.829, "accuracy-2026-12-02-4500p-3ep-stain-more.txt"),
    ("Reinhard normalisation, TTA (off)", 0.820, 0.827, "accuracy-2026-12-02-4500p-3ep-stain.txt"),
    ("grayscale input, TTA (off)", 0.820, 0.834, "accuracy-2026-12-02-4500p-3ep-stain.txt"),
    ("EMA of the weights, AdaBN (off)", 0.833, 0.828, "accuracy-2026-12-04-4500p-3ep-average-s{0,1}.txt"),
    ("SWAD, AdaBN (off)", 0.833, 0.826, "accuracy-2026-12-04-4500p-3ep-average-s{0,1}.txt"),
    ("HED sigma 0.1 instead of 0.05, AdaBN (off)", 0.833, 0.839, "accuracy-2026-12-04-4500p-3ep-hed-s{0,1}.txt"),
    ("HED sigma 0.2 instead of 0.05, AdaBN (off)", 0.833, 0.842, "accuracy-2026-12-04-4500p-3ep-hed-s{0,1}.txt"),
    ("robustify, frozen Lite0, adapted (off)", 0.809, 0.820, "accuracy-2026-12-04-4500p-3ep-robust-s{0,1}.txt"),
    (
        "mixed set over the fine-tuned set, adapted rank average",
        0.857,
        0.862,
        "accuracy-2026-12-04-4500p-3ep-mixed-lite0-s{0,1}.txt",
    ),
    (
        "LNTL instead of DANN, AdaBN (was the Lite0 default 12-04 to 12-07)",
        0.838,
        0.843,
        "accuracy-2026-12-04-4500p-3ep-dart-gpu-s{0,1}.txt",
    ),
    (
        "LNTL instead of DANN, hidden center, AdaBN",
        0.851,
        0.853,
        "accuracy-2026-12-04-4500p-3ep-dart-gpu-s{0,1}-hidden.txt",
    ),
    ("AIVA on ERM instead of DANN, AdaBN (off)", 0.838, 0.786, "accuracy-2026-12-04-4500p-3ep-dart-gpu-s{0,1}.txt"),
    ("AvaGrad + early stopping, AdaBN (off)", 0.838, 0.823, "accuracy-2026-12-04-4500p-3ep-dart-gpu-s{0,1}.txt"),
    (
        "Fourier transfer beta 0.01 instead of 8-view TTA (off)",
        0.819,
        0.824,
        "accuracy-2026-12-04-4500p-3ep-dart-gpu-s{0,1}.txt",
    ),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / f"intervals-{time.strftime('%Y-%m-%d')}.txt"))
    a = ap.parse_args()
    lines = [f"# worst-case paired 95% intervals (paired.worst_case) on {PATCHES} patches; points = 0.01",
             f"{'change':<68} {'base':>6} {'with':>6} {'diff':>6} {'worst-case 95% CI':>18}  verdict"]
    for name, base, new, raw in ROWS:
        lo, hi = worst_case(new, base, PATCHES)
        verdict = "decisive" if lo > 0 or hi < 0 else "not shown decisive"
        lines.append(f"{name:<68} {base:>6.3f} {new:>6.3f} {100 * (new - base):>+6.1f} "
                     f"{f'[{100 * lo:+.1f}, {100 * hi:+.1f}]':>18}  {verdict}  ({raw})")
    text = "\n".join(lines) + "\n"
    Path(a.out).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
