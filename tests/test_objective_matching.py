"""The matching (ITM/VTM) and SNP-S3 word-matching objectives, against plain references.

Promises protected. matching: a mined negative is never the positive nor a sample with the same
caption; ``hardest`` is the argmax of the similarities; ``hard`` draws follow softmax(scale * sim);
the loss equals a per-pair reference with the same negatives; rows with no candidate drop only their
negative pair; the loss falls when overfitting a batch; every parameter gets a gradient with the cross,
joint and shared fusion encoders; on a real 2-rank Gloo group negatives come from the other rank, the
loss and every parameter gradient equal a reference in which the other rank's samples carry no
gradient (so the local encoders get theirs), and the bytes sent are the documented gathers.
word_matching: the MIL-NCE value against a per-element Python reference, on hand-built embeddings and
through the model (word pooling, projection); captions without significant words are masked out and a
batch without any gives a zero loss that still reaches every parameter; the loss falls on one batch.
"""

from __future__ import annotations

import glob
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.conftest import free_port
from tests.dist_workers import run_rank
from vlp.models import DualEncoder, DualEncoderConfig, EncoderConfig
from vlp.models.config import FusionConfig
from vlp.objectives import matching  # importing registers "matching" (and below "word_matching")
from vlp.objectives.matching import mine_negatives
from vlp.objectives.pretraining import MaskingConfig, PretrainingModel
from vlp.objectives.word_matching import mil_nce_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, PAD, MASK, CLS, SEP = 60, 0, 1, 2, 3
LENGTH, FRAMES, SIZE = 12, 2, 16
# one layer of width 64 per tower: quick on 2 CPU cores, still learns to match in a few dozen steps
SMALL = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128}
BERT = {**SMALL, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
FUSIONS = {
    "cross": ("bert", FusionConfig(layers=1)),
    "joint": ("bert", FusionConfig(layers=1, mode="joint")),
    "shared": ("transformer", FusionConfig(share_text_encoder=True)),
}


def build(objectives: dict, fusion: str | None = "cross", seed: int = 0) -> PretrainingModel:
    """A tiny video model (2 frames of 16 px) and its PretrainingModel, as the trainer builds it."""
    text, fusion_cfg = FUSIONS[fusion] if fusion else ("bert", FusionConfig())
    torch.manual_seed(seed)
    cfg = DualEncoderConfig(
        image_size=SIZE, num_frames=FRAMES, max_text_length=LENGTH, embed_dim=32,
        image=EncoderConfig(name="video_vit", preset="tiny", options=SMALL),
        text=EncoderConfig(name=text, options=BERT if text == "bert" else SMALL),
        fusion=fusion_cfg)
    net = DualEncoder(cfg, vocab_size=VOCAB, pad_token_id=PAD)
    return PretrainingModel(net, objectives, MaskingConfig(), special_ids=[PAD, CLS, SEP],
                            mask_id=MASK)


def make_batch(n: int, seed: int = 1, same: tuple[tuple[int, int], ...] = ()) -> dict:
    """Random clips and captions ([CLS] words [SEP] padding); ``same`` copies caption a onto b.
    ``significant`` marks words 1..4 (word 1 two tokens long), except in caption 0 when n > 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((n, LENGTH), PAD, dtype=torch.long)
    significant = torch.zeros(n, LENGTH, dtype=torch.long)
    for i in range(n):
        words = int(torch.randint(6, LENGTH - 2, (1,), generator=g))
        ids[i, 0], ids[i, 1:words + 1], ids[i, words + 1] = CLS, torch.randint(4, VOCAB, (words,),
                                                                               generator=g), SEP
        if not (i == 0 and n > 2):
            significant[i, 1:3], significant[i, 4], significant[i, 5], significant[i, 6] = 1, 2, 3, 4
    for a, b in same:
        ids[b] = ids[a]
    return {"pixels": torch.randn(n, FRAMES, 3, SIZE, SIZE, generator=g), "input_ids": ids,
            "attention_mask": (ids != PAD).long(), "significant": significant}


@pytest.fixture
def mined(monkeypatch) -> list[dict]:
    """Every ``mine_negatives`` call of the matching objective: first the captions for its videos,
    then the videos for its captions."""
    calls = []

    def recording(similarity, allowed, how, scale=1.0):
        index, valid = mine_negatives(similarity, allowed, how, scale)
        calls.append({"similarity": similarity.clone(), "index": index.clone(), "valid": valid.clone()})
        return index, valid

    monkeypatch.setattr(matching, "mine_negatives", recording)
    return calls


def _grads_complete(pm: PretrainingModel) -> None:
    missing = [n for n, p in pm.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in pm.parameters())


def _norm(pm: PretrainingModel, prefix: str) -> float:
    return sum(p.grad.norm().item() ** 2 for n, p in pm.named_parameters() if n.startswith(prefix))


def _overfit(pm: PretrainingModel, name: str, batch: dict, steps: int, lr: float) -> list[float]:
    pm.train()
    optimiser = torch.optim.Adam(pm.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        _, results = pm(batch)
        optimiser.zero_grad()
        results[name].loss.backward()
        optimiser.step()
        losses.append(results[name].loss.item())
    return losses


# ------------------------------------------------------------------------------------------------
# matching: mining


@pytest.mark.parametrize("how", ["hard", "hardest", "random"])
def test_mining_never_picks_the_positive_nor_an_identical_caption(mined, how):
    pm = build({"matching": {"negatives": how}}).eval()
    batch = make_batch(6, same=((0, 1), (2, 3), (2, 4)))
    ids = batch["input_ids"]
    with torch.no_grad():
        outputs = pm.encode(batch)
        for _ in range(4):
            pm.objectives["matching"](outputs, batch, pm.model)
    assert len(mined) == 8
    for call in mined:
        assert call["valid"].all()
        for i, j in enumerate(call["index"].tolist()):
            assert j != i and not torch.equal(ids[i], ids[j]), (i, j)


def test_hardest_is_the_argmax_of_a_plain_similarity_reference(mined):
    pm = build({"matching": {"negatives": "hardest"}}).eval()
    batch = make_batch(6, same=((0, 1),))
    with torch.no_grad():
        outputs = pm.encode(batch)
        pm.objectives["matching"](outputs, batch, pm.model)
    images, texts, ids = outputs["image_embeds"], outputs["text_embeds"], batch["input_ids"].tolist()

    def argmax(queries, candidates, i):
        scores = {j: sum(a * b for a, b in zip(queries[i].tolist(), candidates[j].tolist()))
                  for j in range(len(ids)) if ids[j] != ids[i]}
        return max(scores, key=scores.get)

    assert mined[0]["index"].tolist() == [argmax(images, texts, i) for i in range(6)]
    assert mined[1]["index"].tolist() == [argmax(texts, images, i) for i in range(6)]


def test_hard_draws_follow_the_softmax_of_the_scaled_similarities():
    torch.manual_seed(0)
    rows, scale = 20000, 4.0
    similarity = torch.tensor([0.9, 0.5, 0.2, -0.3, 0.7])
    allowed = torch.tensor([True, True, True, True, False])
    index, valid = mine_negatives(similarity.expand(rows, -1), allowed.expand(rows, -1), "hard", scale)
    frequency = torch.bincount(index, minlength=5).double() / rows
    expected = torch.cat([(scale * similarity[:4].double()).softmax(0), torch.zeros(1).double()])
    assert valid.all() and frequency[4] == 0
    # one draw's frequency has std <= 0.0036 at 20000 rows: 0.015 is over 4 sigma
    assert (frequency - expected).abs().max() < 0.015, (frequency, expected)
    index, _ = mine_negatives(similarity.expand(rows, -1), allowed.expand(rows, -1), "random")
    frequency = torch.bincount(index, minlength=5).double() / rows
    assert frequency[4] == 0 and (frequency[:4] - 0.25).abs().max() < 0.015


def test_a_row_without_candidates_is_invalid_in_every_mode():
    similarity = torch.randn(3, 4)
    allowed = torch.tensor([[False] * 4, [False, True, False, False], [True] * 4])
    for how in ("hard", "hardest", "random"):
        index, valid = mine_negatives(similarity, allowed, how, 10.0)
        assert valid.tolist() == [False, True, True] and index[1] == 1


# ------------------------------------------------------------------------------------------------
# matching: the loss


def _reference_matching(pm, outputs, batch, neg_text, neg_video, valid_text, valid_video):
    """Per-pair cross-entropy with one fusion pass per pair, averaged over the counted pairs."""
    head, model = pm.objectives["matching"].head, pm.model
    vision, hidden = outputs["vision"].tokens, outputs["text_hidden"]
    ids, attn = batch["input_ids"], batch["attention_mask"]
    terms = []
    b = ids.shape[0]
    pairs = [(i, i, 1, True) for i in range(b)]
    pairs += [(i, int(neg_text[i]), 0, bool(valid_text[i])) for i in range(b)]
    pairs += [(int(neg_video[i]), i, 0, bool(valid_video[i])) for i in range(b)]
    for v, t, label, counted in pairs:
        if not counted:
            continue
        fused = model.fuse(vision[v:v + 1], ids[t:t + 1], attn[t:t + 1], text_hidden=hidden[t:t + 1])
        log_p = torch.log_softmax(head(fused.text[0, 0]), dim=0)
        terms.append(-log_p[label])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("fusion", ["cross", "joint", "shared"])
def test_loss_equals_a_per_pair_reference_with_the_same_negatives(mined, fusion):
    pm = build({"matching": {"negatives": "hard"}}, fusion=fusion).eval()
    batch = make_batch(5, same=((3, 4),))
    outputs = pm.encode(batch)
    out = pm.objectives["matching"](outputs, batch, pm.model)
    text, video = mined
    reference = _reference_matching(pm, outputs, batch, text["index"], video["index"], text["valid"],
                                    video["valid"])
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert out.bytes_sent == 0 and out.metrics["candidates"] == 5
    assert 0 <= out.metrics["accuracy"] <= 1 and out.metrics["negatives_found"] == 1


def test_rows_without_a_candidate_keep_only_their_positive_pair(mined):
    """Every caption the same: no negative anywhere, the loss is the positives' cross-entropy."""
    pm = build({"matching": {}}).eval()
    batch = make_batch(3, same=((0, 1), (0, 2)))
    outputs = pm.encode(batch)
    out = pm.objectives["matching"](outputs, batch, pm.model)
    assert not mined[0]["valid"].any() and not mined[1]["valid"].any()
    text, video = mined
    reference = _reference_matching(pm, outputs, batch, text["index"], video["index"], text["valid"],
                                    video["valid"])
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert out.metrics["negatives_found"] == 0


def test_matching_loss_falls_when_overfitting_one_batch():
    """Well below the entropy of 1/3 positives (0.64): the model tells the pairs apart, which takes
    the fusion learning an interaction of video and text (each alone says nothing)."""
    pm = build({"matching": {"negatives": "hardest"}})
    losses = _overfit(pm, "matching", make_batch(4), steps=40, lr=2e-3)
    assert min(losses[-10:]) < 0.45 and losses[0] > 0.6, losses


@pytest.mark.parametrize("fusion", ["cross", "joint", "shared"])
def test_every_parameter_gets_a_gradient(fusion):
    """Matching alone (the projections and temperature get their zero gradient) with each fusion."""
    pm = build({"matching": {}}, fusion=fusion).train()
    _, results = pm(make_batch(4))
    results["matching"].loss.backward()
    _grads_complete(pm)
    for part in ("model.image_encoder.", "model.text_encoder.", "objectives.matching.head.") + (
            ("model.fusion.",) if fusion != "shared" else ()):
        assert _norm(pm, part) > 0, part


# ------------------------------------------------------------------------------------------------
# matching on a real 2-rank Gloo group

PER_RANK = 2


def _dist_matching(rank: int, world: int) -> dict:
    """Rank 0's two captions are identical, so its only candidates are rank 1's samples."""
    full = make_batch(world * PER_RANK, seed=5, same=((0, 1),))
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    local = {k: v[mine] for k, v in full.items()}
    calls = []

    def recording(similarity, allowed, how, scale=1.0):
        index, valid = mine_negatives(similarity, allowed, how, scale)
        calls.append((index.clone(), valid.clone()))
        return index, valid

    matching.mine_negatives = recording  # this spawned process's own module
    pm = build({"matching": {"negatives": "hardest"}}).eval()
    outputs = pm.encode(local)
    out = pm.objectives["matching"](outputs, local, pm.model)
    forward_bytes = out.comm.forward_bytes
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters()}
    (neg_text, valid_text), (neg_video, valid_video) = calls

    # Reference on the whole job's batch: this rank's rows with gradients, the other rank's without.
    pm.zero_grad(set_to_none=True)
    local_out = pm.encode(local)
    with torch.no_grad():
        full_out = pm.encode(full)
    rows = torch.arange(world * PER_RANK)
    is_mine = ((rows >= mine.start) & (rows < mine.stop))[:, None, None]
    tokens = torch.where(is_mine, local_out["vision"].tokens.repeat(world, 1, 1), full_out["vision"].tokens)
    hidden = torch.where(is_mine, local_out["text_hidden"].repeat(world, 1, 1), full_out["text_hidden"])
    # the reference indexes the job's batch: this rank's positives are its rows `mine`
    ref_terms = []
    head, model = pm.objectives["matching"].head, pm.model
    pairs = [(mine.start + i, mine.start + i, 1, True) for i in range(PER_RANK)]
    pairs += [(mine.start + i, int(neg_text[i]), 0, bool(valid_text[i])) for i in range(PER_RANK)]
    pairs += [(int(neg_video[i]), mine.start + i, 0, bool(valid_video[i])) for i in range(PER_RANK)]
    for v, t, label, counted in pairs:
        if counted:
            fused = model.fuse(tokens[v:v + 1], full["input_ids"][t:t + 1],
                               full["attention_mask"][t:t + 1], text_hidden=hidden[t:t + 1])
            ref_terms.append(-torch.log_softmax(head(fused.text[0, 0]), dim=0)[label])
    reference = torch.stack(ref_terms).mean()
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}

    # hardest against the whole job's similarities, excluding identical captions
    ids = full["input_ids"]
    ref_text, ref_video = [], []
    for i in range(mine.start, mine.stop):
        others = [j for j in rows.tolist() if not torch.equal(ids[j], ids[i])]
        images, texts = full_out["image_embeds"], full_out["text_embeds"]
        ref_text.append(max(others, key=lambda j: float(images[i] @ texts[j])))
        ref_video.append(max(others, key=lambda j: float(texts[i] @ images[j])))

    # gather: false uses this rank's samples only (rank 0 then has no candidate) and sends nothing
    calls.clear()
    local_only = build({"matching": {"negatives": "hardest", "gather": False}}).eval()
    with torch.no_grad():
        alone = local_only.objectives["matching"](local_only.encode(local), local, local_only.model)
    return {
        "neg_text": neg_text, "neg_video": neg_video, "valid_text": valid_text,
        "valid_video": valid_video, "ref_text": ref_text, "ref_video": ref_video,
        "loss": out.loss.detach(), "reference": reference.detach(), "grads": grads,
        "ref_grads": ref_grads, "forward_bytes": forward_bytes,
        "backward_bytes": out.comm.backward_bytes, "metrics": out.metrics,
        "shapes": {"embed": outputs["image_embeds"].shape[1],
                   "vision": tuple(outputs["vision"].tokens.shape),
                   "hidden": tuple(outputs["text_hidden"].shape)},
        "local_only": {"neg_text": calls[0][0], "valid_text": calls[0][1], "bytes": alone.bytes_sent,
                       "candidates": alone.metrics["candidates"]},
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    outdir = str(tmp_path_factory.mktemp("matching2"))
    try:
        mp.spawn(run_rank, args=(_dist_matching, 2, free_port(), outdir), nprocs=2, join=True)
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        errors = "".join(open(p).read() for p in sorted(glob.glob(os.path.join(outdir, "*.error"))))
        pytest.fail(f"a rank failed\n{errors}")
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def test_two_ranks_draw_negatives_from_the_other_rank(two_ranks):
    rank0, rank1 = two_ranks
    # rank 0's captions are identical: every negative must be one of rank 1's samples (rows 2, 3)
    assert rank0["valid_text"].all() and rank0["valid_video"].all()
    assert set(rank0["neg_text"].tolist()) <= {2, 3} and set(rank0["neg_video"].tolist()) <= {2, 3}
    for r in two_ranks:
        assert r["neg_text"].tolist() == r["ref_text"] and r["neg_video"].tolist() == r["ref_video"]
        assert r["metrics"]["candidates"] == 4
    # without gathering, rank 0 has nothing to draw from and nothing is sent
    assert not rank0["local_only"]["valid_text"].any() and rank1["local_only"]["valid_text"].all()
    assert all(r["local_only"]["bytes"] == 0 and r["local_only"]["candidates"] == 2 for r in two_ranks)


def test_two_ranks_loss_and_gradients_match_the_reference(two_ranks):
    """Loss and every parameter's gradient equal the per-pair reference in which the other rank's
    samples are constants: the local encoders get the gradient of every pair that uses them."""
    for r in two_ranks:
        assert r["loss"].item() == pytest.approx(r["reference"].item(), rel=1e-5)
        for name, grad in r["grads"].items():
            ref = r["ref_grads"].get(name)
            if ref is None:  # only reached through the zero-weighted contrastive inputs
                assert not grad.any(), name
                continue
            assert (grad - ref).norm() <= 1e-4 * ref.norm() + 1e-8, name
        encoders = [g for n, g in r["grads"].items() if n.startswith(("model.image_encoder.",
                                                                       "model.text_encoder."))]
        assert sum(g.norm() for g in encoders) > 0


def test_two_ranks_bytes_are_the_documented_gathers(two_ranks):
    """(k - 1) x (embeddings + ids and masks + visual tokens + text states), all in the forward."""
    s = two_ranks[0]["shapes"]
    expected = (PER_RANK * 2 * s["embed"] * 4 + PER_RANK * 2 * LENGTH * 8
                + math.prod(s["vision"]) * 4 + math.prod(s["hidden"]) * 4)
    for r in two_ranks:
        assert r["forward_bytes"] == expected and r["backward_bytes"] == 0


# ------------------------------------------------------------------------------------------------
# word_matching


def _reference_mil_nce(videos, words, present, scale, symmetric):
    """Per-element MIL-NCE in Python floats: ``words[j]`` lists caption j's word vectors."""
    b = len(videos)
    s = [[[scale * sum(x * y for x, y in zip(videos[i], words[j][k])) for k in range(len(words[j]))
           if present[j][k]] for j in range(b)] for i in range(b)]
    captions = [j for j in range(b) if any(present[j])]
    if not captions:
        return 0.0
    v2t = [-math.log(sum(math.exp(x) for x in s[i][i])
                     / sum(math.exp(x) for j in range(b) for x in s[i][j])) for i in captions]
    loss = sum(v2t) / len(captions)
    if not symmetric:
        return loss
    bag = [[math.log(sum(math.exp(x) for x in s[i][j])) if s[i][j] else None for j in range(b)]
           for i in range(b)]
    t2v = [-math.log(math.exp(bag[j][j]) / sum(math.exp(bag[i][j]) for i in range(b))) for j in captions]
    return (loss + sum(t2v) / len(captions)) / 2


@pytest.mark.parametrize("symmetric", [True, False])
def test_mil_nce_matches_a_per_element_reference(symmetric):
    g = torch.Generator().manual_seed(0)
    videos = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    words = F.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
    present = torch.tensor([[True, True, True], [True, False, False], [False, False, False],
                            [False, True, True]])
    loss, numbers = mil_nce_loss(videos, words, present, torch.tensor(7.0), symmetric)
    expected = _reference_mil_nce(videos.tolist(), words.tolist(), present.tolist(), 7.0, symmetric)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert numbers["captions"] == 3


def _word_batch_reference(pm, outputs, batch, k=3):
    """Word embeddings by loops over tokens (mean of each word's tokens), then the Python MIL-NCE."""
    hidden, sig, attn = outputs["text_hidden"], batch["significant"], batch["attention_mask"]
    words, present = [], []
    for j in range(hidden.shape[0]):
        row_w, row_p = [], []
        for word in range(1, k + 1):
            tokens = [hidden[j, t] for t in range(hidden.shape[1]) if sig[j, t] == word and attn[j, t]]
            row_p.append(bool(tokens))
            state = torch.stack(tokens).mean(0) if tokens else torch.zeros(hidden.shape[2])
            row_w.append(F.normalize(pm.model.text_proj(state), dim=0).tolist())
        words.append(row_w)
        present.append(row_p)
    return _reference_mil_nce(outputs["image_embeds"].tolist(), words, present,
                              outputs["logit_scale"].item(), True)


def test_word_matching_through_the_model_matches_the_reference():
    """Caption 0 has no significant word (masked out); word 4 is beyond words_per_caption."""
    pm = build({"word_matching": {}}, fusion=None).eval()
    batch = make_batch(4)
    with torch.no_grad():
        outputs = pm.encode(batch)
        out = pm.objectives["word_matching"](outputs, batch, pm.model)
        expected = _word_batch_reference(pm, outputs, batch)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.metrics["captions_with_words"] == 3 and out.metrics["words_per_caption"] == 9 / 4


def test_word_matching_without_any_significant_word_is_zero_and_reaches_every_parameter():
    pm = build({"word_matching": {}}, fusion=None).train()
    batch = make_batch(3)
    batch["significant"].zero_()
    _, results = pm(batch)
    assert results["word_matching"].loss.item() == 0
    results["word_matching"].loss.backward()
    _grads_complete(pm)


def test_word_matching_every_parameter_gets_a_gradient():
    pm = build({"word_matching": {"words_per_caption": 2}}, fusion=None).train()
    _, results = pm(make_batch(4))
    results["word_matching"].loss.backward()
    _grads_complete(pm)
    for part in ("model.image_encoder.", "model.text_encoder.", "model.text_proj.", "model.image_proj."):
        assert _norm(pm, part) > 0, part


def test_word_matching_loss_falls_when_overfitting_one_batch():
    pm = build({"word_matching": {}}, fusion=None)
    losses = _overfit(pm, "word_matching", make_batch(4), steps=8, lr=1e-3)
    assert losses[-1] < 0.3 * losses[0], losses
