"""Models: encoder towers (registries in ``encoders``, video towers in ``video``) and the dual encoder."""

from vlp.models.config import DualEncoderConfig, EncoderConfig
from vlp.models.dual_encoder import DualEncoder
from vlp.models.encoders import IMAGE_ENCODERS, TEXT_ENCODERS, build_encoder
from vlp.models import text, video  # noqa: F401  (register our text tower and the video towers)

__all__ = ["DualEncoder", "DualEncoderConfig", "EncoderConfig", "IMAGE_ENCODERS", "TEXT_ENCODERS",
           "build_encoder"]
