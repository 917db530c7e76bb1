"""The captioning objective (CoCa): its loss, its decoder's causality, its gradients, and decoding plus
evaluation on a tiny model that has learnt four captions by heart."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.config import ConfigError
from vlp.data.tokenizer import TokenizerConfig, tokenize_captions, train_tokenizer
from vlp.data.transforms import LANGUAGE_CODES, decode_media, language_codes, pixels_to_model
from vlp.eval.captioning import decode_captions, evaluate_captioning
from vlp.eval.pairs import PairSet
from vlp.models import DualEncoder, DualEncoderConfig, EncoderConfig
from vlp.objectives.base import parse_objectives
from vlp.objectives.captioning import CaptioningObjective  # registers "captioning"
from vlp.objectives.pretraining import MaskingConfig, PretrainingModel, VisionMaskConfig

IMAGE_SIZE, FRAMES, MAX_LEN = 16, 2, 12
# The colour of the clip decides the caption; the captions share words, so the decoder must read the
# image, not only the prefix, at several positions.
COLOURS = {
    "a red apple on the table": (220, 30, 30),
    "a green frog in the pond": (30, 200, 40),
    "a blue car on the road": (30, 40, 220),
    "a yellow sun in the sky": (230, 220, 30),
}
CAPTIONS = list(COLOURS)
OBJECTIVES = {"contrastive": {}, "captioning": {"decoder_layers": 2, "decoder_heads": 4}}
# one clip per colour, captioned once in each language
BILINGUAL = {"a red apple on the table": "en", "桌上有一个红苹果": "zh",
             "a blue car on the road": "en", "路上有一辆蓝色的车": "zh"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    corpus = CAPTIONS + ["a cat on the mat", "the sky over the road", "an apple in the pond",
                         *BILINGUAL]
    return train_tokenizer(corpus, TokenizerConfig(vocab_size=120))


def _jpeg(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _pairs() -> PairSet:
    # clips of two frames (the second a little darker), as load_pairs gives them from video shards
    media = [[_jpeg(rgb), _jpeg(tuple(int(c * 0.8) for c in rgb))] for rgb in COLOURS.values()]
    return PairSet(media, list(CAPTIONS), ["en"] * len(CAPTIONS), clips=True)


def _pretraining(tokenizer, objectives=OBJECTIVES, masking=MaskingConfig(), seed=0):
    torch.manual_seed(seed)
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64}
    cfg = DualEncoderConfig(image_size=IMAGE_SIZE, num_frames=FRAMES, max_text_length=MAX_LEN,
                            embed_dim=16,
                            image=EncoderConfig(name="video_vit", options={**small, "patch_size": 8}),
                            text=EncoderConfig(name="transformer", options=small))
    model = DualEncoder(cfg, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    special = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
    return PretrainingModel(model, objectives, masking, special_ids=special,
                            mask_id=tokenizer.mask_token_id, tokenizer=tokenizer)


def _batch(tokenizer, pairs: PairSet) -> dict[str, torch.Tensor]:
    pixels = pixels_to_model(torch.from_numpy(decode_media(pairs.media, FRAMES, IMAGE_SIZE)))
    tokens = tokenize_captions(tokenizer, pairs.captions, MAX_LEN)
    return {"pixels": pixels, "lang": torch.from_numpy(language_codes(pairs.langs)),
            **{k: torch.from_numpy(v) for k, v in tokens.items()}}


def _fit(net: PretrainingModel, batch: dict, steps: int = 200) -> dict:
    """Adam on one batch, as the trainer sums the objectives; the last step's results."""
    optim = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        _, results = net(batch)
        loss = sum(net.objectives[name].cfg.weight * out.loss for name, out in results.items())
        optim.zero_grad()
        loss.backward()
        optim.step()
    return results


def _padded_batch(tokenizer):
    """The four pairs with captions of different lengths, so some rows end in padding."""
    pairs = _pairs()
    pairs.captions = ["a red apple", "a green frog in the pond", "a blue car on the", "sky"]
    batch = _batch(tokenizer, pairs)
    assert (batch["attention_mask"] == 0).any(dim=1).all()  # every row is padded
    return batch


def test_config_registers_and_checks(tokenizer):
    """The objective parses from the config section with CoCa's defaults; bad sizes are config
    errors that name the objective."""
    cfg = parse_objectives({"captioning": {}})["captioning"]
    assert cfg.weight == 2.0 and cfg.decoder_layers == 2 and cfg.decoder_width == 0
    assert CaptioningObjective.requirements(cfg) == (frozenset({"vision"}), False)
    with pytest.raises(ConfigError, match="captioning"):
        parse_objectives({"captioning": {"decoder_layers": 0}})
    with pytest.raises(ConfigError, match="multiple of decoder_heads"):
        _pretraining(tokenizer, {"captioning": {"decoder_width": 30, "decoder_heads": 4}})


def test_shapes(tokenizer):
    """Loss is a scalar, token accuracy a share, next-token logits cover the vocabulary, and
    generated captions start with [CLS] and stay within max_length, greedy and with beams."""
    net = _pretraining(tokenizer).eval()
    batch = _padded_batch(tokenizer)
    outputs, results = net(batch)
    out = results["captioning"]
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert 0.0 <= out.metrics["token_accuracy"] <= 1.0
    cap = net.objectives["captioning"]
    vision = outputs["vision"].tokens
    assert cap.logits(vision, batch["input_ids"]).shape == (4, MAX_LEN, len(tokenizer))
    assert cap.next_token_logits(vision, batch["input_ids"][:, :3]).shape == (4, len(tokenizer))
    for beam in (1, 3):
        ids = cap.generate(vision, start_id=tokenizer.cls_token_id, eos_id=tokenizer.sep_token_id,
                           max_length=7, beam_size=beam)
        assert ids.dtype == torch.long and ids.shape[0] == 4 and 2 <= ids.shape[1] <= 7
        assert (ids[:, 0] == tokenizer.cls_token_id).all()
    with pytest.raises(ConfigError, match="max_text_length"):
        cap.generate(vision, start_id=tokenizer.cls_token_id, eos_id=tokenizer.sep_token_id,
                     max_length=MAX_LEN + 1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_is_teacher_forced_cross_entropy(tokenizer, smoothing):
    """The loss equals, computed by hand one prefix at a time through ``next_token_logits``, the mean
    over real (non-padding) targets of -log p(token t+1 | tokens <= t, image), label smoothing
    included; token accuracy likewise."""
    objectives = {"contrastive": {}, "captioning": {"label_smoothing": smoothing}}
    net = _pretraining(tokenizer, objectives).eval()
    batch = _padded_batch(tokenizer)
    outputs, results = net(batch)
    cap, vision = net.objectives["captioning"], outputs["vision"].tokens
    ids, attn = batch["input_ids"], batch["attention_mask"]
    terms, hits = [], []
    for b in range(ids.shape[0]):
        for t in range(int(attn[b].sum()) - 1):  # predict token t + 1 from tokens 0..t
            logp = cap.next_token_logits(vision[b:b + 1], ids[b:b + 1, :t + 1],
                                         batch["lang"][b:b + 1])[0].log_softmax(-1)
            target = ids[b, t + 1]
            terms.append((1 - smoothing) * -logp[target] + smoothing * -logp.mean())
            hits.append(float(logp.argmax() == target))
    expected = torch.stack(terms).mean()
    assert results["captioning"].loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert results["captioning"].metrics["token_accuracy"] == pytest.approx(np.mean(hits))
    # padding really is left out: the rows have different lengths, and the count matches
    assert len(terms) == int((attn[:, 1:] == 1).sum())


def test_decoder_is_causal(tokenizer):
    """Changing the token at position j changes the logits at j and after, never before."""
    net = _pretraining(tokenizer).eval()
    batch = _padded_batch(tokenizer)
    cap = net.objectives["captioning"]
    vision = net.model.encode_vision_tokens(batch["pixels"]).tokens
    ids = batch["input_ids"]
    changed = ids.clone()
    j = 4
    changed[:, j] = (ids[:, j] + 7) % len(tokenizer)
    before, after = cap.logits(vision, ids), cap.logits(vision, changed)
    torch.testing.assert_close(before[:, :j], after[:, :j], rtol=0, atol=1e-6)
    assert (before[:, j:] - after[:, j:]).abs().amax(dim=-1).min() > 1e-4


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_every_parameter_gets_a_gradient(tokenizer, ratio):
    """Contrastive + captioning (weights 1 and 2, as the trainer sums them), with and without a visual
    mask (MAC): every trainable parameter of the PretrainingModel, decoder included, gets a finite
    gradient (DDP with find_unused_parameters=False would stall otherwise)."""
    net = _pretraining(tokenizer, masking=MaskingConfig(vision=VisionMaskConfig(ratio=ratio))).train()
    _, results = net(_padded_batch(tokenizer))
    total = sum(net.objectives[name].cfg.weight * out.loss for name, out in results.items())
    total.backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)
    assert any(n.startswith("objectives.captioning.") for n, _ in net.named_parameters())


def test_overfits_four_pairs_and_evaluates(tokenizer):
    """Trained on four (clip, caption) pairs whose colour decides the caption, the model reproduces
    each caption token for token, greedily and with beam search (beam 3); the evaluation then decodes
    them from JPEG bytes and scores BLEU-4 100 and a perfect ROUGE-L."""
    net = _pretraining(tokenizer).train()
    pairs = _pairs()
    batch = _batch(tokenizer, pairs)
    results = _fit(net, batch)
    assert results["captioning"].metrics["token_accuracy"] == 1.0

    net.eval()
    cap = net.objectives["captioning"]
    vision = net.model.encode_vision_tokens(batch["pixels"])
    lengths = batch["attention_mask"].sum(dim=1)
    for beam in (1, 3):
        ids = cap.generate(vision, start_id=tokenizer.cls_token_id, eos_id=tokenizer.sep_token_id,
                           max_length=MAX_LEN, beam_size=beam)
        for b, n in enumerate(lengths.tolist()):
            assert ids[b, :n].tolist() == batch["input_ids"][b, :n].tolist()  # [CLS] caption [SEP]
            assert (ids[b, n:] == tokenizer.sep_token_id).all()

    for beam in (1, 3):
        decoded = decode_captions(net, tokenizer, pairs, image_size=IMAGE_SIZE, num_frames=FRAMES,
                                  max_text_length=MAX_LEN, batch_size=3, device="cpu",
                                  beam_size=beam)
        assert decoded.hypotheses == CAPTIONS
        assert decoded.examples(2) == [(c, c) for c in CAPTIONS[:2]]
        assert "hyp: a red apple on the table" in decoded.examples_text(1)
    assert not net.training  # restored to the mode it was in
    metrics = evaluate_captioning(net.train(), tokenizer, pairs, image_size=IMAGE_SIZE,
                                  num_frames=FRAMES, max_text_length=MAX_LEN, batch_size=4,
                                  device="cpu", beam_size=3)
    assert net.training
    assert metrics["caption/bleu4"] == pytest.approx(100.0)
    assert metrics["caption/rouge_l"] == pytest.approx(100.0)
    assert metrics["caption/cider"] > 0 and metrics["caption/items"] == 4.0
    assert all(isinstance(v, float) for v in metrics.values())


def test_the_language_prompt_chooses_the_language_of_the_caption(tokenizer):
    """Each clip has an English and a Chinese caption: the image alone cannot say which to write.
    Trained with the language prompt, the decoder writes the caption of the language asked for;
    the evaluation asks for each reference's language."""
    rgb = {"red": (220, 30, 30), "blue": (30, 40, 220)}
    media = [[_jpeg(rgb[c]), _jpeg(rgb[c])] for c in ("red", "red", "blue", "blue")]
    pairs = PairSet(media, list(BILINGUAL), list(BILINGUAL.values()), clips=True)
    net = _pretraining(tokenizer).train()
    batch = _batch(tokenizer, pairs)
    results = _fit(net, batch)
    assert results["captioning"].metrics["token_accuracy"] == 1.0  # both languages learnt
    decoded = decode_captions(net, tokenizer, pairs, image_size=IMAGE_SIZE, num_frames=FRAMES,
                              max_text_length=MAX_LEN, batch_size=4, device="cpu", beam_size=1)
    assert [h.replace(" ", "") for h in decoded.hypotheses] == [c.replace(" ", "") for c in BILINGUAL]
    # asked for the other language, the same clips get the other captions
    net.eval()
    vision = net.model.encode_vision_tokens(batch["pixels"])
    swapped = torch.tensor([LANGUAGE_CODES["zh"], LANGUAGE_CODES["en"]] * 2)
    ids = net.objectives["captioning"].generate(vision, start_id=tokenizer.cls_token_id,
                                                eos_id=tokenizer.sep_token_id, max_length=MAX_LEN,
                                                lang=swapped)
    texts = [t.replace(" ", "") for t in tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]
    assert texts == [c.replace(" ", "") for c in ("桌上有一个红苹果", "a red apple on the table",
                                                  "路上有一辆蓝色的车", "a blue car on the road")]


@pytest.mark.parametrize("beam", [1, 3])
def test_evaluation_decodes_only_the_first_max_items(tokenizer, beam):
    """``max_items`` below the number of pairs and a batch larger than it: every input of the decoder
    (clips, languages) is cut to the same items (a CI run caught languages left uncut with beams)."""
    net = _pretraining(tokenizer)
    decoded = decode_captions(net, tokenizer, _pairs(), image_size=IMAGE_SIZE, num_frames=FRAMES,
                              max_text_length=MAX_LEN, batch_size=8, device="cpu", beam_size=beam,
                              max_items=2)
    assert len(decoded.hypotheses) == len(decoded.references) == 2
    assert decoded.references == CAPTIONS[:2]


def test_evaluation_needs_a_captioning_objective(tokenizer):
    """A pretraining without the captioning objective has no decoder: a config error says so."""
    net = _pretraining(tokenizer, {"contrastive": {}})
    with pytest.raises(ConfigError, match="'captioning' objective"):
        evaluate_captioning(net, tokenizer, _pairs(), image_size=IMAGE_SIZE, num_frames=FRAMES,
                            max_text_length=MAX_LEN, batch_size=4, device="cpu")
