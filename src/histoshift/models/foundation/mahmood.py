"""Mahmood Lab: UNI and UNI2-h (timm).

Cards: https://huggingface.co/MahmoodLab/UNI, https://huggingface.co/MahmoodLab/UNI2-h. Both gated
(CC-BY-NC-ND-4.0: accept the licence on the hub, then set HF_TOKEN). ImageNet mean/std at 224 px,
class-token embedding. Resize rule: both cards' transforms are torchvision's bilinear Resize(224)
(UNI's config.json also says bilinear), UNI2-h's followed by CenterCrop(224) - on our square patches no
crop. UNI2-h's card passes the whole architecture to timm.create_model (ViT-H/14, embed 1536, depth 24,
SwiGLU, 8 registers); those arguments are `create_kwargs` here. The cards name no inference precision;
bf16 is ours.
"""
from .recipe import Recipe

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

RECIPES = (
    Recipe(name="uni", title="UNI", hub_id="MahmoodLab/UNI", card="https://huggingface.co/MahmoodLab/UNI",
           library="timm", architecture="vit_large_patch16_224", arch_kwargs={"img_size": 224, "patch_size": 16},
           create_kwargs={"init_values": 1e-5, "dynamic_img_size": True}, embed_dim=1024, registers=0,
           params_m=303.3, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", licence="CC-BY-NC-ND-4.0",
           gated=True,
           notes="ViT-L/16; card: init_values=1e-5, dynamic_img_size=True; precision not stated (bf16 ours)"),
    Recipe(name="uni2h", title="UNI2-h", hub_id="MahmoodLab/UNI2-h", card="https://huggingface.co/MahmoodLab/UNI2-h",
           library="timm", architecture="vit_giant_patch14_224", arch_kwargs={},
           create_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                          "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True,
                          "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU", "reg_tokens": 8,
                          "dynamic_img_size": True},
           embed_dim=1536, registers=8, params_m=681.0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
           interpolation="bilinear", crop_pct=1.0, licence="CC-BY-NC-ND-4.0", gated=True,
           notes="ViT-H/14 with 8 registers; the card's timm_kwargs; precision not stated (bf16 ours)"),
)
