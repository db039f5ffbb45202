"""kaiko.ai: Midnight-12k (transformers' native Dinov2Model; no code from the hub).

Card: https://huggingface.co/kaiko-ai/midnight (MIT, not gated). A ViT-g/14 (DINOv2 giant: width 1536,
40 layers, 24 heads, SwiGLU) without registers. The card's transform: Resize(224), CenterCrop(224),
Normalize(mean 0.5, std 0.5) - torchvision's Resize default, bilinear, as it names no interpolation; its
classification embedding: the class token concatenated with the mean of the patch tokens (3072 values).
Precision: not stated (bf16 is ours). arch_kwargs (the architecture without the hub) follow the DINOv2
giant configuration the card names; the hub path reads the repo's own config.json.
"""
from .recipe import Recipe

RECIPES = (
    Recipe(name="midnight", title="Midnight-12k", hub_id="kaiko-ai/midnight", card="https://huggingface.co/kaiko-ai/midnight",
           library="transformers", architecture="Dinov2Model",
           arch_kwargs={"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24, "patch_size": 14,
                        "image_size": 224, "mlp_ratio": 4, "use_swiglu_ffn": True, "layerscale_value": 1e-5},
           embed_dim=3072, registers=0, params_m=1134.8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
           interpolation="bilinear", embedding="cls+mean", licence="MIT", gated=False,
           notes="ViT-g/14 (DINOv2) trained on 12k TCGA slides; class token ++ mean patch token"),
)
