"""The data overview `prepare` writes beside the cache: what each center looks like.

overview.png      per center (one row each) sample patches; aberrant ones framed red, first
colours.png       per patch mean hematoxylin vs eosin concentration (colour deconvolution), by center:
                  the stain shift between hospitals at a glance
colour_stats.csv  per center: patches sampled, mean and std of R, G, B (0-255) and of the H and E
                  optical-density concentrations
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..safeio import write_csv, write_figure
from ..stain.hed import HED_FROM_RGB

SAMPLE = 500  # patches per center for the colour statistics


def colour_table(images: np.ndarray) -> pd.DataFrame:
    """Per patch: mean R, G, B and mean H, E concentrations of N x S x S x 3 uint8 images."""
    x = images.reshape(len(images), -1, 3).astype(np.float32)
    od = -np.log((x + 1.0) / 256.0)
    hed = od @ HED_FROM_RGB.astype(np.float32)
    rgb, conc = x.mean(1), hed.mean(1)
    return pd.DataFrame({"R": rgb[:, 0], "G": rgb[:, 1], "B": rgb[:, 2], "H": conc[:, 0], "E": conc[:, 1]})


def write_overview(cache_dir: Path, index: pd.DataFrame, per_center: int = 8, seed: int = 0) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cache_dir = Path(cache_dir)
    arrays = {s: np.load(cache_dir / f"images_{s}.npy", mmap_mode="r") for s in index["split"].unique()}
    rng = np.random.default_rng(seed)
    centers = sorted(index["center"].unique())
    fig, axes = plt.subplots(len(centers), per_center, figsize=(1.3 * per_center, 1.45 * len(centers)), squeeze=False)
    stats, colours = [], {}
    for r, center in enumerate(centers):
        part = index[index["center"] == center]
        bad, good = part[part["aberrant"]], part[~part["aberrant"]]
        shown = pd.concat([bad.sample(min(len(bad), 2), random_state=seed),
                           good.sample(min(len(good), per_center), random_state=seed)]).head(per_center)
        for c in range(per_center):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(shown):
                row = shown.iloc[c]
                ax.imshow(arrays[row["split"]][row["row"]])
                if row["aberrant"]:
                    for spine in ax.spines.values():
                        spine.set(color="red", linewidth=3)
                    ax.set_title(row["reason"], fontsize=7, color="red")
                elif row["label"] >= 0:
                    ax.set_title("tumour" if row["label"] == 1 else "normal", fontsize=7)
            else:
                ax.axis("off")
        split = part["split"].iloc[0]
        axes[r, 0].set_ylabel(f"center {center}\n({split}, {len(part)})", fontsize=8)
        sample = good.iloc[np.sort(rng.choice(len(good), min(len(good), SAMPLE), replace=False))] if len(good) else good
        table = (
            colour_table(np.stack([arrays[s][i] for s, i in zip(sample["split"], sample["row"])]))
            if len(sample)
            else None
        )
        if table is not None:
            colours[center] = table
            stats.append({"center": int(center), "split": split, "patches": len(part), "sampled": len(table),
                          **{f"{k}_mean": round(float(table[k].mean()), 4) for k in table.columns},
                          **{f"{k}_std": round(float(table[k].std()), 4) for k in table.columns}})
    fig.suptitle("sample patches per center (aberrant ones framed red, left out of training)", fontsize=10)
    fig.tight_layout()
    write_figure(fig, cache_dir / "overview.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for center, table in colours.items():
        ax.scatter(table["H"], table["E"], s=4, alpha=0.4, label=f"center {center}")
    ax.set(title="stain per patch (colour deconvolution, non-aberrant sample)", xlabel="mean hematoxylin concentration",
           ylabel="mean eosin concentration")
    ax.legend(markerscale=3, fontsize=8)
    fig.tight_layout()
    write_figure(fig, cache_dir / "colours.png", dpi=100)
    plt.close(fig)
    write_csv(cache_dir / "colour_stats.csv", pd.DataFrame(stats))
    return [cache_dir / "overview.png", cache_dir / "colours.png", cache_dir / "colour_stats.csv"]
