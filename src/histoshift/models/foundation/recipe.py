"""A foundation-model recipe: what a model card prescribes, written out next to the model's name.

The recipe, not a downloaded config, decides the normalisation, the input side and resize rule, the
embedding rule and the precision; the architecture fields (`architecture`, `arch_kwargs`,
`create_kwargs`) let the full-size model be built without the hub (on the meta device in tests, from a
weights file offline). A config names a recipe (`model.recipe`) and may override any field
(`model.recipe_overrides`).
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from ...errors import HistoshiftError

# class token | class token ++ mean patch token | mean patch token | the network's pooled features (timm's
# pre-logits: a CNN or DaViT pools and normalises) | those, times the card's projection, L2-normalised
EMBEDDINGS = ("cls", "cls+mean", "mean", "pooled", "projected")
LIBRARIES = ("timm", "transformers")
PRECISIONS = ("bf16", "fp16", "no")
INTERPOLATIONS = ("bicubic", "bilinear")
Triple = tuple[float, float, float]
STANDIN_KEY = "histoshift_standin"  # config marker of a random-weight stand-in (see standin.py)


class RecipeError(HistoshiftError, ValueError):
    """An unknown recipe, or an override that names no field or has the wrong type."""


# pydantic validates every recipe (the vendors' and every overridden one): types, literals and ranges
@dataclass(frozen=True, config=ConfigDict(extra="forbid", allow_inf_nan=False))
class Recipe:
    name: str            # registry key, e.g. "virchow2"
    title: str           # the model's own name, e.g. "Virchow2"
    hub_id: str          # Hugging Face repo, e.g. "paige-ai/Virchow2"
    card: str            # URL of the model card the fields below come from
    library: Literal[LIBRARIES]
    # timm: architecture name; transformers: model class in `transformers` (Dinov2Model, ViTModel)
    architecture: str
    # the full-size architecture without the hub: timm model_args as the repo's config.json carries them
    # (plus img_size), or the transformers config fields
    arch_kwargs: dict
    embed_dim: int       # length of the card's embedding (after the embedding rule)
    registers: int       # register tokens between the class token and the patch tokens
    params_m: float      # parameter count in millions, as the card (or its paper) states it
    mean: Triple
    std: Triple
    licence: str
    gated: bool          # the hub asks for an accepted licence and a token
    # creation arguments the card passes on top of the repo's config (timm.create_model kwargs)
    create_kwargs: dict = dataclasses.field(default_factory=dict)
    input_size: Annotated[int, Field(ge=32)] = 224
    interpolation: Literal[INTERPOLATIONS] = "bicubic"
    # the card resizes to input_size / crop_pct, then centre-crops input_size
    crop_pct: Annotated[float, Field(ge=0.5, le=1.0)] = 1.0
    embedding: Literal[EMBEDDINGS] = "cls"
    precision: Literal[PRECISIONS] = "bf16"  # the autocast dtype on a GPU: the card's where it names one
    notes: str = ""
    # a repo that is neither a timm nor a transformers repo (MedImageInsight: another codebase's files):
    # its architecture file and weights file inside the repo, and the adapter (foundation/adapters.py)
    # that reads the one and renames the other's keys onto `architecture`
    config_file: str = "config.json"
    weights_file: str = ""
    adapter: str = ""
    # config.json entries of the hub repo that differ from what the native class writes (Hibou's repos name
    # their own code): stand-ins write them, so that tests load the layout users download
    hub_config: dict = dataclasses.field(default_factory=dict)

    @field_validator("std")
    @classmethod
    def _positive(cls, std):
        if min(std) <= 0:
            raise ValueError("std values must be > 0")
        return std

    @field_validator("create_kwargs")
    @classmethod
    def _no_hub_code(cls, kwargs):
        if kwargs.get("trust_remote_code"):
            raise ValueError("trust_remote_code is refused: histoshift never runs code from the hub; a model "
                             "that needs it has no recipe here until a native timm / transformers class loads it")
        return kwargs

    @model_validator(mode="after")
    def _input_size(self):
        """A transformers ViT takes what its patch embedding can: checked when the config is read, not as a
        traceback at embedding time (timm networks are checked once built: loader.check_input_size)."""
        patch, side = self.arch_kwargs.get("patch_size"), self.arch_kwargs.get("image_size")
        if self.library == "transformers" and patch and self.input_size % patch:
            raise ValueError(f"input_size {self.input_size}: not a multiple of {self.title}'s patch size {patch}")
        if self.library == "transformers" and self.architecture == "ViTModel" and side and self.input_size != side:
            raise ValueError(f"input_size {self.input_size}: {self.title}'s ViTModel takes {side}x{side} inputs (its "
                             f"position embeddings are not interpolated); keep input_size {side}")
        return self

    @property
    def tokens(self) -> int | None:
        """Tokens a ViT returns at `input_size`: class token, registers, patch tokens (None: not a ViT)."""
        if "patch" not in self.architecture and "patch_size" not in {**self.arch_kwargs, **self.create_kwargs}:
            return None
        patch = (self.arch_kwargs.get("patch_size") or self.create_kwargs.get("patch_size")
                 or int(self.architecture.split("patch")[1][:2]))
        return 1 + self.registers + (self.input_size // patch) ** 2


def override(recipe: Recipe, overrides: dict) -> Recipe:
    """The recipe with some fields replaced (mappings such as arch_kwargs and create_kwargs are merged),
    validated like every recipe."""
    fields = {f.name for f in dataclasses.fields(Recipe)}
    current = dataclasses.asdict(recipe)
    for key, value in overrides.items():
        if key not in fields or key == "name":
            raise RecipeError(f"{recipe.name}: unknown recipe field '{key}' (fields: {', '.join(sorted(fields))})")
        if isinstance(current[key], dict):
            if not isinstance(value, dict):
                raise RecipeError(f"{recipe.name}.{key}: expected a mapping, got {value!r}")
            value = {**current[key], **value}
        current[key] = value
    try:
        return Recipe(**current)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        if not where:  # a rule across fields (the validators above): their own words
            raise RecipeError(f"{recipe.name}: {err.get('ctx', {}).get('error', err['msg'])}") from None
        raise RecipeError(f"{recipe.name}.{where}: {err['msg']}, got {err.get('input')!r}") from None
