"""Foundation-model recipes without the hub: (a) every full-size architecture from the recipe alone,
(b) every recipe from a random-weight stand-in in a Hugging Face cache, loaded offline through the
ordinary hub code, embedded, heads trained, stacked and submitted, its embedding checked against a
hand computation with the card's constants, (c) the feature-store key follows every feature setting."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from histoshift.cli import main
from histoshift.models.foundation import RECIPES
from histoshift.models.foundation.build import build_network, recipe_build
from histoshift.models.foundation.loader import FoundationBackbone
from histoshift.models.foundation.standin import standin_overrides, write_standin

from helpers import fm_config

BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))  # Hibou's BitImageProcessor
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # Midnight's card: Normalize(mean=0.5, std=0.5)
# what each card says, written out independently of the recipes:
# hub id, mean/std, input side, resize (interpolation, crop), embedding rule, embedding length, registers
CARDS = {
    "hoptimus0": ("bioptimus/H-optimus-0", BIOPTIMUS, 224, "bicubic", 1.0, "cls", 1536, 4),
    "hoptimus1": ("bioptimus/H-optimus-1", BIOPTIMUS, 224, "bicubic", 1.0, "cls", 1536, 4),
    "h0mini": ("bioptimus/H0-mini", BIOPTIMUS, 224, "bicubic", 1.0, "cls+mean", 1536, 4),
    # UNI: the card's transforms.Resize(224) and the repo's config.json are bilinear; UNI2-h: bilinear
    # Resize(224) + CenterCrop(224) (no crop on a square patch)
    "uni": ("MahmoodLab/UNI", IMAGENET, 224, "bilinear", 1.0, "cls", 1024, 0),
    "uni2h": ("MahmoodLab/UNI2-h", IMAGENET, 224, "bilinear", 1.0, "cls", 1536, 8),
    "virchow": ("paige-ai/Virchow", IMAGENET, 224, "bicubic", 1.0, "cls+mean", 2560, 0),
    "virchow2": ("paige-ai/Virchow2", IMAGENET, 224, "bicubic", 1.0, "cls+mean", 2560, 4),
    "phikon": ("owkin/phikon", IMAGENET, 224, "bilinear", 1.0, "cls", 768, 0),
    "phikon2": ("owkin/phikon-v2", IMAGENET, 224, "bicubic", 1.0, "cls", 1024, 0),
    "gigapath": ("prov-gigapath/prov-gigapath", IMAGENET, 224, "bicubic", 0.875, "cls", 1536, 0),
    # MedImageInsight: 2024.09.27/config.yaml (IMAGE_SIZE 480, bicubic, TEST.CENTER_CROP false, DIM_PROJECTION
    # 1024) and UniCLModel.encode_image (pooled @ image_projection, L2 norm); the 2048 pooled features
    "medimageinsight": ("lion-ai/MedImageInsights", IMAGENET, 480, "bicubic", 1.0, "projected", 1024, 0),
    "medimageinsight_pooled": ("lion-ai/MedImageInsights", IMAGENET, 480, "bicubic", 1.0, "pooled", 2048, 0),
    # Midnight-12k's card: Resize(224) (bilinear default) + CenterCrop(224), class token ++ mean patch token
    "midnight": ("kaiko-ai/midnight", HALF, 224, "bilinear", 1.0, "cls+mean", 3072, 0),
    # Hibou: BitImageProcessor, bicubic 224 + centre crop 224, pooler_output = class token; 4 registers
    "hibou_b": ("histai/hibou-b", HIBOU, 224, "bicubic", 1.0, "cls", 768, 4),
    "hibou_l": ("histai/hibou-L", HIBOU, 224, "bicubic", 1.0, "cls", 1024, 4),
    "dinov2_s": ("timm/vit_small_patch14_dinov2.lvd142m", IMAGENET, 224, "bicubic", 1.0, "cls", 384, 0),
    "dinov2_b": ("timm/vit_base_patch14_dinov2.lvd142m", IMAGENET, 224, "bicubic", 1.0, "cls", 768, 0),
    "dinov2_l": ("timm/vit_large_patch14_dinov2.lvd142m", IMAGENET, 224, "bicubic", 1.0, "cls", 1024, 0),
    "dinov2_g": ("timm/vit_giant_patch14_dinov2.lvd142m", IMAGENET, 224, "bicubic", 1.0, "cls", 1536, 0),
}
NAMES = list(RECIPES)


def test_every_recipe_has_its_card_written_out():
    assert set(CARDS) == set(RECIPES)
    for name, (hub, (mean, std), size, interp, crop, rule, dim, regs) in CARDS.items():
        r = RECIPES[name]
        assert (r.hub_id, r.mean, r.std, r.input_size, r.interpolation, r.crop_pct, r.embedding, r.embed_dim,
                r.registers) == (hub, mean, std, size, interp, crop, rule, dim, regs), name
        assert r.card.startswith("https://huggingface.co/") and r.licence


# precision and access, typed from the sources: H-optimus-0/1, H0-mini and Virchow/Virchow2 cards recommend
# float16 autocast; Prov-GigaPath's official pipeline runs the tile encoder under float16 autocast;
# MedImageInsight trained under PyTorch fp16 AMP (its config.yaml); the others name none (bf16 is ours).
# H-optimus-0's model page shows no access gate; MedImageInsight (MIT) and Midnight (MIT) are open.
PRECISION_AND_GATE = {"hoptimus0": ("fp16", False), "hoptimus1": ("fp16", True), "h0mini": ("fp16", True),
                      "virchow": ("fp16", True), "virchow2": ("fp16", True), "gigapath": ("fp16", True),
                      "medimageinsight": ("fp16", False), "midnight": ("bf16", False), "uni": ("bf16", True),
                      "uni2h": ("bf16", True), "phikon": ("bf16", False), "phikon2": ("bf16", False)}


def test_card_precision_access_and_the_cards_own_calls():
    for name, (precision, gated) in PRECISION_AND_GATE.items():
        assert (RECIPES[name].precision, RECIPES[name].gated) == (precision, gated), name
    # Phikon's card: ViTModel.from_pretrained("owkin/phikon", add_pooling_layer=False) - no unused pooler
    assert RECIPES["phikon"].create_kwargs == {"add_pooling_layer": False}
    with torch.device("meta"):
        build = recipe_build(RECIPES["phikon"])
        net = build_network(build, RECIPES["phikon"])
    assert net.pooler is None
    # MedImageInsight: the repo's own files, by path
    mii = RECIPES["medimageinsight"]
    assert (mii.config_file, mii.weights_file, mii.architecture) == (
        "2024.09.27/config.yaml", "2024.09.27/vision_model/medimageinsigt-v1.0.0.pt", "davit_huge_fl")


@pytest.mark.parametrize("name", NAMES)
def test_full_size_architecture_from_the_recipe_alone(name):
    """(a) the card's architecture, built on the meta device by the pinned timm / transformers: token
    layout (class token, registers, patches), embedding length and parameter count."""
    recipe = RECIPES[name]
    with torch.device("meta"):
        build = recipe_build(recipe)
        backbone = FoundationBackbone(recipe, build_network(build, recipe), build)  # checks the embedding length
        x = torch.empty(2, 3, recipe.input_size, recipe.input_size)
        embedding = backbone(x)
        tokens = backbone.tokens(x) if recipe.tokens else None
    if recipe.tokens:  # a ViT: class token, registers, patch tokens
        width = recipe.embed_dim // (2 if recipe.embedding == "cls+mean" else 1)
        assert tuple(tokens.shape) == (2, recipe.tokens, width)
        assert backbone.num_prefix_tokens == 1 + recipe.registers
    assert tuple(embedding.shape) == (2, recipe.embed_dim)
    params = sum(p.numel() for p in backbone.net.parameters()) / 1e6  # the network (a projection comes on top)
    assert abs(params / recipe.params_m - 1) < 0.003, f"{params:.2f}M parameters, the card says {recipe.params_m}M"


def _hand_tokens(recipe_name: str, folder, images: np.ndarray, view: int = 0) -> torch.Tensor:
    """Tokens of uint8 images, computed here from the stand-in's own files and the card's constants
    above: dihedral view, resize (bicubic / bilinear, crop), normalise, the network."""
    hub, (mean, std), size, interp, crop, rule, _, registers = CARDS[recipe_name]
    recipe = RECIPES[recipe_name]
    config = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    if recipe.library == "timm":
        import timm

        from histoshift.models.foundation.build import resolve_layer

        kwargs = {**config["model_args"], **{k: resolve_layer(k, v) for k, v in recipe.create_kwargs.items()},
                  **standin_overrides(recipe).get("create_kwargs", {})}
        net = timm.create_model(config["architecture"], num_classes=0, **kwargs)
    else:
        import transformers

        # transformers' own loader: it maps the hub's legacy key names (attention.attention.query ...); Hibou's
        # repo names its own code (Dinov2ModelWithRegisters), whose native twin is Dinov2WithRegistersModel
        native = {"Dinov2ModelWithRegisters": "Dinov2WithRegistersModel"}.get(config["architectures"][0],
                                                                              config["architectures"][0])
        net = getattr(transformers, native).from_pretrained(folder, **recipe.create_kwargs)
    if recipe.library == "timm":
        net.load_state_dict(state)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = torch.rot90(x, view % 4, dims=(-2, -1))
    x = torch.flip(x, dims=(-1,)) if view >= 4 else x
    big = round(size / crop)
    x = F.interpolate(x, size=(big, big), mode=interp, align_corners=False, antialias=True)
    x = x.clamp(0, 1)[..., (big - size) // 2:(big - size) // 2 + size, (big - size) // 2:(big - size) // 2 + size]
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        return net.forward_features(x) if recipe.library == "timm" else net(pixel_values=x).last_hidden_state


def _hand_unicl(recipe_name: str, folder, images: np.ndarray, view: int = 0) -> torch.Tensor:
    """MedImageInsight's embedding by hand from the stand-in's own files: its config.yaml sizes a timm DaViT,
    timm's own Florence-2 converter (not ours) renames the tower, then the mean pool, the `norms` LayerNorm,
    `image_projection` and the L2 norm of UniCLModel.encode_image ('pooled' stops before the projection)."""
    import timm
    from timm.models.davit import checkpoint_filter_fn

    recipe = RECIPES[recipe_name]
    spec = yaml.safe_load((folder / recipe.config_file).read_text())["IMAGE_ENCODER"]["SPEC"]
    net = timm.create_model("davit_huge_fl", num_classes=0, depths=spec["DEPTHS"], embed_dims=spec["DIM_EMBED"],
                            num_heads=spec["NUM_HEADS"], window_size=spec["WINDOW_SIZE"])
    state = load_file(str(folder / recipe.weights_file))  # safetensors content under a .pt name
    tower = {"vision_tower." + k.removeprefix("image_encoder."): v for k, v in state.items()
             if k.startswith("image_encoder.") and not k.startswith("image_encoder.norms.")}
    missing = net.load_state_dict(checkpoint_filter_fn(tower, net), strict=False).missing_keys
    assert missing == ["head.norm.weight", "head.norm.bias"]  # the one layer timm's converter leaves out
    _, (mean, std), size, interp, *_ = CARDS[recipe_name]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = torch.rot90(x, view % 4, dims=(-2, -1))
    x = torch.flip(x, dims=(-1,)) if view >= 4 else x
    x = F.interpolate(x, size=(size, size), mode=interp, align_corners=False, antialias=True).clamp(0, 1)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        maps = net.forward_features(x)  # B x C x H x W
    width = maps.shape[1]
    pooled = F.layer_norm(maps.mean((2, 3)), (width,), state["image_encoder.norms.weight"],
                          state["image_encoder.norms.bias"], eps=1e-5)
    if recipe.embedding == "pooled":
        return pooled
    projected = pooled @ state["image_projection"]
    return projected / projected.norm(dim=-1, keepdim=True)


def _card_rule(recipe_name: str, tokens: torch.Tensor) -> torch.Tensor:
    """The card's embedding by hand: class token, or class token ++ mean of the tokens after the registers."""
    *_, rule, _, registers = CARDS[recipe_name]
    cls, patches = tokens[:, 0], tokens[:, 1 + registers:]
    assert patches.shape[1] == RECIPES[recipe_name].tokens - 1 - registers
    return torch.cat([cls, patches.mean(1)], -1) if rule == "cls+mean" else cls


def test_pooled_medimageinsight_is_the_hand_computation(hf_cache):
    """The `pooled` rule (the pipeline test below runs `projected`; the two share everything else)."""
    from histoshift.models.foundation.loader import load_foundation

    name = "medimageinsight_pooled"
    folder = write_standin(RECIPES[name], hf_cache)
    images = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    backbone = load_foundation(RECIPES[name], "hub")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        got = backbone(backbone.preprocess(x))
    torch.testing.assert_close(got, _hand_unicl(name, folder, images), atol=1e-4, rtol=1e-4)


# one recipe per code path: the left-out ones differ from a kept one only in size (dinov2_b/l/g from dinov2_s,
# hibou_l from hibou_b) or not at all in how they embed (hoptimus1 from hoptimus0); every recipe's card,
# architecture and local copies are still tested one by one above and in test_foundation_from_hub_folder_file.py
SAME_PATH = {"medimageinsight_pooled", "dinov2_b", "dinov2_l", "dinov2_g", "hibou_l", "hoptimus1"}


@pytest.mark.parametrize("name", [n for n in NAMES if n not in SAME_PATH])
@pytest.mark.slow
def test_standin_from_a_hub_cache_runs_the_pipeline_offline(name, prepared_root, hf_cache, tmp_path, capsys):
    """(b) the stand-in loads through the ordinary hub path with HF_HUB_OFFLINE=1; the stored features
    are the card's embedding of the card's preprocessing; heads, stack and submission follow."""
    folder = write_standin(RECIPES[name], hf_cache)
    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    fm_config(tmp_path / f"fm_{name}.yaml", name)
    r = ["--root", str(root)]
    assert main(r + ["train", "--config", str(tmp_path / f"fm_{name}.yaml")]) == 0
    assert "STAND-IN" in capsys.readouterr().out  # never mistaken for the real model
    (store,) = (root / "work" / "features").iterdir()
    meta = json.loads((store / "meta.json").read_text())
    assert meta["spec"]["backbone"]["recipe"]["name"] == name
    assert meta["spec"]["backbone"]["weights"]["revision"] == folder.name
    val = np.load(store / "features_val.npy")
    test = np.load(store / "features_test.npy")
    assert val.shape[1] == 8 + 2 and test.shape[1] == 8  # HED views for labelled patches only
    from histoshift.data.cache import Cache

    images = np.array(Cache.open(root / "work" / "cache").images("val")[:3])
    for view in (0, 5):
        stored = torch.from_numpy(val[:3, view]).float()
        if RECIPES[name].adapter:
            torch.testing.assert_close(stored, _hand_unicl(name, folder, images, view), atol=5e-3, rtol=5e-3)
            continue
        tokens = _hand_tokens(name, folder, images, view)
        right = _card_rule(name, tokens)
        torch.testing.assert_close(stored, right, atol=5e-3, rtol=5e-3)  # float16 storage
        if RECIPES[name].embedding == "cls+mean" and RECIPES[name].registers:  # registers really left out
            with_registers = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1)
            assert (stored - right).abs().max() * 3 < (stored - with_registers).abs().max()
    assert main(r + ["infer"]) == 0 and main(r + ["stack"]) == 0
    assert main(r + ["submit", "--allow-degenerate"]) == 0  # random stand-in features may give one class
    sub = pd.read_csv(root / "submissions" / "submission.csv")
    ids = Cache.open(root / "work" / "cache").index.query("split == 'test'").id
    assert set(sub.ID) == set(ids) and set(sub.Pred) <= {0, 1}
