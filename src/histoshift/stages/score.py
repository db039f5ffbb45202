"""Stage `score`: the submission's accuracy against a labels file (the demo and offline benchmarks only)."""
from __future__ import annotations

from . import Stage

STAGE = Stage("accuracy of the submission against a labels CSV (demo and offline benchmarks)",
              "submissions/submission.csv, --labels CSV (ID,label)", "nothing (prints the accuracy)",
              flow="submissions/submission.csv, --labels -> (prints)")


def arguments(p) -> None:
    p.add_argument("--labels", required=True, help="CSV with columns ID,label")


def run(a, paths) -> None:
    import pandas as pd

    from ..errors import Missing
    from ..metrics import accuracy

    sub = pd.read_csv(paths.submissions / "submission.csv")
    try:
        labels = pd.read_csv(a.labels)
    except (ValueError, UnicodeDecodeError) as e:  # pandas' parser errors are ValueErrors
        raise Missing(f"{a.labels}: not a CSV file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    except FileNotFoundError:
        raise Missing(f"{a.labels}: no such file") from None
    missing = [c for c in ("ID", "label") if c not in labels.columns]
    if missing:
        raise Missing(f"{a.labels}: no column {' or '.join(missing)} (columns: {', '.join(map(str, labels.columns))}); "
                      "a labels file has the columns ID,label")
    merged = sub.merge(labels[["ID", "label"]], on="ID", how="inner")
    if len(merged) != len(sub):
        raise Missing(f"{a.labels}: labels for {len(merged)} of {len(sub)} submission ids")
    acc = accuracy(merged["label"], merged["Pred"])
    print(f"score: test accuracy {acc:.4f} on {len(merged)} patches ({a.labels})")
