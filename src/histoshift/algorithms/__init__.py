"""Algorithms by name: outputs and losses behind one interface (see base.py)."""
from .base import Algorithm
from .dann import DANN
from .erm import ERM

ALGORITHMS: dict[str, type[Algorithm]] = {"erm": ERM, "dann": DANN}

__all__ = ["ALGORITHMS", "Algorithm", "ERM", "DANN"]
