"""Typed experiment configuration: one YAML file per experiment plus `key.sub=value` overrides.

The sections are pydantic models (base.py, sections.py, model.py): every field has a type, a default and (where
it has one) its range or its allowed values next to it. The model section's shape follows its kind (`model.kind`:
image | feature, a tagged union). Unknown keys, wrong types, NaN/inf and out-of-range values raise `ConfigError`
naming the key, so a typo never silently trains the wrong model. Names that live in a registry (a foundation
recipe and its overrides) are checked by the stages that use them (`tasks.load_experiment`), so this package
imports no registry (and nothing that imports torch).
"""
from __future__ import annotations

from .base import TRACKERS, ConfigError, Float, Int, NonNeg, tracker_names
from .io import load_config, save_config
from .model import FEATURE_SHIFTS, KINDS, MODEL_KINDS, BackboneCfg, FeatureModelCfg, ImageModelCfg, ModelCfg
from .schema import Config, validated
from .sections import (ALGORITHM_NAMES, EXTRA_OPTIMIZERS, AlgorithmCfg, AugCfg, OptimCfg, StainGanCfg, TrainCfg,
                       optimizer_names)

__all__ = ["ALGORITHM_NAMES", "EXTRA_OPTIMIZERS", "FEATURE_SHIFTS", "KINDS", "MODEL_KINDS", "TRACKERS", "AlgorithmCfg",
           "AugCfg", "BackboneCfg", "Config", "ConfigError", "FeatureModelCfg", "Float", "ImageModelCfg", "Int",
           "ModelCfg", "NonNeg", "OptimCfg", "StainGanCfg", "TrainCfg", "load_config", "optimizer_names",
           "save_config", "tracker_names", "validated"]

