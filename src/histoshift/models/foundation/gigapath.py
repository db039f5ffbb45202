"""Providence / Microsoft: Prov-GigaPath's tile encoder (timm).

Card: https://huggingface.co/prov-gigapath/prov-gigapath. Gated (accept the terms, then HF_TOKEN),
Apache-2.0. timm.create_model("hf_hub:prov-gigapath/prov-gigapath", pretrained=True): a ViT-g with
16 px patches, class-token embedding of 1536 values. Preprocessing: resize to 256 (bicubic), centre
crop 224, ImageNet mean/std (crop_pct 0.875). Precision: the official pipeline (the prov-gigapath
repository's tile-encoder inference) runs the tile encoder under float16 autocast; so does this recipe.
"""
from .recipe import Recipe

RECIPES = (
    Recipe(name="gigapath", title="Prov-GigaPath", hub_id="prov-gigapath/prov-gigapath",
           card="https://huggingface.co/prov-gigapath/prov-gigapath", library="timm",
           architecture="vit_giant_patch14_dinov2",
           arch_kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                        "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334},
           embed_dim=1536, registers=0, params_m=1134.8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
           crop_pct=0.875, precision="fp16", licence="Apache-2.0", gated=True,
           notes="ViT-g/16 tile encoder; class token; fp16 autocast as the official pipeline"),
)
