"""Video question answering by masked language modelling (vlp.eval.video_qa)."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.config import ConfigError
from vlp.data.sample_vocabulary import COLOURS, SHAPES, VIDEO_COLOURS, VIDEO_SHAPES
from vlp.data.synthetic_video import MOTIONS, VideoSpec
from vlp.data.tokenizer import TokenizerConfig, tokenize_captions, train_tokenizer
from vlp.data.transforms import decode_media, pixels_to_model
from vlp.eval.pairs import PairSet
from vlp.eval.video_qa import build_questions, evaluate_video_qa, score_questions
from vlp.models import DualEncoder
from vlp.models.config import DualEncoderConfig, EncoderConfig, FusionConfig
from vlp.objectives import mlm as _mlm  # noqa: F401  (registers "mlm")
from vlp.objectives.pretraining import MaskingConfig, PretrainingModel, TextMaskConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE, FRAMES, LENGTH = 16, 2, 16
SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
# The word of each motion that the default vocabulary asks about (the first motion word in it).
MOTION_ANSWER = {"en": {"left_to_right": "left", "right_to_left": "right", "top_to_bottom": "top",
                        "bottom_to_top": "bottom", "grows": "grows", "shrinks": "shrinks",
                        "appears": "appears", "disappears": "disappears"},
                 "zh": {"left_to_right": "左", "right_to_left": "右", "top_to_bottom": "上",
                        "bottom_to_top": "下", "grows": "变大", "shrinks": "变小", "appears": "出现",
                        "disappears": "消失"}}
ALL_SPECS = [VideoSpec(c, s, m) for c, s, m in itertools.product(VIDEO_COLOURS, VIDEO_SHAPES, MOTIONS)]


@pytest.fixture(scope="module")
def tokenizer():
    captions = [spec.caption(lang) for spec in ALL_SPECS for lang in ("en", "zh")]
    return train_tokenizer(captions, TokenizerConfig(vocab_size=300))


def _pretraining(tokenizer, objectives=None, fusion=FusionConfig(layers=1), ratio=0.5):
    cfg = DualEncoderConfig(image_size=SIZE, num_frames=FRAMES, max_text_length=LENGTH, embed_dim=16,
                            image=EncoderConfig(name="video_vit", options=SMALL),
                            text=EncoderConfig(name="transformer", options=SMALL), fusion=fusion)
    model = DualEncoder(cfg, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return PretrainingModel(model, objectives or {"mlm": {}}, MaskingConfig(text=TextMaskConfig(ratio)),
                            special_ids=[tokenizer.cls_token_id, tokenizer.sep_token_id,
                                         tokenizer.pad_token_id], mask_id=tokenizer.mask_token_id)


def _png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def _clip(rgb, rng: np.random.Generator) -> list[bytes]:
    """Frames of one colour with a little noise, as stored frame bytes (what a PairSet holds)."""
    base = np.array(rgb, dtype=np.float32)
    return [_png(np.clip(base + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8))
            for _ in range(FRAMES)]


def _pairs(n: int, seed: int) -> PairSet:
    """Clips whose frames are the caption's colour; shapes, motions and languages at random."""
    rng = np.random.default_rng(seed)
    media, captions, langs = [], [], []
    for i in range(n):
        spec = VideoSpec(VIDEO_COLOURS[i % len(VIDEO_COLOURS)], str(rng.choice(VIDEO_SHAPES)),
                         str(rng.choice(list(MOTIONS))))
        lang = "zh" if rng.random() < 0.5 else "en"
        media.append(_clip(COLOURS[spec.colour][0], rng))
        captions.append(spec.caption(lang))
        langs.append(lang)
    return PairSet(media, captions, langs, clips=True)


# ---- the question builder --------------------------------------------------------------------------
def test_english_questions_mask_the_first_word_of_each_type():
    caption = "a red circle moves from the left to the right"
    colour, shape, motion = build_questions([caption], ["en"])
    assert (colour.kind, colour.answer, caption[colour.start:colour.end]) == ("colour", "red", "red")
    assert colour.candidates == VIDEO_COLOURS
    assert (shape.answer, shape.candidates) == ("circle", VIDEO_SHAPES)
    # "left" comes before "right": the first occurrence is asked about
    assert (motion.answer, motion.start) == ("left", caption.index("left"))
    assert set(motion.candidates) == {"left", "right", "top", "bottom", "grows", "shrinks", "appears",
                                      "disappears"}
    assert motion.filled("top") == "a red circle moves from the top to the right"


def test_chinese_questions_match_without_spaces():
    caption = "蓝色正方形从上向下移动"
    colour, shape, motion = build_questions([caption], ["zh"])
    assert (colour.answer, colour.start, colour.end) == ("蓝色", 0, 2)
    assert colour.candidates == tuple(COLOURS[c][1] for c in VIDEO_COLOURS)
    assert (shape.answer, shape.start, shape.end) == ("正方形", 2, 5)
    assert "圆形" in shape.candidates and "三角形" in shape.candidates
    assert (motion.answer, caption[motion.start:motion.end]) == ("上", "上")
    assert motion.filled("变大") == "蓝色正方形从变大向下移动"


def test_captions_without_an_answer_word_are_skipped():
    captions = ["a photo of nothing in particular", "a red circle slowly disappears",
                "un cercle rouge", "A Green thing"]
    questions = build_questions(captions, ["en", "en", "fr", "en"])
    assert [(q.index, q.kind, q.answer) for q in questions] == [
        (1, "colour", "red"), (1, "shape", "circle"),
        (1, "motion", "disappears"),  # whole words only: not "appears" inside it
        (3, "colour", "green")]  # case-insensitive
    assert questions[-1].start == 2 and questions[-1].end == 7
    custom = {"size": {"en": ["big", "small"]}, "lonely": {"en": ["red"]}}  # one word: no question
    assert [(q.kind, q.answer) for q in build_questions(["a small red dot"], ["en"], custom)] == [
        ("size", "small")]


def test_the_default_vocabulary_asks_three_questions_of_every_sample_caption():
    for spec, lang in itertools.product(ALL_SPECS, ("en", "zh")):
        questions = build_questions([spec.caption(lang)], [lang])
        answers = {q.kind: q.answer for q in questions}
        colour = spec.colour if lang == "en" else COLOURS[spec.colour][1]
        assert answers["colour"] == colour, spec
        assert answers["shape"] == (spec.shape if lang == "en" else SHAPES[spec.shape]), spec
        assert answers["motion"] == MOTION_ANSWER[lang][spec.motion], (spec, lang)
        assert len(questions) == 3


# ---- scoring --------------------------------------------------------------------------------------
def _reference_scores(pre, tokenizer, pairs: PairSet, question) -> list[float]:
    """Score each candidate by hand: its tokens found by tokenizing the text before it and the
    candidate alone, replaced by as many [MASK]s, one fusion pass, log-softmax, sum."""
    model, mlm = pre.model, pre.objectives["mlm"]
    pixels = pixels_to_model(torch.from_numpy(decode_media([pairs.media[question.index]], FRAMES, SIZE)))
    vision = model.encode_vision_tokens(pixels).tokens
    out = []
    for candidate in question.candidates:
        tok = tokenize_captions(tokenizer, [question.filled(candidate)], LENGTH)
        ids = torch.from_numpy(tok["input_ids"])
        prefix = tokenizer(question.caption[:question.start], add_special_tokens=False)["input_ids"]
        target = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        where = torch.arange(len(target)) + 1 + len(prefix)  # after [CLS] and the prefix
        assert ids[0, where].tolist() == target
        ids[0, where] = tokenizer.mask_token_id
        hidden = model.fuse(vision, ids, torch.from_numpy(tok["attention_mask"])).text
        logp = torch.log_softmax(mlm.logits(hidden[0, where]), dim=-1)
        out.append(float(logp[torch.arange(len(target)), torch.tensor(target)].sum()))
    return out


def test_scores_match_a_plain_reference(tokenizer):
    """Batched scoring (shared masked inputs, clips encoded once, masks gathered) equals running the
    model by hand per candidate, including Chinese candidates of 2 and 3 tokens."""
    torch.manual_seed(0)
    pre = _pretraining(tokenizer).eval()
    pairs = _pairs(6, seed=1)
    questions = build_questions(pairs.captions, pairs.langs)
    assert any(len(set(map(len, q.candidates))) > 1 for q in questions if q.kind == "shape")
    with torch.no_grad():
        scores = score_questions(pre, tokenizer, pairs.media, questions, image_size=SIZE,
                                 num_frames=FRAMES, max_text_length=LENGTH, batch_size=4, device="cpu")
        reference = [_reference_scores(pre, tokenizer, pairs, q) for q in questions]
    for got, want in zip(scores, reference):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    metrics = evaluate_video_qa(pre, tokenizer, pairs, image_size=SIZE, num_frames=FRAMES,
                                max_text_length=LENGTH, batch_size=4, device="cpu")
    right = [q.candidates[int(np.argmax(r))] == q.answer for q, r in zip(questions, reference)]
    assert metrics["qa/accuracy"] == pytest.approx(100 * np.mean(right))
    assert metrics["qa/questions"] == len(questions) and metrics["qa/skipped"] == 0
    assert metrics["qa/chance"] == pytest.approx(
        100 * np.mean([1 / len(q.candidates) for q in questions]))
    assert {"qa/colour_accuracy", "qa/shape_accuracy", "qa/motion_accuracy"} <= set(metrics)
    assert not pre.training  # evaluate restores the mode it found


def test_answers_cut_off_by_truncation_are_skipped_and_training_mode_is_restored(tokenizer):
    pre = _pretraining(tokenizer).train()
    pairs = PairSet(_pairs(1, seed=2).media, ["a red circle moves from the left to the right"], ["en"])
    metrics = evaluate_video_qa(pre, tokenizer, pairs, image_size=SIZE, num_frames=FRAMES,
                                max_text_length=6, batch_size=4, device="cpu")
    # [CLS] a red circle moves [SEP]: colour and shape asked, the motion word is cut off
    assert metrics["qa/questions"] == 2 and metrics["qa/skipped"] == 1
    assert set(metrics) >= {"qa/colour_accuracy", "qa/shape_accuracy"}
    assert "qa/motion_accuracy" not in metrics
    assert pre.training


def test_a_bpe_tokenizer_answers_english_and_skips_words_merged_across_boundaries():
    """Byte-level BPE tokens carry the space before a word (still the word's tokens); its Chinese
    merges cross word boundaries ("色圆"), which no masking of the word can undo: skipped, counted."""
    captions = [spec.caption(lang) for spec in ALL_SPECS for lang in ("en", "zh")]
    bpe = train_tokenizer(captions, TokenizerConfig(kind="bpe", vocab_size=400))
    pre = _pretraining(bpe).eval()
    kwargs = dict(image_size=SIZE, num_frames=FRAMES, max_text_length=LENGTH, batch_size=4, device="cpu")
    english = _pairs(4, seed=6)
    english.captions = [VideoSpec(c, "circle", "grows").caption("en") for c in VIDEO_COLOURS[:4]]
    english.langs = ["en"] * 4
    metrics = evaluate_video_qa(pre, bpe, english, **kwargs)
    assert metrics["qa/questions"] == 12 and metrics["qa/skipped"] == 0
    chinese = PairSet(english.media[:1], ["红色圆形从左向右移动"], ["zh"], clips=True)
    assert evaluate_video_qa(pre, bpe, chinese, **kwargs)["qa/skipped"] >= 1


def test_a_tiny_model_trained_on_coloured_clips_answers_colour_questions(tokenizer):
    """Overfit: the frames' colour is the only clue to the colour word; after a few hundred steps of
    video-conditioned MLM, held-out clips' colour questions are answered well above chance."""
    torch.manual_seed(0)
    pre = _pretraining(tokenizer, ratio=0.5).train()
    train = _pairs(40, seed=3)
    pixels = pixels_to_model(torch.from_numpy(decode_media(train.media, FRAMES, SIZE)))
    tok = tokenize_captions(tokenizer, train.captions, LENGTH)
    batch = {"pixels": pixels, "input_ids": torch.from_numpy(tok["input_ids"]),
             "attention_mask": torch.from_numpy(tok["attention_mask"])}
    opt = torch.optim.Adam(pre.parameters(), lr=3e-3)
    for _ in range(200):
        _, results = pre(batch)
        opt.zero_grad()
        results["mlm"].loss.backward()
        opt.step()
    held_out = _pairs(20, seed=4)
    metrics = evaluate_video_qa(pre, tokenizer, held_out, image_size=SIZE, num_frames=FRAMES,
                                max_text_length=LENGTH, batch_size=8, device="cpu")
    assert metrics["qa/chance"] < 30
    assert metrics["qa/colour_accuracy"] >= 70, metrics  # 90-100 over seeds; untrained ~20


# ---- errors ---------------------------------------------------------------------------------------
def test_qa_refuses_a_pretraining_without_a_video_conditioned_mlm(tokenizer):
    pairs = _pairs(2, seed=5)
    kwargs = dict(image_size=SIZE, num_frames=FRAMES, max_text_length=LENGTH, batch_size=2, device="cpu")
    contrastive_only = _pretraining(tokenizer, {"contrastive": {}}, fusion=FusionConfig())
    with pytest.raises(ConfigError, match="objectives.mlm"):
        evaluate_video_qa(contrastive_only, tokenizer, pairs, **kwargs)
    text_only = _pretraining(tokenizer, {"mlm": {"conditioned": False}}, fusion=FusionConfig())
    with pytest.raises(ConfigError, match="needs the video"):
        evaluate_video_qa(text_only, tokenizer, pairs, **kwargs)
    with pytest.raises(ConfigError, match="PretrainingModel"):
        evaluate_video_qa(text_only.model, tokenizer, pairs, **kwargs)
    with pytest.raises(ConfigError, match="no held-out caption"):
        evaluate_video_qa(_pretraining(tokenizer), tokenizer,
                          PairSet(pairs.media[:1], ["nothing to ask"], ["en"], clips=True), **kwargs)
