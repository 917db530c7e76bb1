"""Masks for masked pretraining (``vlp.models.masking``) and the tower's masked encoding.

Protects: tube masks keep the promised number of patches, sorted, unique and uniformly spread; a
visible-only or mask-token encoding cannot see masked pixels in any frame; text masking picks the
promised share of maskable tokens, never specials or padding, corrupts them 80/10/10 and takes
priority (significant) tokens first.
"""

from __future__ import annotations

import pytest
import torch

from vlp.models.config import EncoderConfig
from vlp.models.encoders import IMAGE_ENCODERS, build_encoder
from vlp.models.masking import IGNORE_INDEX, keep_to_mask, kept_count, mask_text, tube_mask


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- tube masks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("patches,ratio,kept", [
    (196, 0.0, 196), (196, 0.5, 98), (196, 0.75, 49), (196, 0.9, 20), (196, 0.95, 10),
    (49, 0.0, 49), (49, 0.5, 24), (49, 0.75, 12), (49, 0.9, 5), (49, 0.95, 2),
    (4, 0.95, 1),  # 0.2 patches rounds to 0: at least one is kept
])
def test_tube_mask_keeps_the_rounded_count_sorted_and_unique(patches, ratio, kept):
    g = torch.Generator().manual_seed(0)
    keep = tube_mask(64, patches, ratio, generator=g)
    assert kept_count(patches, ratio) == kept
    assert keep.shape == (64, kept) and keep.dtype == torch.int64
    assert bool((keep[:, 1:] > keep[:, :-1]).all()), "indices must be sorted and unique"
    assert int(keep.min()) >= 0 and int(keep.max()) < patches
    if ratio == 0.0:
        assert torch.equal(keep, torch.arange(patches).expand(64, -1))


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_tube_mask_is_uniform_over_positions(ratio):
    """Every position is kept equally often over many draws (within 5 binomial sigmas) and draws differ."""
    patches, draws = 16, 4000
    keep = tube_mask(draws, patches, ratio, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(keep.flatten(), minlength=patches).double()
    p = kept_count(patches, ratio) / patches
    expected, sigma = draws * p, (draws * p * (1 - p)) ** 0.5
    assert float((counts - expected).abs().max()) < 5 * sigma, counts.tolist()
    assert len({tuple(row.tolist()) for row in keep[:50]}) > 40


def test_tube_mask_rejects_ratios_outside_0_1():
    for ratio in (-0.1, 1.0):
        with pytest.raises(ValueError):
            tube_mask(2, 16, ratio)


def test_keep_to_mask_marks_exactly_the_dropped_patches():
    keep = torch.tensor([[0, 2, 5], [1, 3, 4]])
    masked = keep_to_mask(keep, 6)
    assert masked.tolist() == [[False, True, False, True, True, False],
                               [True, False, True, False, False, True]]
    keep = tube_mask(8, 49, 0.9, generator=torch.Generator().manual_seed(2))
    masked = keep_to_mask(keep, 49)
    assert masked.sum(dim=1).tolist() == [49 - keep.shape[1]] * 8
    assert not bool(masked.gather(1, keep).any())


# ---- the tower's masked encoding ------------------------------------------------------------------

IMAGE, FRAMES, PATCH = 32, 4, 8  # 16 patches of 8px per frame
PATCHES = (IMAGE // PATCH) ** 2


def _tower(attention="joint", mask_token=False):
    torch.manual_seed(0)
    cfg = EncoderConfig(name="video_vit", preset="tiny", options={"attention": attention})
    return build_encoder(IMAGE_ENCODERS, cfg, image_size=IMAGE, num_frames=FRAMES,
                         mask_token=mask_token).eval()


def _patch_slice(index):
    row, col = divmod(index, IMAGE // PATCH)
    return slice(row * PATCH, (row + 1) * PATCH), slice(col * PATCH, (col + 1) * PATCH)


def _repaint(pixels, patch, frames=None, seed=3):
    """A copy with new random pixels in spatial patch ``patch`` of the given frames (all by default)."""
    out = pixels.clone()
    g = torch.Generator().manual_seed(seed)
    rows, cols = _patch_slice(patch)
    for t in range(out.shape[1]) if frames is None else frames:
        out[:, t, :, rows, cols] = torch.randn(out.shape[0], 3, PATCH, PATCH, generator=g)
    return out


@pytest.mark.parametrize("attention", ["joint", "divided"])
@pytest.mark.parametrize("mask_tokens", [False, True])
def test_masked_patches_are_invisible_in_every_frame_and_kept_ones_matter(attention, mask_tokens):
    tower = _tower(attention, mask_token=mask_tokens)
    pixels = torch.randn(2, FRAMES, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(4))
    keep = tube_mask(2, PATCHES, 0.75, generator=torch.Generator().manual_seed(5))
    masked = keep_to_mask(keep, PATCHES)
    with torch.no_grad():
        base = tower.encode_tokens(pixels, keep, mask_tokens)
        k = keep.shape[1]
        length = 1 + FRAMES * (PATCHES if mask_tokens else k)
        assert base.tokens.shape == (2, length, tower.width)
        assert base.frames == FRAMES and base.patches == PATCHES and base.patch_size == PATCH
        assert torch.equal(base.masked, masked)
        assert (base.keep is None) if mask_tokens else torch.equal(base.keep, keep)

        # repaint every masked patch of sample 0 (a tube: all frames) and of sample 1
        hidden = pixels
        for b in range(2):
            for patch in masked[b].nonzero().flatten().tolist():
                repainted = _repaint(hidden, patch, seed=patch)
                hidden = torch.cat([hidden[:b], repainted[b:b + 1], hidden[b + 1:]])
        assert not torch.equal(hidden, pixels)
        same = tower.encode_tokens(hidden, keep, mask_tokens)
        torch.testing.assert_close(same.tokens, base.tokens, rtol=0, atol=1e-5)
        torch.testing.assert_close(same.pooled, base.pooled, rtol=0, atol=1e-5)

        # a kept patch, changed in one frame only, changes the output
        kept_patch = int(keep[0, 0])
        changed = tower.encode_tokens(_repaint(pixels, kept_patch, frames=[FRAMES - 1]), keep, mask_tokens)
        assert float((changed.tokens[0] - base.tokens[0]).abs().max()) > 1e-3


def test_unmasked_encoding_has_every_token_and_matches_the_forward():
    tower = _tower()
    pixels = torch.randn(2, FRAMES, 3, IMAGE, IMAGE)
    with torch.no_grad():
        out = tower.encode_tokens(pixels)
        assert out.tokens.shape == (2, 1 + FRAMES * PATCHES, tower.width)
        assert out.keep is None and out.masked is None
        torch.testing.assert_close(out.pooled, tower(pixels))
        # keeping every patch is the unmasked encoding
        everything = tube_mask(2, PATCHES, 0.0)
        torch.testing.assert_close(tower.encode_tokens(pixels, everything).tokens, out.tokens)


def test_mask_tokens_need_a_tower_built_with_one():
    from vlp.config import ConfigError

    tower = _tower(mask_token=False)
    with pytest.raises(ConfigError, match="mask token"):
        tower.encode_tokens(torch.randn(1, 3, IMAGE, IMAGE), tube_mask(1, PATCHES, 0.5), True)


# ---- text masking ----------------------------------------------------------------------------------

CLS, SEP, PAD, MASK, VOCAB = 101, 102, 0, 103, 1000
SPECIALS = torch.tensor([CLS, SEP, PAD])


def _captions(lengths, width, seed=0):
    """``[CLS] words [SEP] [PAD]...`` with word ids in [200, VOCAB)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), width), PAD)
    attn = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n + 1] = CLS, SEP
        ids[i, 1:n + 1] = torch.randint(200, VOCAB, (n,), generator=g)
        attn[i, :n + 2] = 1
    return ids, attn


def _mask(ids, attn, ratio, priority=None, seed=0):
    return mask_text(ids, attn, ratio, special_ids=SPECIALS, mask_id=MASK, vocab_size=VOCAB,
                     priority=priority, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ratio", [0.15, 0.5, 0.75])
def test_mask_text_chooses_the_rounded_share_of_each_caption_never_specials_or_padding(ratio):
    lengths = [1, 2, 3, 5, 7, 10, 13, 20]
    ids, attn = _captions(lengths, 24)
    out = _mask(ids, attn, ratio)
    chosen = out.labels != IGNORE_INDEX
    for i, n in enumerate(lengths):
        assert int(chosen[i].sum()) == max(1, round(n * ratio)), (n, ratio)
    words = attn.bool() & ~torch.isin(ids, SPECIALS)
    assert not bool((chosen & ~words).any()), "a special token or padding was chosen"
    assert torch.equal(out.labels[chosen], ids[chosen])
    assert bool((out.labels[~chosen] == IGNORE_INDEX).all())
    assert torch.equal(out.input_ids[~chosen], ids[~chosen]), "an unchosen token changed"


def test_mask_text_corrupts_the_chosen_tokens_80_10_10():
    ids, attn = _captions([20] * 2000, 22, seed=1)
    out = _mask(ids, attn, 0.5, seed=2)
    chosen = out.labels != IGNORE_INDEX
    new, old = out.input_ids[chosen], ids[chosen]
    total = new.numel()  # 20,000 tokens: one binomial sigma of a share is about 0.003
    as_mask = float((new == MASK).sum()) / total
    kept = float((new == old).sum()) / total
    replaced = float(((new != MASK) & (new != old)).sum()) / total
    assert as_mask == pytest.approx(0.8, abs=0.015)
    assert kept == pytest.approx(0.1, abs=0.012)
    assert replaced == pytest.approx(0.1, abs=0.012)
    # random replacements spread over the vocabulary
    assert int(new[(new != MASK) & (new != old)].unique().numel()) > 500


def test_mask_text_takes_priority_tokens_first():
    """Significant words (priority) are all masked before any other word when the budget allows;
    when it does not, only priority words are masked. Priority on specials or padding is ignored."""
    ids, attn = _captions([10] * 400, 14, seed=3)
    priority = torch.zeros_like(ids)
    priority[:200, 2:5] = 1        # 3 priority words, budget 5 at ratio 0.5: all 3, plus 2 others
    priority[200:, 1:9] = 1        # 8 priority words, budget 5: only priority words
    priority[:, 0] = 1             # on [CLS]
    priority[:, 13] = 1            # on padding
    out = _mask(ids, attn, 0.5, priority=priority, seed=4)
    chosen = out.labels != IGNORE_INDEX
    assert chosen.sum(dim=1).tolist() == [5] * 400
    assert bool(chosen[:200, 2:5].all())
    assert chosen[:200].sum().item() - chosen[:200, 2:5].sum().item() == 2 * 200
    assert not bool(chosen[200:, 9:].any()) and bool((chosen[200:, 1:9].sum(dim=1) == 5).all())
    assert not bool(chosen[:, 0].any()) and not bool(chosen[:, 13].any())
    # among the 8 priority words the 5 chosen are random, not the first 5
    assert chosen[200:, 1:9].float().mean(dim=0).min().item() > 0.4


def test_mask_text_with_nothing_maskable_chooses_nothing():
    ids, attn = _captions([0, 3], 6)  # the first caption is [CLS] [SEP]
    out = _mask(ids, attn, 0.5)
    assert (out.labels[0] == IGNORE_INDEX).all() and torch.equal(out.input_ids[0], ids[0])
    assert int((out.labels[1] != IGNORE_INDEX).sum()) == 2


@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_visible_only_encoding_equals_embedding_every_patch_then_dropping_the_masked(attention):
    """The visible-only path embeds only the kept patches; it must equal the plain convolution over
    every patch followed by a gather of the kept positions (the embedding is per patch)."""
    torch.manual_seed(0)
    tower = build_encoder(IMAGE_ENCODERS, EncoderConfig(name="video_vit", options={"attention": attention}),
                          image_size=32, num_frames=4).eval()
    video = torch.randn(3, 4, 3, 32, 32)
    keep = tube_mask(3, tower.patches, 0.75, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = tower.encode_tokens(video, keep).tokens
        full = tower.patch_embed(video.flatten(0, 1)).flatten(2).transpose(1, 2).view(3, 4, -1, tower.width)
        full = full + tower.space_pos + tower.time_pos[:, :4]
        kept = full.gather(2, keep[:, None, :, None].expand(3, 4, keep.shape[1], tower.width))
        x = torch.cat([tower.cls_token.expand(3, 1, tower.width), kept.flatten(1, 2)], dim=1)
        for block in tower.blocks:
            x = block(x, 4)
        want = tower.norm(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
