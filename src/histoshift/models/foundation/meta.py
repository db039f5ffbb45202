"""Meta: DINOv2 (timm's hub copies; natural images, no pathology pretraining - a baseline).

Card: https://huggingface.co/timm/vit_large_patch14_dinov2.lvd142m (and the -small/-base/-giant
siblings); original weights https://github.com/facebookresearch/dinov2. Apache-2.0, not gated.
ImageNet mean/std, bicubic, class-token embedding; trained at 518 px (the positional embedding is
interpolated for 224 px with dynamic_img_size). The cards name no precision; bf16 is ours.
"""
from .recipe import Recipe

_SIZES = {  # name: (timm architecture, embedding dim, parameters in millions)
    "dinov2_s": ("vit_small_patch14_dinov2", 384, 22.1),
    "dinov2_b": ("vit_base_patch14_dinov2", 768, 86.6),
    "dinov2_l": ("vit_large_patch14_dinov2", 1024, 304.4),
    "dinov2_g": ("vit_giant_patch14_dinov2", 1536, 1136.5),
}

RECIPES = tuple(
    Recipe(name=name, title=f"DINOv2 {arch.split('_')[1]}", hub_id=f"timm/{arch}.lvd142m",
           card=f"https://huggingface.co/timm/{arch}.lvd142m", library="timm", architecture=arch,
           arch_kwargs={"img_size": 518}, create_kwargs={"dynamic_img_size": True}, embed_dim=dim, registers=0,
           params_m=params, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), licence="Apache-2.0", gated=False,
           notes="natural-image DINOv2; class token")
    for name, (arch, dim, params) in _SIZES.items()
)
