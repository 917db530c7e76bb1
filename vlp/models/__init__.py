"""Models: encoder towers (registries in ``encoders``, video towers in ``video``) and the dual encoder.

Imports inside this package point one way, down: ``dual_encoder`` (with ``fusion``) at the top; the
towers ``video``, ``text`` and ``hf_dual`` (whole Hugging Face dual encoders: ``model.pretrained``)
over ``encoders``; at the bottom the parts the towers share, ``vision_tokens`` (the visual towers'
output), ``hf`` (``transformers`` configs and folders), ``transformer`` (our blocks), ``masking``,
``decoding``, ``config`` and, under it, ``hf_folder`` (which dual-encoder folders load, and what they
say). No module imports one above it, not even inside a function, so there is no import circle; new
shared parts go at the bottom.
"""

from vlp.models.config import DualEncoderConfig, EncoderConfig
from vlp.models.dual_encoder import DualEncoder
from vlp.models.encoders import IMAGE_ENCODERS, TEXT_ENCODERS, build_encoder
from vlp.models import hf_dual, text, video  # noqa: F401  (register the towers of these modules)
from vlp.models.vision_tokens import VisionTokens

__all__ = ["DualEncoder", "DualEncoderConfig", "EncoderConfig", "IMAGE_ENCODERS", "TEXT_ENCODERS",
           "VisionTokens", "build_encoder"]
