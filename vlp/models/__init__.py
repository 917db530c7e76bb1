"""Models: encoder towers (registries in ``encoders``) and the dual encoder that joins them."""

from vlp.models.config import DualEncoderConfig, EncoderConfig
from vlp.models.dual_encoder import DualEncoder
from vlp.models.encoders import IMAGE_ENCODERS, TEXT_ENCODERS, build_encoder

__all__ = ["DualEncoder", "DualEncoderConfig", "EncoderConfig", "IMAGE_ENCODERS", "TEXT_ENCODERS",
           "build_encoder"]
