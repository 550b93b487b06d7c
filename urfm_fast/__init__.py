"""urfm_fast: fast, trustworthy URFM pretraining for ultrasound ViTs."""

# backbone registers urfm_vit_{tiny,small,base,large,huge}_patch16_224 with timm on import.
from urfm_fast.backbone import load_backbone
from urfm_fast.checkpoint_io import CheckpointError, load_checkpoint
from urfm_fast.config import URFMConfig
from urfm_fast.model import URFM

__all__ = ["URFM", "URFMConfig", "load_backbone", "load_checkpoint", "CheckpointError"]
__version__ = "0.1.0"
