"""``ImagePreprocess``: how images become a given model's pixels, as one frozen, picklable value.

Two styles, one interface:

- ``vlp``: what ``vlp eval`` feeds a model trained here: ``decode_images`` without augmentation (the
  whole image resized to a square, bilinear, JPEG drafted), then ``pixels_to_model`` (the project's
  ``PIXEL_MEAN``/``PIXEL_STD``). Built by ``ImagePreprocess.for_vlp(image_size)``.
- ``hf``: the steps of a Hugging Face image processor (``preprocessor_config.json``), reproduced with
  Pillow as its PIL backend runs them: resize (the shorter side to a length, aspect kept, or to an
  exact size) with its resampling filter, centre crop, rescale, normalise. Built by
  ``ImagePreprocess.from_hf_folder(path)``; a processor that does other steps is refused.

``resize_crop`` works on the CPU (decode, resize, crop: ``uint8`` ``(B, H, W, 3)``, a quarter of the
bytes of floats); ``normalize`` turns those into the model's float ``(B, 3, H, W)`` wherever they are
(a GPU); calling the value does both. Pure functions of their inputs: no Ray, no model.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from vlp.config import ConfigError
from vlp.data.transforms import PIXEL_MEAN, PIXEL_STD, decode_images, pixels_to_model

Images = Sequence  # of encoded bytes, or decoded (H, W, 3) uint8 RGB arrays (or PIL images)


@dataclass(frozen=True)
class ImagePreprocess:
    """Attributes:
        style: ``vlp`` (the project's eval transform) or ``hf`` (a Hugging Face image processor's).
        resize: ``hf``: ``(height, width)`` to resize to, or ``(shortest_edge,)`` to resize the shorter
            side to, keeping the aspect ratio (the processor's rounding), or ``()`` for none.
            ``vlp``: ``(size, size)``.
        crop: ``(height, width)`` of the centre crop after the resize (``hf``; padded with zeros where
            the image is smaller, as the processor does), or ``()`` for none.
        resample: the Pillow filter of the resize (2 bilinear, 3 bicubic).
        rescale_factor: what pixel values are multiplied by before normalising (``hf``).
        mean, std: the normalisation of the rescaled pixels.
    """

    style: Literal["vlp", "hf"]
    resize: tuple[int, ...]
    crop: tuple[int, ...] = ()
    resample: int = int(Image.Resampling.BILINEAR)
    rescale_factor: float = 1 / 255
    mean: tuple[float, ...] = PIXEL_MEAN
    std: tuple[float, ...] = PIXEL_STD

    @classmethod
    def for_vlp(cls, image_size: int) -> ImagePreprocess:
        """What ``vlp eval`` feeds a model trained here at ``image_size``."""
        return cls(style="vlp", resize=(image_size, image_size))

    @classmethod
    def from_hf_folder(cls, path: str) -> ImagePreprocess:
        """The image processor of a Hugging Face folder (its ``preprocessor_config.json``, read by
        ``transformers``' PIL image processor so that defaults and old formats resolve as they do
        there).

        Raises:
            ConfigError: no or an unreadable processor config, or a processor whose steps are not
                the standard resize, crop, rescale and normalise.
        """
        from transformers import AutoImageProcessor
        from transformers.image_processing_backends import PilBackend

        try:
            proc = AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{path}: no image processor loads from it "
                              f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None
        kind = type(proc)
        standard = all(getattr(kind, step) is getattr(PilBackend, step)
                       for step in ("_preprocess", "resize", "center_crop", "rescale", "normalize"))
        if not isinstance(proc, PilBackend) or not standard or getattr(proc, "do_pad", False):
            raise ConfigError(f"{path}: image processor {kind.__name__} does steps ImagePreprocess "
                              "does not reproduce (only resize, centre crop, rescale, normalise)")
        resize: tuple[int, ...] = ()
        if proc.do_resize:
            size = proc.size
            if size.shortest_edge and not size.longest_edge:
                resize = (int(size.shortest_edge),)
            elif size.height and size.width:
                resize = (int(size.height), int(size.width))
            else:
                raise ConfigError(f"{path}: image processor size {dict(size)} is not a shortest edge or "
                                  "a height and width")
        crop = (int(proc.crop_size.height), int(proc.crop_size.width)) if proc.do_center_crop else ()
        normalise = bool(proc.do_normalize)
        resample = proc.resample if proc.resample is not None else Image.Resampling.BILINEAR
        return cls(style="hf", resize=resize, crop=crop, resample=int(resample),
                   rescale_factor=float(proc.rescale_factor) if proc.do_rescale else 1.0,
                   mean=_three(proc.image_mean) if normalise else (0.0, 0.0, 0.0),
                   std=_three(proc.image_std) if normalise else (1.0, 1.0, 1.0))

    # ---- CPU: decode, resize, crop --------------------------------------------------------------
    def resize_crop(self, images: Images) -> np.ndarray:
        """Images -> ``(B, H, W, 3)`` uint8, resized and cropped (the same size for every image)."""
        if self.style == "vlp":
            size = self.resize[0]
            out = [decode_images([im], size)[0] if isinstance(im, bytes) else _squash(_rgb(im), size)
                   for im in images]
            return np.stack(out) if out else np.empty((0, size, size, 3), np.uint8)
        out = [self._hf_geometry(_rgb(im)) for im in images]
        if len({a.shape for a in out}) > 1:
            raise ValueError("images of different sizes after the resize: this processor does not "
                             "crop, and they cannot be batched")
        return np.stack(out) if out else np.empty((0, 0, 0, 3), np.uint8)

    def _hf_geometry(self, im: Image.Image) -> np.ndarray:
        if self.resize:
            w, h = im.size
            if len(self.resize) == 1:  # transformers' get_resize_output_image_size
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = self.resize[0], int(self.resize[0] * long / short)
                oh, ow = (new_long, new_short) if w <= h else (new_short, new_long)
            else:
                oh, ow = self.resize
            im = im.resize((ow, oh), resample=self.resample)
        arr = np.asarray(im, dtype=np.uint8)
        return _center_crop(arr, self.crop) if self.crop else arr

    # ---- anywhere: rescale, normalise -----------------------------------------------------------
    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(..., H, W, 3)`` uint8 -> ``(..., 3, H, W)`` float32, on the tensor's device."""
        if self.style == "vlp":
            return pixels_to_model(pixels)
        # as the processor: rescale in float64, then float32; normalise in float32
        x = (pixels.movedim(-1, -3).to(torch.float64) * self.rescale_factor).to(torch.float32)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def __call__(self, images: Images) -> torch.Tensor:
        """Images -> the model's pixels ``(B, 3, H, W)`` float32."""
        return self.normalize(torch.from_numpy(self.resize_crop(images)))

    @property
    def output_size(self) -> tuple[int, int] | None:
        """``(height, width)`` of every output, or None where it follows the image (no crop)."""
        if self.crop:
            return self.crop[0], self.crop[1]
        return (self.resize[0], self.resize[1]) if len(self.resize) == 2 else None


def _three(value) -> tuple[float, ...]:
    """A processor's mean or std: a number or one per channel."""
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3


def _squash(im: Image.Image, size: int) -> np.ndarray:
    """``decode_resize`` of an image already decoded (its JPEG draft applies to bytes only)."""
    w, h = im.size
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=(0.0, 0.0, w, h)),
                      dtype=np.uint8)


def _rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(image))) as im:
            return im.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def _center_crop(arr: np.ndarray, crop: tuple[int, ...]) -> np.ndarray:
    """transformers' ``center_crop``: the centre ``crop`` of ``(H, W, 3)``, zero-padded where smaller."""
    ch, cw = crop
    h, w = arr.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return arr[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    padded = np.zeros((nh, nw, arr.shape[2]), dtype=arr.dtype)
    pt, pl = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded[pt:pt + h, pl:pl + w] = arr
    top, left = top + pt, left + pl
    return padded[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]
