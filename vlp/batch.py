"""The training batch: the contract between the input pipeline, the model and the objectives.

``vlp.data.transforms.prepare_train_batch`` makes these columns from shard rows (as NumPy arrays on
Ray Data's CPU tasks); the training loop turns them into tensors of ``TENSOR_DTYPES`` on its device
and normalises ``PIXELS`` to floats; the model and the objectives read them by these names. A new
column is a name here, its producer in the transforms, and its readers.
"""

from __future__ import annotations

# uint8 images (B, H, W, 3) or clips (B, T, H, W, 3); on the device, normalised floats (B, [T,] 3, H, W)
PIXELS = "pixels"
INPUT_IDS = "input_ids"  # int64 (B, L) token ids of the captions
ATTENTION_MASK = "attention_mask"  # int64 (B, L): 1 for real tokens, 0 for padding
LANG = "lang"  # int64 (B,): each caption's language code (vlp.data.transforms.LANGUAGE_CODES)
# int64 (B, L): 0 outside significant words, k for the tokens of the caption's k-th one (SNP-S3);
# present only when an objective or the text masking reads significant words
SIGNIFICANT = "significant"

# The dtype of each column once it is a tensor (names of torch dtypes).
TENSOR_DTYPES = {PIXELS: "uint8", INPUT_IDS: "int64", ATTENTION_MASK: "int64", LANG: "int64",
                 SIGNIFICANT: "int64"}
