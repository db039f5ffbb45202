"""Paige: Virchow and Virchow2 (timm).

Cards: https://huggingface.co/paige-ai/Virchow, https://huggingface.co/paige-ai/Virchow2. Both gated.
The repos' configs set global_pool="" (the model returns every token: 1 x 257 / 261 x 1280); the cards
build the tile embedding from the class token concatenated with the mean of the patch tokens, leaving
out Virchow2's 4 register tokens: 2 x 1280 = 2560 values. timm.create_model needs
mlp_layer=SwiGLUPacked, act_layer=SiLU; ImageNet mean/std, 224 px, bicubic; float16 autocast.
"""
from .recipe import Recipe

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_VIRCHOW = dict(
    library="timm", architecture="vit_huge_patch14_224",
    create_kwargs={"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"},
    embed_dim=2560, params_m=631.2, mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding="cls+mean", precision="fp16",
    gated=True,
)
_ARGS = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True}

RECIPES = (
    Recipe(name="virchow", title="Virchow", hub_id="paige-ai/Virchow", card="https://huggingface.co/paige-ai/Virchow",
           arch_kwargs=_ARGS, registers=0, licence="Apache-2.0",
           notes="ViT-H/14; class token ++ mean of the 256 patch tokens", **_VIRCHOW),
    Recipe(name="virchow2", title="Virchow2", hub_id="paige-ai/Virchow2", card="https://huggingface.co/paige-ai/Virchow2",
           arch_kwargs={**_ARGS, "reg_tokens": 4}, registers=4, licence="CC-BY-NC-ND-4.0",
           notes="ViT-H/14 with 4 registers (tokens 1-4, left out); class token ++ mean patch token", **_VIRCHOW),
)
