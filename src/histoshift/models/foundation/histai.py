"""HistAI: Hibou-B and Hibou-L on transformers' native Dinov2WithRegistersModel.

Cards: https://huggingface.co/histai/hibou-b, https://huggingface.co/histai/hibou-L (Apache-2.0). The
cards load them with AutoModel + trust_remote_code=True ("a customized implementation of the DINOv2
architecture from the transformers library to add support for registers"); transformers now has that
architecture natively, so histoshift builds Dinov2WithRegistersModel itself, never the hub's code, and
loads the weights strictly (a tensor the native class does not have, or lacks, stops with one line - so a
repo whose weights do not fit is refused, never half-loaded). Repo config.json (Hibou-B): model_type
"dinov2", architectures ["Dinov2ModelWithRegisters"], auto_map to its own code, width 768, 12 layers, 12
heads, patch 14, image_size 224, num_register_tokens 4, use_swiglu_ffn true, layerscale 1.0, eps 1e-6.
Preprocessing (its BitImageProcessor): bicubic resize to 224, centre crop 224, mean (0.7068, 0.5755,
0.722), std (0.195, 0.2316, 0.1816); embedding: pooler_output = the class token after the final norm.
Hibou-L's arch_kwargs (only for building without the hub) assume Hibou-B's pattern at ViT-L/14 width;
the hub path reads its own config.json. Both hub pages ask for access (gated). Precision: not stated.
Published Camelyon17-WILDS linear probe for Hibou-B: 0.971 (as quoted in issue 18).
"""
from .recipe import Recipe

MEAN, STD = (0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816)
_HIBOU = dict(library="transformers", architecture="Dinov2WithRegistersModel", registers=4, mean=MEAN, std=STD,
              licence="Apache-2.0", gated=True,
              # the repos' own config.json keys (stand-ins write them, so that tests load what users download)
              hub_config={"model_type": "dinov2", "architectures": ["Dinov2ModelWithRegisters"],
                          "auto_map": {"AutoConfig": "configuration_dinov2.Dinov2Config",
                                       "AutoModel": "modeling_dinov2.Dinov2ModelWithRegisters"}})
_ARCH = {"patch_size": 14, "image_size": 224, "num_register_tokens": 4, "use_swiglu_ffn": True,
         "layerscale_value": 1.0, "layer_norm_eps": 1e-6, "mlp_ratio": 4}

RECIPES = (
    Recipe(name="hibou_b", title="Hibou-B", hub_id="histai/hibou-b", card="https://huggingface.co/histai/hibou-b",
           arch_kwargs={**_ARCH, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
           embed_dim=768, params_m=85.7, notes="ViT-B/14 with 4 registers (DINOv2); class token", **_HIBOU),
    Recipe(name="hibou_l", title="Hibou-L", hub_id="histai/hibou-L", card="https://huggingface.co/histai/hibou-L",
           arch_kwargs={**_ARCH, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
           embed_dim=1024, params_m=303.7, notes="ViT-L/14 with 4 registers (DINOv2); class token", **_HIBOU),
)
