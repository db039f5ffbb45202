"""Weights from another codebase (MedImageInsight's UniCL files) and native classes for repos that ship
their own code (Hibou): the key map typed from the sources, strict loading (a renamed, missing, extra or
misshaped tensor stops with one line naming it), both key namings, safetensors content under a `.pt` name,
the text tower never read, and trust_remote_code refused."""
from __future__ import annotations

import json
import pathlib

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from histoshift.cli import main
from histoshift.models.foundation import RECIPES, resolve_recipe
from histoshift.models.foundation.adapters import ADAPTERS
from histoshift.models.foundation.loader import load_foundation
from histoshift.models.foundation.recipe import RecipeError
from histoshift.models.foundation.standin import write_standin
from histoshift.models.weights import WeightsError, read_state_dict

UNICL = ADAPTERS["unicl-davit"]
MII = RECIPES["medimageinsight"]

# the map as the sources state it (MedImageInsight's davit_v1.py names; timm's davit.py names), typed here
CURRENT = {
    "convs.0.proj.weight": "stem.conv.weight",
    "convs.0.norm.bias": "stem.norm.bias",
    "convs.2.proj.weight": "stages.2.downsample.conv.weight",
    "convs.3.norm.weight": "stages.3.downsample.norm.weight",
    "blocks.2.7.spatial_block.conv1.fn.dw.weight": "stages.2.blocks.7.spatial_block.cpe1.proj.weight",
    "blocks.2.7.spatial_block.window_attn.norm.weight": "stages.2.blocks.7.spatial_block.norm1.weight",
    "blocks.2.7.spatial_block.window_attn.fn.qkv.weight": "stages.2.blocks.7.spatial_block.attn.qkv.weight",
    "blocks.2.7.spatial_block.window_attn.fn.proj.bias": "stages.2.blocks.7.spatial_block.attn.proj.bias",
    "blocks.2.7.spatial_block.conv2.fn.dw.bias": "stages.2.blocks.7.spatial_block.cpe2.proj.bias",
    "blocks.2.7.spatial_block.ffn.norm.bias": "stages.2.blocks.7.spatial_block.norm2.bias",
    "blocks.2.7.spatial_block.ffn.fn.net.fc1.weight": "stages.2.blocks.7.spatial_block.mlp.fc1.weight",
    "blocks.0.0.channel_block.channel_attn.norm.weight": "stages.0.blocks.0.channel_block.norm1.weight",
    "blocks.0.0.channel_block.channel_attn.fn.qkv.bias": "stages.0.blocks.0.channel_block.attn.qkv.bias",
    "blocks.3.0.channel_block.ffn.fn.net.fc2.weight": "stages.3.blocks.0.channel_block.mlp.fc2.weight",
    "norms.weight": "head.norm.weight",
}
# the older naming of the same layers (davit_v1.py's _try_remap_keys)
OLD = {
    "conv_embeds.1.proj.weight": "stages.1.downsample.conv.weight",
    "main_blocks.2.3.0.cpe.0.proj.weight": "stages.2.blocks.3.spatial_block.cpe1.proj.weight",
    "main_blocks.2.3.0.attn.qkv.weight": "stages.2.blocks.3.spatial_block.attn.qkv.weight",
    "main_blocks.2.3.0.norm1.bias": "stages.2.blocks.3.spatial_block.norm1.bias",
    "main_blocks.2.3.0.cpe.1.proj.bias": "stages.2.blocks.3.spatial_block.cpe2.proj.bias",
    "main_blocks.2.3.0.norm2.weight": "stages.2.blocks.3.spatial_block.norm2.weight",
    "main_blocks.2.3.0.mlp.fc1.bias": "stages.2.blocks.3.spatial_block.mlp.fc1.bias",
    "main_blocks.2.10.1.attn.proj.weight": "stages.2.blocks.10.channel_block.attn.proj.weight",
    "main_blocks.2.10.1.norm1.weight": "stages.2.blocks.10.channel_block.norm1.weight",
}


def test_the_key_map_is_the_sources():
    for theirs, ours in {**CURRENT, **OLD}.items():
        assert UNICL.timm_key(theirs, "f") == ours, theirs
    with pytest.raises(WeightsError, match="cannot map key blocks.0.0.spatial_block.lora.weight"):
        UNICL.timm_key("blocks.0.0.spatial_block.lora.weight", "f")


def test_every_full_size_tensor_has_exactly_one_source_name():
    """All 402 tensors of timm's davit_huge_fl: named in MedImageInsight's layout, mapped back one to one."""
    net = timm.create_model("davit_huge_fl", num_classes=0, device="meta")
    keys = list(net.state_dict())
    hub = [UNICL.hub_key(k) for k in keys]
    assert len(keys) == 402 and len(set(hub)) == 402 and all(h.startswith("image_encoder.") for h in hub)
    assert [UNICL.timm_key(h.removeprefix("image_encoder."), "f") for h in hub] == keys


ORIGINAL = pathlib.Path(__file__).parent / "data" / "medimageinsight_2024.09.27_image_tower.txt"


def _original_checkpoint() -> dict[str, torch.Tensor]:
    """The real checkpoint's image tower as the original model code names and shapes it (data/: listed once from
    MedImageInsight's own davit_v1.py and UniCLModel.py), as meta tensors (no weights, no memory)."""
    out = {}
    for line in ORIGINAL.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split()
            out[name] = torch.empty([int(s) for s in shape.split("x")], device="meta")
    return out


def test_the_adapter_maps_the_original_checkpoint_onto_the_network_it_builds(tmp_path):
    """Not the adapter's own inverse: the complete key list of the original model, through the adapter, is exactly
    the state dict of the network the adapter builds from the original config - every tensor, every shape."""
    from histoshift.models.foundation.build import build_network, timm_build

    original = _original_checkpoint()
    assert len(original) == 403 and sum(k.startswith("image_encoder.") for k in original) == 402
    config = tmp_path / "config.yaml"
    config.write_text("IMAGE_ENCODER:\n  NAME: davit_v1\n  IMAGE_SIZE: [480, 480]\n  SPEC:\n"
                      "    DIM_EMBED: [256, 512, 1024, 2048]\n    NUM_HEADS: [8, 16, 32, 64]\n"
                      "    NUM_GROUPS: [8, 16, 32, 64]\n    DEPTHS: [1, 1, 9, 1]\n    WINDOW_SIZE: 12\n"
                      "UNICL_MODEL:\n  DIM_PROJECTION: 1024\n")
    build = timm_build(MII, UNICL.read_config(config))
    with torch.device("meta"):
        net = build_network(build, MII)
    encoder, projection = UNICL.convert({k: v for k, v in original.items() if UNICL.keep(k)}, "original")
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in encoder.items()} == want
    assert tuple(projection.shape) == (net.num_features, build["projection_dim"]) == (2048, 1024)


def _mii_cache(hf_cache):
    folder = write_standin(MII, hf_cache)
    return folder, folder / MII.weights_file


def _embed(recipe, weights="hub"):
    backbone = load_foundation(recipe, weights)
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return backbone(backbone.preprocess(x))


def test_the_hub_file_is_safetensors_under_a_pt_name_and_the_text_tower_is_never_read(hf_cache):
    _, path = _mii_cache(hf_cache)
    assert path.suffix == ".pt" and path.read_bytes()[8:9] == b"{"
    everything = read_state_dict(path)
    assert {"lang_projection", "logit_scale", "lang_encoder.token_embedding.weight"} <= set(everything)
    kept = read_state_dict(path, keep=UNICL.keep)
    assert "image_projection" in kept and not any(k.startswith(("lang", "logit")) for k in kept)
    # a torch file is still read (weights_only) by its own loader
    torch.save({"a": torch.ones(2)}, path.parent / "plain.pt")
    assert read_state_dict(path.parent / "plain.pt")["a"].tolist() == [1.0, 1.0]


def test_projected_and_pooled_embeddings(hf_cache):
    folder, path = _mii_cache(hf_cache)
    projected = _embed(MII)
    torch.testing.assert_close(projected.norm(dim=-1), torch.ones(2))  # L2-normalised
    pooled = _embed(RECIPES["medimageinsight_pooled"])
    state = load_file(str(path))
    hand = pooled @ state["image_projection"]
    torch.testing.assert_close(projected, hand / hand.norm(dim=-1, keepdim=True))
    assert pooled.shape[1] == state["image_projection"].shape[0]


@pytest.mark.parametrize("fault, message", [
    ("rename", "does not exist in the model"),      # a key of another layout: extra
    ("drop", "missing from the source"),            # a tower tensor gone
    ("shape", "has shape"),                         # a tensor of another size
    ("projection", "no image_projection"),          # not a UniCL checkpoint
    ("alien", "cannot map key"),                    # an image-encoder key of no known naming
])
def test_strict_loading_names_the_tensor(hf_cache, fault, message):
    _, path = _mii_cache(hf_cache)
    state = load_file(str(path))
    key = "image_encoder.blocks.2.0.spatial_block.window_attn.fn.qkv.weight"
    if fault == "rename":
        state["image_encoder.blocks.2.0.spatial_block.window_attn.fn.qkv_extra.weight"] = state.pop(key)
    elif fault == "drop":
        del state[key]
    elif fault == "shape":
        state[key] = state[key][:-1].clone()
    elif fault == "projection":
        del state["image_projection"]
    else:
        state["image_encoder.blocks.2.0.spatial_block.lora_a.weight"] = state[key].clone()
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=message) as e:
        load_foundation(MII, "hub")
    assert "\n" not in str(e.value)
    if fault in ("drop", "shape"):
        assert "stages.2.blocks.0.spatial_block.attn.qkv.weight" in str(e.value)


def test_the_older_naming_loads_the_same_weights(hf_cache, tmp_path):
    """visual.* / vision_projection / conv_embeds / main_blocks.i.j.{0,1}.* (UniCLModel._convert_old_weights,
    davit_v1._try_remap_keys) give the same embedding as the current names."""
    _, path = _mii_cache(hf_cache)
    want = _embed(MII)
    current = {k: v for k, v in load_file(str(path)).items() if UNICL.keep(k)}
    spatial = {"conv1.fn.dw": "cpe.0.proj", "window_attn.fn": "attn", "conv2.fn.dw": "cpe.1.proj",
               "ffn.fn.net": "mlp", "window_attn.norm": "norm1", "ffn.norm": "norm2"}
    channel = {k.replace("window_attn", "channel_attn"): v for k, v in spatial.items()}
    old = {}
    for key, value in current.items():
        if key == "image_projection":
            old["vision_projection"] = value
            continue
        key = key.replace("image_encoder.", "visual.").replace("visual.convs.", "visual.conv_embeds.")
        for block, index, table in (("spatial_block", "0", spatial), ("channel_block", "1", channel)):
            if f".{block}." in key:
                head, tail = key.split(f".{block}.")
                layer = next(layer for layer in sorted(table, key=len, reverse=True) if tail.startswith(layer + "."))
                renamed = head.replace('visual.blocks.', 'visual.main_blocks.')
                key = f"{renamed}.{index}.{table[layer]}{tail[len(layer):]}"
        old[key] = value
    assert any(k.startswith("visual.main_blocks.") for k in old) and "vision_projection" in old
    save_file(old, str(path))
    torch.testing.assert_close(_embed(MII), want)


def test_a_config_yaml_that_timm_cannot_build_is_one_line(hf_cache):
    import yaml

    folder, _ = _mii_cache(hf_cache)
    config = yaml.safe_load((folder / MII.config_file).read_text())
    config["IMAGE_ENCODER"]["SPEC"]["PATCH_SIZE"] = [7, 2, 2, 2]
    (folder / MII.config_file).write_text(yaml.safe_dump(config))
    with pytest.raises(WeightsError, match="PATCH_SIZE is \\[7, 2, 2, 2\\]"):
        load_foundation(MII, "hub")
    (folder / MII.config_file).write_text("IMAGE_ENCODER: [unclosed")
    with pytest.raises(WeightsError, match="not a MedImageInsight config.yaml"):
        load_foundation(MII, "hub")


def test_a_repo_whose_weights_do_not_fit_the_native_class_is_refused(hf_cache):
    """Hibou's repo names its own code; the native Dinov2WithRegistersModel loads it strictly."""
    recipe = RECIPES["hibou_b"]
    folder = write_standin(recipe, hf_cache)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "dinov2" and "auto_map" in config  # the repo's own layout
    assert _embed(recipe).shape == (2, 32)
    state = load_file(str(folder / "model.safetensors"))
    state["embeddings.extra_tokens"] = state.pop("embeddings.register_tokens")  # e.g. its own register naming
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="missing from the weights.*embeddings.register_tokens"):
        load_foundation(recipe, "hub")


def test_trust_remote_code_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(RecipeError, match="trust_remote_code is refused"):
        resolve_recipe("hibou_b", {"create_kwargs": {"trust_remote_code": True}})
    config = tmp_path / "c.yaml"
    config.write_text("model: {recipe: hibou_b, weights: hub, kind: feature, "
                      "recipe_overrides: {create_kwargs: {trust_remote_code: true}}}\n")
    assert main(["--root", str(tmp_path / "root"), "embed", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trust_remote_code is refused" in err[0]
