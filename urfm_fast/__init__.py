"""urfm_fast: fast, trustworthy URFM pretraining for ultrasound ViTs."""

from urfm_fast.config import URFMConfig
from urfm_fast.model import URFM

__all__ = ["URFM", "URFMConfig"]
__version__ = "0.1.0"
