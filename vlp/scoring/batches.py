"""The two per-batch steps of scoring, pure functions the Ray Data job wires together.

``prepare_score_batch`` (on CPUs): shard rows (encoded ``image`` or clip ``frames``, ``caption``)
-> the model's inputs, made by the model's own preprocessing and tokenizer up to its resize and crop:
the pixels stay ``uint8`` (a quarter of the bytes of floats, which matters when batches travel from
CPU tasks to GPU actors through Ray's object store). A row whose pixels cannot be decoded stays in the
batch (so sidecars stay aligned with their shards) with ``valid`` false.

``score_batch`` (the encoder, on CPU or GPU): inputs -> the preprocessing's normalisation (on the
encoder's device), unit image and text embeddings and ``clip_score``, their cosine (null for invalid
rows). For clips scored frame by frame
(``video_frames: mean``), the frames' image embeddings are averaged over the frames each clip has, then
normalised again.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlp.batch import ATTENTION_MASK, INPUT_IDS, PIXELS
from vlp.data.tokenizer import tokenize_captions
from vlp.data.transforms import frame_indices

VALID = "valid"
FRAME_MASK = "frame_mask"  # (B, T): which of a row's T frame slots hold a frame


def _decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _frames_of(row_media: Any, mode: str, model_frames: int, slots: int) -> list[bytes]:
    """The encoded frames of one row the model sees (at most ``slots``)."""
    if isinstance(row_media, (bytes, bytearray)):  # an image: a still video to a video tower
        return [bytes(row_media)] * max(1, model_frames)
    frames = list(row_media)
    if model_frames > 1:  # a video tower gets the clip, at its own number of frames
        return [frames[i] for i in frame_indices(len(frames), model_frames)]
    if mode == "middle":
        return [frames[len(frames) // 2]]
    if len(frames) > slots:  # more than the batch holds: spread over the whole clip
        return [frames[i] for i in frame_indices(len(frames), slots)]
    return frames


def prepare_score_batch(columns: dict[str, Any], *, preprocess, tokenizer, max_text_length: int,
                        video_frames: str = "middle", model_frames: int = 1,
                        frame_slots: int = 1) -> dict[str, np.ndarray]:
    """Rows -> ``pixels`` (uint8 ``(B, T, H, W, 3)``, resized and cropped, not yet normalised;
    ``T = frame_slots`` for every batch of a job, so that batches concatenate), ``frame_mask``,
    ``valid``, token ids.

    ``columns``: ``media`` (bytes, or lists of frame bytes), ``caption``, and any pass-through columns
    (``key``, ``row``, ``lang``, ``shard``), returned unchanged.
    """
    media = columns["media"]
    per_row = [_frames_of(m, video_frames, model_frames, frame_slots) for m in media]
    width = frame_slots
    decoded: list[list[np.ndarray] | None] = []
    for frames in per_row:
        try:
            decoded.append([_decode_rgb(f) for f in frames])
        except Exception:  # a truncated or foreign file: counted, never fatal
            decoded.append(None)
    valid = np.array([d is not None for d in decoded])
    images = [img for d in decoded if d is not None for img in d]
    pixels = None
    if images:
        flat = preprocess.resize_crop(images)
        pixels = np.zeros((len(media), width, *flat.shape[1:]), dtype=np.uint8)
    mask = np.zeros((len(media), width), dtype=bool)
    at = 0
    for i, d in enumerate(decoded):
        if d is None:
            continue
        pixels[i, :len(d)] = flat[at:at + len(d)]
        mask[i, :len(d)] = True
        at += len(d)
    if pixels is None:  # nothing decodable: any shape will do, nothing reads it
        pixels = np.zeros((len(media), 1, 1, 1, 3), dtype=np.uint8)
    tokens = tokenize_captions(tokenizer, [str(c) for c in columns["caption"]], max_text_length)
    out = {k: v for k, v in columns.items() if k not in ("media", "caption")}
    out.update({PIXELS: pixels, FRAME_MASK: mask, VALID: valid, INPUT_IDS: tokens[INPUT_IDS],
                ATTENTION_MASK: tokens[ATTENTION_MASK]})
    return out


@torch.no_grad()
def score_batch(model, batch: dict[str, np.ndarray], *, preprocess, device: torch.device,
                autocast_dtype: torch.dtype | None = None) -> dict[str, np.ndarray]:
    """Inputs (``prepare_score_batch``'s) -> ``clip_score`` (float32, NaN where invalid) and unit
    ``image_embedding`` / ``text_embedding`` (float32 ``(B, D)``). ``preprocess`` is the one that
    prepared the batch: its normalisation runs here, on ``device``."""
    pixels = preprocess.normalize(torch.from_numpy(np.ascontiguousarray(batch[PIXELS])).to(device))
    mask = torch.from_numpy(batch[FRAME_MASK]).to(device)
    b, t = mask.shape
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype)
                if autocast_dtype is not None else torch.autocast(device.type, enabled=False))
    with autocast:
        text = model.encode_text(torch.from_numpy(batch[INPUT_IDS]).to(device),
                                 torch.from_numpy(batch[ATTENTION_MASK]).to(device)).float()
        if not bool(mask.any()):  # no decodable pixels in the whole batch
            image = torch.zeros_like(text)
        elif getattr(model.cfg, "num_frames", 1) > 1:  # the clip as a video
            image = model.encode_image(pixels).float()
        else:  # frame by frame (only the slots that hold one), averaged over each row's frames
            real = model.encode_image(pixels[mask]).float()
            per_frame = real.new_zeros(b, t, real.shape[-1])
            per_frame[mask] = real
            weights = mask.unsqueeze(-1).float()
            image = F.normalize((per_frame * weights).sum(1) / weights.sum(1).clamp(min=1.0), dim=-1)
    score = (image * text).sum(-1)
    score = torch.where(torch.from_numpy(batch[VALID]).to(device), score,
                        torch.full_like(score, float("nan")))
    return {"clip_score": score.cpu().numpy().astype(np.float32),
            "image_embedding": image.cpu().numpy(), "text_embedding": text.cpu().numpy()}
