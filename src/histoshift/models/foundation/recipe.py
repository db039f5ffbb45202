"""A foundation-model recipe: what a model card prescribes, written out next to the model's name.

The recipe, not a downloaded config, decides the normalisation, the input side and resize rule, the
embedding rule and the precision; the architecture fields (`architecture`, `arch_kwargs`,
`create_kwargs`) let the full-size model be built without the hub (on the meta device in tests, from a
weights file offline). A config names a recipe (`model.recipe`) and may override any field
(`model.recipe_overrides`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

EMBEDDINGS = ("cls", "cls+mean", "mean")  # class token | class token ++ mean patch token | mean patch token
LIBRARIES = ("timm", "transformers")
PRECISIONS = ("bf16", "fp16", "no")
INTERPOLATIONS = ("bicubic", "bilinear")


class RecipeError(ValueError):
    """An unknown recipe, or an override that names no field or has the wrong type."""


@dataclass(frozen=True)
class Recipe:
    name: str            # registry key, e.g. "virchow2"
    title: str           # the model's own name, e.g. "Virchow2"
    hub_id: str          # Hugging Face repo, e.g. "paige-ai/Virchow2"
    card: str            # URL of the model card the fields below come from
    library: str         # "timm" | "transformers"
    # timm: architecture name; transformers: model class in `transformers` (Dinov2Model, ViTModel)
    architecture: str
    # the full-size architecture without the hub: timm model_args as the repo's config.json carries them
    # (plus img_size), or the transformers config fields
    arch_kwargs: dict
    embed_dim: int       # length of the card's embedding (after the embedding rule)
    registers: int       # register tokens between the class token and the patch tokens
    params_m: float      # parameter count in millions, as the card (or its paper) states it
    mean: tuple
    std: tuple
    licence: str
    gated: bool          # the hub asks for an accepted licence and a token
    # creation arguments the card passes on top of the repo's config (timm.create_model kwargs)
    create_kwargs: dict = field(default_factory=dict)
    input_size: int = 224
    interpolation: str = "bicubic"
    crop_pct: float = 1.0  # the card resizes to input_size / crop_pct, then centre-crops input_size
    embedding: str = "cls"
    precision: str = "bf16"  # the autocast dtype on a GPU: the card's where it names one (see `notes`)
    notes: str = ""

    @property
    def tokens(self) -> int:
        """Tokens the backbone returns at `input_size`: class token, registers, patch tokens."""
        patch = (self.arch_kwargs.get("patch_size") or self.create_kwargs.get("patch_size")
                 or int(self.architecture.split("patch")[1][:2]))
        return 1 + self.registers + (self.input_size // patch) ** 2


def check(recipe: Recipe) -> Recipe:
    for name, value, allowed in (("library", recipe.library, LIBRARIES), ("embedding", recipe.embedding, EMBEDDINGS),
                                 ("precision", recipe.precision, PRECISIONS),
                                 ("interpolation", recipe.interpolation, INTERPOLATIONS)):
        if value not in allowed:
            raise RecipeError(f"{recipe.name}: {name} must be one of {allowed}, got '{value}'")
    if len(recipe.mean) != 3 or len(recipe.std) != 3 or min(recipe.std) <= 0:
        raise RecipeError(f"{recipe.name}: mean and std need three values (std > 0)")
    if not 0.5 <= recipe.crop_pct <= 1.0 or recipe.input_size < 32:
        raise RecipeError(f"{recipe.name}: crop_pct in [0.5, 1] and input_size >= 32 expected")
    return recipe


def override(recipe: Recipe, overrides: dict) -> Recipe:
    """The recipe with some fields replaced; mappings (arch_kwargs, create_kwargs) are merged."""
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    changes = {}
    for key, value in overrides.items():
        if key not in fields or key == "name":
            raise RecipeError(f"{recipe.name}: unknown recipe field '{key}' (fields: {', '.join(sorted(fields))})")
        current = getattr(recipe, key)
        if isinstance(current, dict):
            if not isinstance(value, dict):
                raise RecipeError(f"{recipe.name}.{key}: expected a mapping, got {value!r}")
            value = {**current, **value}
        elif isinstance(current, tuple):
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
                raise RecipeError(f"{recipe.name}.{key}: expected a list of numbers, got {value!r}")
            value = tuple(float(v) for v in value)
        elif isinstance(current, bool) or type(current) is str:
            if type(value) is not type(current):
                raise RecipeError(f"{recipe.name}.{key}: expected {type(current).__name__}, got {value!r}")
        elif isinstance(current, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(current, int) and value != int(value)):
                raise RecipeError(f"{recipe.name}.{key}: expected a number, got {value!r}")
            value = type(current)(value)
        changes[key] = value
    return check(dataclasses.replace(recipe, **changes))
