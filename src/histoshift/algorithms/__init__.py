"""Algorithms by name: outputs and losses behind one interface (see base.py)."""
from .aiva import AIVA, DANN_AIVA
from .base import Algorithm
from .dann import DANN
from .debias import CLGR, LNTL, TABE
from .erm import ERM

ALGORITHMS: dict[str, type[Algorithm]] = {"erm": ERM, "dann": DANN, "lntl": LNTL, "tabe": TABE, "clgr": CLGR,
                                         "aiva": AIVA, "dann_aiva": DANN_AIVA}

__all__ = ["ALGORITHMS", "Algorithm", "ERM", "DANN", "LNTL", "TABE", "CLGR", "AIVA", "DANN_AIVA"]
