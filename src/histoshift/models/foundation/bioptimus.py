"""Bioptimus: H-optimus-0, H-optimus-1, H0-mini (timm).

Cards: https://huggingface.co/bioptimus/H-optimus-0, https://huggingface.co/bioptimus/H-optimus-1,
https://huggingface.co/bioptimus/H0-mini. All three normalise with Bioptimus' own mean/std (not
ImageNet's), take 224 px tiles at 0.5 um/px and recommend float16 autocast for inference. H-optimus-0/1
embed with the class token (timm's pooled output, 1536 values); H0-mini's card concatenates the class
token with the mean of the patch tokens after the 4 registers (768 + 768). Access: H-optimus-0 (Apache-2.0)
is not gated - its model page shows no access form (its card's code calls login() all the same);
H-optimus-1 and H0-mini ask for an access request.
"""
from .recipe import Recipe

MEAN = (0.707223, 0.578729, 0.703617)
STD = (0.211883, 0.230117, 0.177517)

_H_OPTIMUS = dict(
    library="timm", architecture="vit_giant_patch14_reg4_dinov2", arch_kwargs={"img_size": 224},
    create_kwargs={"init_values": 1e-5, "dynamic_img_size": False}, embed_dim=1536, registers=4,
    params_m=1134.8, mean=MEAN, std=STD, embedding="cls", precision="fp16",
    notes="ViT-g/14 with 4 registers; card: timm.create_model(hf-hub, init_values=1e-5, dynamic_img_size=False), "
          "float16 autocast",
)

RECIPES = (
    Recipe(name="hoptimus0", title="H-optimus-0", hub_id="bioptimus/H-optimus-0",
           card="https://huggingface.co/bioptimus/H-optimus-0", licence="Apache-2.0",
           gated=False, **_H_OPTIMUS),  # its model page shows no access gate (H-optimus-1 and H0-mini have one)
    Recipe(name="hoptimus1", title="H-optimus-1", hub_id="bioptimus/H-optimus-1",
           card="https://huggingface.co/bioptimus/H-optimus-1", licence="CC-BY-NC-ND-4.0", gated=True, **_H_OPTIMUS),
    Recipe(name="h0mini", title="H0-mini", hub_id="bioptimus/H0-mini", card="https://huggingface.co/bioptimus/H0-mini",
           library="timm", architecture="vit_base_patch14_reg4_dinov2",
           arch_kwargs={"img_size": 224, "mlp_ratio": 5.33334, "init_values": 1e-5, "dynamic_img_size": True},
           create_kwargs={"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"},
           embed_dim=1536, registers=4, params_m=85.7, mean=MEAN, std=STD, embedding="cls+mean", precision="fp16",
           licence="CC-BY-NC-ND-4.0", gated=True,
           notes="ViT-B/14 distilled from H-optimus-0; card: SwiGLUPacked + SiLU, class token ++ mean patch token"),
)
