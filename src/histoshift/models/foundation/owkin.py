"""Owkin: Phikon and Phikon-v2 (transformers; imported only when one of them is built).

Cards: https://huggingface.co/owkin/phikon (ViT-B/16, iBOT), https://huggingface.co/owkin/phikon-v2
(ViT-L/16, DINOv2). Phikon's card builds ViTModel.from_pretrained("owkin/phikon", add_pooling_layer=False)
(85.8M parameters; the unused pooler would add 0.6M), Phikon-v2's AutoModel (a Dinov2Model). Both:
embedding = last_hidden_state[:, 0] (the class token after the final layer norm), ImageNet mean/std, 224 px. Phikon's
image processor resizes
bilinearly, Phikon-v2's bicubically. Not gated; Owkin's non-commercial licence. The cards name no
precision; bf16 is ours.
"""
from .recipe import Recipe

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

RECIPES = (
    Recipe(name="phikon", title="Phikon", hub_id="owkin/phikon", card="https://huggingface.co/owkin/phikon",
           library="transformers", architecture="ViTModel",
           arch_kwargs={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                        "intermediate_size": 3072, "patch_size": 16, "image_size": 224, "qkv_bias": True},
           create_kwargs={"add_pooling_layer": False},
           embed_dim=768, registers=0, params_m=85.8, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear",
           licence="Owkin non-commercial", gated=False, notes="ViT-B/16; class token"),
    Recipe(name="phikon2", title="Phikon-v2", hub_id="owkin/phikon-v2", card="https://huggingface.co/owkin/phikon-v2",
           library="transformers", architecture="Dinov2Model",
           arch_kwargs={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 16,
                        "image_size": 224, "mlp_ratio": 4, "layerscale_value": 1e-5, "use_swiglu_ffn": False},
           embed_dim=1024, registers=0, params_m=303.4, mean=IMAGENET_MEAN, std=IMAGENET_STD,
           licence="Owkin non-commercial", gated=False,
           notes="ViT-L/16 (DINOv2); class token; backbone of a published 0.9763 entry with a DANN head"),
)
