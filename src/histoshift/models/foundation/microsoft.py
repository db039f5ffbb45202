"""Microsoft: MedImageInsight (a UniCL image-text model; its DaViT image tower on timm's `davit_huge_fl`).

Sources (read in the hub repo https://huggingface.co/lion-ai/MedImageInsights, MIT, not gated; the same
files are mirrored on GitHub, e.g. visual-layer/MedImageInsight):
  - 2024.09.27/config.yaml: IMAGE_ENCODER davit_v1, IMAGE_SIZE [480, 480], ImageNet IMAGE_MEAN/STD,
    SPEC DIM_EMBED 256/512/1024/2048, DEPTHS 1/1/9/1, NUM_HEADS = NUM_GROUPS 8/16/32/64, WINDOW_SIZE 12,
    PATCH_SIZE 7/3/3/3, PATCH_STRIDE 4/2/2/2; UNICL_MODEL DIM_PROJECTION 1024; AUG INTERPOLATION bicubic;
    TEST CENTER_CROP false (so: Resize((480, 480)), bicubic, no crop - ImageDataLoader/transforms/build.py);
    FP16: true, AMP: PYTORCH (the model was trained under PyTorch fp16 autocast).
  - 2024.09.27/vision_model/medimageinsigt-v1.0.0.pt (sic): safetensors content (UniCLModel.py reads it
    with safetensors.torch.load_file), the whole vision-language model; adapters.py keeps the image tower.
  - UniCLModel.encode_image: L2-normalise(pooled features @ image_projection) = the official embedding
    ("projected", 1024 values); the 2048 pooled features before the projection are "pooled".
Precision: the repo's inference code runs fp32; fp16 autocast is ours, on the strength of the model's
fp16 training (set recipe_overrides.precision: "no" for the repo's exact arithmetic).
"""
from .recipe import Recipe

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_MII = dict(
    title="MedImageInsight", hub_id="lion-ai/MedImageInsights", card="https://huggingface.co/lion-ai/MedImageInsights",
    library="timm", architecture="davit_huge_fl",
    arch_kwargs={"depths": [1, 1, 9, 1], "embed_dims": [256, 512, 1024, 2048], "num_heads": [8, 16, 32, 64],
                 "window_size": 12},
    registers=0, params_m=360.6, mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=480, interpolation="bicubic",
    crop_pct=1.0, precision="fp16", licence="MIT", gated=False,
    config_file="2024.09.27/config.yaml", weights_file="2024.09.27/vision_model/medimageinsigt-v1.0.0.pt",
    adapter="unicl-davit",
)

RECIPES = (
    Recipe(name="medimageinsight", embed_dim=1024, embedding="projected",
           notes="DaViT-H image tower (360.6M) + image projection; the official image embedding, 1024 values, "
                 "L2-normalised; backbone of the best reported entry (0.98056, frozen features + MLP)", **_MII),
    Recipe(name="medimageinsight_pooled", embed_dim=2048, embedding="pooled",
           notes="the same tower's pooled, layer-normed features before the projection (2048 values)", **_MII),
)
