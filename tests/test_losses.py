"""Contrastive losses and cross-rank collectives, against single-process references.

The distributed tests run on real Gloo process groups of 2 and 4 ranks spawned here (one spawn per
world size for the whole module: tests/dist_workers.py computes every scenario, these tests compare).
Promises protected: every mode's value and feature gradients match its reference; grouped equals
global when k = N and works in groups without rank 0; DDP-averaged parameter gradients equal the
reference model's gradients; bytes sent match the documented formulas; single process works; bad
configs fail with clear messages. NegNCE (the workers' ``negnce_*`` scenarios) keeps all of these
promises in every softmax mode, sends nothing more, is plain InfoNCE at weight 0 and matches a hand-computed example.
"""

from __future__ import annotations

import glob
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from tests import dist_workers
from tests.conftest import free_port
from tests.dist_workers import (
    NEGNCE,
    NEGNCE_MARGIN,
    NEGNCE_WEIGHT,
    BATCH,
    DIM,
    LOGIT_BIAS,
    LOGIT_SCALE,
    TinyTowers,
    collective_weights,
    make_features,
    make_tower_inputs,
)
from vlp.config import ConfigError
from vlp.distributed import CommCounter, gather_with_grad, rank_groups, ring_exchange
from vlp.losses import (
    CONTRASTIVE_LOSSES,
    ContrastiveLossConfig,
    build_contrastive_loss,
    reference_clip_loss,
    reference_grouped_clip_loss,
    reference_sigmoid_loss,
)
from vlp.losses.contrastive import negnce_loss
from vlp.losses.reference import reference_grouped_negnce_clip_loss, reference_negnce_clip_loss

WORLD_SIZES = (2, 4)
TOL = 1e-5
FLOAT32 = 4
SOFTMAX_MODES = ("global", "local", "grouped")
def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error (elementwise would be dominated by entries near zero)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory) -> dict[int, list[dict]]:
    """{world size: [rank 0 results, rank 1 results, ...]} from real Gloo groups."""
    results = {}
    for world in WORLD_SIZES:
        outdir = str(tmp_path_factory.mktemp(f"dist{world}"))
        try:
            mp.spawn(dist_workers.run_loss_checks, args=(world, free_port(), outdir), nprocs=world,
                     join=True)
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            errors = []
            for path in sorted(glob.glob(os.path.join(outdir, "*.error"))):
                with open(path) as f:
                    errors.append(f.read())
            pytest.fail(f"world size {world}: a rank failed\n{''.join(errors)}")
        results[world] = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
                          for r in range(world)]
    return results


# ------------------------------------------------------------------------------------------------
# References on the concatenated batch


def _num_groups(mode: str, world: int) -> int:
    """Groups of a softmax scenario: 1 for global and local, N / k for grouped_k<k>."""
    mode = mode.removeprefix(NEGNCE)
    return 1 if mode in ("global", "local") else world // int(mode[len("grouped_k"):])


def _reference(mode: str, world: int, images, texts, scale, bias):
    if mode.startswith(NEGNCE):
        return reference_grouped_negnce_clip_loss(images, texts, scale, NEGNCE_WEIGHT, NEGNCE_MARGIN,
                                                  _num_groups(mode, world))
    if mode in ("global", "local"):
        return reference_clip_loss(images, texts, scale)
    if mode.startswith("grouped_k"):
        return reference_grouped_clip_loss(images, texts, scale, world // int(mode[len("grouped_k"):]))
    if mode == "sigmoid":
        return reference_sigmoid_loss(images, texts, scale, bias)
    raise AssertionError(mode)


def _reference_with_grads(mode: str, world: int) -> dict:
    images, texts = (t.double().requires_grad_(True) for t in make_features(world))
    scale = torch.tensor(LOGIT_SCALE, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(LOGIT_BIAS, dtype=torch.float64, requires_grad=True)
    loss = _reference(mode, world, images, texts, scale, bias)
    loss.backward()
    return {"loss": loss.detach(), "grad_images": images.grad, "grad_texts": texts.grad,
            "grad_scale": scale.grad, "grad_bias": bias.grad}


def _modes(world: int) -> list[str]:
    plain = ["global", "local", "sigmoid"] + [f"grouped_k{k}" for k in (1, 2, 4) if world % k == 0]
    return plain + [NEGNCE + mode for mode in plain if mode != "sigmoid"]


# ------------------------------------------------------------------------------------------------
# Distributed: values and gradients


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_every_mode_matches_its_reference_in_value_and_feature_gradients(dist_results, world):
    """Mean of per-rank losses == reference; rank r's feature grads == W x reference grad slice."""
    ranks = dist_results[world]
    for mode in _modes(world):
        ref = _reference_with_grads(mode, world)
        mean_loss = torch.stack([r["losses"][mode]["loss"] for r in ranks]).mean()
        assert rel_err(mean_loss, ref["loss"]) < TOL, mode
        for rank, result in enumerate(ranks):
            mine = slice(rank * BATCH, (rank + 1) * BATCH)
            for key in ("grad_images", "grad_texts"):
                got, want = result["losses"][mode][key], world * ref[key][mine]
                assert rel_err(got, want) < TOL, (mode, rank, key, rel_err(got, want))
        # Scale and bias are replicated: the mean of the per-rank grads is the reference grad.
        for key in ("grad_scale", "grad_bias") if mode == "sigmoid" else ("grad_scale",):
            mean_grad = torch.stack([r["losses"][mode][key] for r in ranks]).mean()
            assert rel_err(mean_grad, ref[key]) < TOL, (mode, key)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_global_gives_every_rank_the_full_loss(dist_results, world):
    ref = _reference_with_grads("global", world)
    for result in dist_results[world]:
        assert rel_err(result["losses"]["global"]["loss"], ref["loss"]) < TOL


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_grouped_with_k_equal_world_is_global_and_local(dist_results, world):
    for rank, result in enumerate(dist_results[world]):
        grouped, local = result["losses"][f"grouped_k{world}"], result["losses"]["local"]
        glob_ = result["losses"]["global"]
        for key in ("loss", "grad_images", "grad_texts", "grad_scale"):
            assert torch.equal(grouped[key], local[key]), (rank, key)
        for key in ("grad_images", "grad_texts"):
            assert rel_err(grouped[key], glob_[key]) < TOL, (rank, key)
    means = {m: torch.stack([r["losses"][m]["loss"] for r in dist_results[world]]).mean()
             for m in ("global", f"grouped_k{world}")}
    assert rel_err(means[f"grouped_k{world}"], means["global"]) < TOL


def test_grouped_k2_at_world_4_differs_from_global(dist_results):
    """Sanity: the grouped approximation really restricts the negatives (the test could not pass by
    accident with a global gather)."""
    ranks = dist_results[4]
    grouped = torch.stack([r["losses"]["grouped_k2"]["loss"] for r in ranks]).mean()
    global_ = torch.stack([r["losses"]["global"]["loss"] for r in ranks]).mean()
    assert rel_err(grouped, global_) > 1e-3
    assert ranks[0]["losses"]["grouped_k2"]["num_negatives"] == 2 * BATCH - 1
    assert ranks[0]["losses"]["global"]["num_negatives"] == 4 * BATCH - 1


def test_grouped_group_size_defaults_to_ranks_per_node(dist_results):
    for result in dist_results[4]:
        node, explicit = result["losses"]["grouped_node"], result["losses"]["grouped_k2"]
        for key in ("loss", "grad_images", "grad_texts"):
            assert torch.equal(node[key], explicit[key])


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_every_reduce_scatter_implementation_gives_the_same_gradients(dist_results, world):
    """Native reduce_scatter, all_to_all + sum (Gloo's default) and all_reduce + slice agree."""
    for result in dist_results[world]:
        default = result["losses"]["grouped_k2"]
        for impl in ("reduce_scatter", "all_reduce", "all_to_all"):
            other = result["losses"][f"grouped_k2_{impl}"]
            for key in ("loss", "grad_images", "grad_texts"):
                assert rel_err(other[key], default[key]) < 1e-6, (impl, key)
            assert other["backward_bytes"] == default["backward_bytes"]


def _hard_negatives_and_closest_call(images, texts, margin: float, num_groups: int):
    """(hard negatives over both directions of every group, smallest |cosine - threshold|)."""
    count, closest = 0, math.inf
    for group_images, group_texts in zip(images.double().chunk(num_groups),
                                         texts.double().chunk(num_groups)):
        sims = group_images @ group_texts.T
        off_diagonal = ~torch.eye(sims.shape[0], dtype=torch.bool)
        for rows in (sims, sims.T):
            above = rows - (rows.diagonal()[:, None] - margin)
            count += int(((above > 0) & off_diagonal).sum())
            closest = min(closest, above[off_diagonal].abs().min().item())
    return count, closest


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_negnce_scenarios_have_hard_negatives_and_change_the_loss(dist_results, world):
    """Guards the NegNCE checks above: there are hard negatives to find, none so close to the
    threshold that float32 and float64 could pick differently, and the term changes the loss."""
    torch.manual_seed(7)
    towers = TinyTowers(with_bias=False).double()
    tower_images, tower_texts, _, _ = towers(*(t.double() for t in make_tower_inputs(world)))
    for mode in _modes(world):
        if not mode.startswith(NEGNCE):
            continue
        for images, texts in (make_features(world), (tower_images.detach(), tower_texts.detach())):
            count, closest = _hard_negatives_and_closest_call(images, texts, NEGNCE_MARGIN,
                                                              _num_groups(mode, world))
            assert count > 0 and closest > 1e-5, (mode, count, closest)
        means = {m: torch.stack([r["losses"][m]["loss"] for r in dist_results[world]]).mean()
                 for m in (mode, mode.removeprefix(NEGNCE))}
        assert rel_err(means[mode], means[mode.removeprefix(NEGNCE)]) > 1e-3, mode


# ------------------------------------------------------------------------------------------------
# Distributed: raw collectives, including a group without global rank 0


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_gather_with_grad_concatenates_and_reduce_scatters_sums(dist_results, world):
    for k in sorted({2, world}):
        for g, members in enumerate(rank_groups(world, k)):
            inputs = [torch.arange(12.0).reshape(3, 4) + 100 * r for r in members]
            for local, rank in enumerate(members):
                got = dist_results[world][rank]["collectives"][f"gather_k{k}"]
                assert torch.equal(got["out"], torch.cat(inputs)), (k, g, rank)
                want = sum(collective_weights(world, q, 3 * k, 4)[local * 3:(local + 1) * 3]
                           for q in members)
                assert rel_err(got["grad"], want) < 1e-6, (k, g, rank)
                assert got["forward_bytes"] == got["backward_bytes"] == (k - 1) * 3 * 4 * FLOAT32
                # every byte is booked to the group that carried it, named by its global ranks
                assert got["by_group"] == {tuple(members): 2 * (k - 1) * 3 * 4 * FLOAT32}, (k, rank)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_ring_exchange_passes_forward_and_returns_gradients(dist_results, world):
    for k in sorted({2, world}):
        for members in rank_groups(world, k):
            for local, rank in enumerate(members):
                prev, nxt = members[(local - 1) % k], members[(local + 1) % k]
                got = dist_results[world][rank]["collectives"][f"ring_k{k}"]
                assert torch.equal(got["out"], torch.arange(12.0).reshape(3, 4) + 100 * prev)
                assert torch.equal(got["grad"], collective_weights(world, nxt, 3, 4))
                assert got["forward_bytes"] == got["backward_bytes"] == 3 * 4 * FLOAT32
                assert got["by_group"] == {tuple(members): 2 * 3 * 4 * FLOAT32}, (k, rank)


# ------------------------------------------------------------------------------------------------
# Distributed: bytes


def _expected_bytes(mode: str, world: int) -> tuple[int, int]:
    """(forward, backward) bytes one rank sends: the formulas in vlp/losses/contrastive.py."""
    chunk = BATCH * DIM * FLOAT32
    mode = mode.removeprefix(NEGNCE)  # NegNCE works on the logits already built: nothing more sent
    if mode == "sigmoid":
        return (world - 1) * chunk, (world - 1) * chunk
    k = world if mode in ("global", "local") else int(mode[len("grouped_k"):])
    return 2 * (k - 1) * chunk, 2 * (k - 1) * chunk


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_bytes_sent_per_step_match_the_formulas(dist_results, world):
    for result in dist_results[world]:
        for mode in _modes(world):
            got = result["losses"][mode]
            forward, backward = _expected_bytes(mode, world)
            assert got["forward_bytes_before_backward"] == forward, mode
            assert (got["forward_bytes"], got["backward_bytes"]) == (forward, backward), mode
    # The headline: grouped sends 4 (k-1) B D e per step, whatever the world size.
    chunk = BATCH * DIM * FLOAT32
    got = dist_results[world][0]["losses"]["grouped_k2"]
    assert got["forward_bytes"] + got["backward_bytes"] == 4 * (2 - 1) * chunk


# ------------------------------------------------------------------------------------------------
# Distributed: DDP parameter gradients


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_ddp_averaged_parameter_gradients_equal_the_reference_model(dist_results, world):
    """DDP's 1/W average must not scale contrastive gradients: grads == single-process reference."""
    images, texts = make_tower_inputs(world)
    for mode in _modes(world):
        if mode == "grouped_k1":
            continue
        torch.manual_seed(7)
        model = TinyTowers(with_bias=mode == "sigmoid")
        model.double()
        image_features, text_features, scale, bias = model(images.double(), texts.double())
        _reference(mode, world, image_features, text_features, scale, bias).backward()
        for rank, result in enumerate(dist_results[world]):
            for name, param in model.named_parameters():
                got = result["ddp"][mode][name]
                assert rel_err(got, param.grad) < TOL, (mode, rank, name, rel_err(got, param.grad))


# ------------------------------------------------------------------------------------------------
# Distributed: bad configs


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_group_size_not_dividing_world_size_fails_clearly(dist_results, world):
    for result in dist_results[world]:
        message = result["errors"]["k_not_dividing"]
        assert message is not None and "not divisible by group size 3" in message
        message = result["errors"]["k_unset"]
        assert message is not None and "local_world_size" in message


# ------------------------------------------------------------------------------------------------
# Single process (no process group)


def _features(batch: int, dim: int = DIM, seed: int = 3):
    images, texts = make_features(1, batch, dim, seed)
    return images.requires_grad_(True), texts.requires_grad_(True)


@pytest.mark.parametrize("mode", CONTRASTIVE_LOSSES.names())
@pytest.mark.parametrize("batch", [1, 7])
def test_single_process_every_mode_equals_reference_and_sends_nothing(mode, batch):
    loss_fn = build_contrastive_loss(ContrastiveLossConfig(mode=mode))
    scale = torch.tensor(LOGIT_SCALE, requires_grad=True)
    bias = torch.tensor(LOGIT_BIAS, requires_grad=True) if loss_fn.uses_logit_bias else None
    images, texts = _features(batch)
    out = loss_fn(images, texts, scale, bias)
    out.loss.backward()
    ref_images, ref_texts = (t.detach().clone().requires_grad_(True) for t in (images, texts))
    ref_scale = scale.detach().clone().requires_grad_(True)
    if mode == "sigmoid":
        ref = reference_sigmoid_loss(ref_images, ref_texts, ref_scale, LOGIT_BIAS)
    else:
        ref = reference_clip_loss(ref_images, ref_texts, ref_scale)
    ref.backward()
    assert torch.isfinite(out.loss)
    assert rel_err(out.loss, ref) < TOL
    for got, want in ((images.grad, ref_images.grad), (texts.grad, ref_texts.grad),
                      (scale.grad, ref_scale.grad)):
        assert rel_err(got, want) < TOL
    assert out.bytes_sent == 0 and out.num_negatives == batch - 1


@pytest.mark.parametrize("mode", SOFTMAX_MODES)
def test_negnce_weight_zero_is_plain_infonce_exactly(mode):
    images, texts = _features(7)
    scale = torch.tensor(LOGIT_SCALE)
    plain = build_contrastive_loss(ContrastiveLossConfig(mode=mode))(images, texts, scale)
    off = build_contrastive_loss(ContrastiveLossConfig(mode=mode, negnce_margin=0.5))(
        images, texts, scale)
    assert torch.equal(off.loss, plain.loss)
    assert plain.hard_negatives is None and off.hard_negatives is None


@pytest.mark.parametrize("mode", SOFTMAX_MODES)
@pytest.mark.parametrize("margin", [0.0, 0.15, -0.05])
def test_negnce_matches_reference_in_value_and_gradients(mode, margin):
    """Single process: loss and the gradients of features and scale == autograd of the reference."""
    weight = 0.7
    loss_fn = build_contrastive_loss(ContrastiveLossConfig(mode=mode, negnce_weight=weight,
                                                           negnce_margin=margin))
    images, texts = _features(9)
    scale = torch.tensor(LOGIT_SCALE, requires_grad=True)
    count, closest = _hard_negatives_and_closest_call(images.detach(), texts.detach(), margin, 1)
    assert count > 0 and closest > 1e-5, (count, closest)  # the check below has hard negatives
    out = loss_fn(images, texts, scale, torch.tensor(LOGIT_BIAS))  # the bias must change nothing
    out.loss.backward()
    ref_images, ref_texts = (t.detach().double().requires_grad_(True) for t in (images, texts))
    ref_scale = torch.tensor(LOGIT_SCALE, dtype=torch.float64, requires_grad=True)
    ref = reference_negnce_clip_loss(ref_images, ref_texts, ref_scale, weight, margin)
    ref.backward()
    assert rel_err(out.loss, ref) < TOL
    assert rel_err(out.loss, reference_clip_loss(ref_images, ref_texts, ref_scale)) > 1e-3
    for got, want in ((images.grad, ref_images.grad), (texts.grad, ref_texts.grad),
                      (scale.grad, ref_scale.grad)):
        assert rel_err(got, want) < TOL
    assert out.hard_negatives.item() == pytest.approx(count / (2 * 9))


def _hand_built_features():
    """Images e0, e1, e2 and texts whose cosine matrix (image rows, text columns) is
    ``[[0.6, 0, 0], [0.8, 1, 0], [0, 0, 1]]``: text 0 is closer to image 1 (0.8) than to its own image
    (0.6), and image 1's positive (1.0) is 0.2 above its nearest negative (text 0, 0.8)."""
    images = torch.eye(3)
    texts = torch.tensor([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return images.requires_grad_(True), texts.requires_grad_(True)


@pytest.mark.parametrize("mode", SOFTMAX_MODES)
@pytest.mark.parametrize("margin, image_to_text, text_to_image, hard_per_row", [
    # Margin 0: only text 0 -> image 1 is hard (0.8 > 0.6), one of 6 rows over both directions.
    (0.0, 0.0, math.log1p(math.exp(10 * (0.8 - 0.6))) / 3, 1 / 6),
    # Margin 0.25: image 1 -> text 0 becomes hard as well (0.8 > 1.0 - 0.25); text 0's 0 does not.
    (0.25, math.log1p(math.exp(10 * (0.8 - 1.0))) / 3, math.log1p(math.exp(10 * (0.8 - 0.6))) / 3,
     2 / 6),
])
def test_negnce_hand_built_3x3_example(mode, margin, image_to_text, text_to_image, hard_per_row):
    """Known hard negatives, in one direction only at margin 0 (a transposed direction would miss it)."""
    images, texts = _hand_built_features()
    scale, weight = torch.tensor(10.0), 2.0
    out = build_contrastive_loss(ContrastiveLossConfig(mode=mode, negnce_weight=weight,
                                                       negnce_margin=margin))(images, texts, scale)
    want = reference_clip_loss(images, texts, scale) + weight * (image_to_text + text_to_image) / 2
    assert rel_err(out.loss, want) < TOL
    assert out.hard_negatives.item() == pytest.approx(hard_per_row)
    assert rel_err(reference_negnce_clip_loss(images, texts, scale, weight, margin), want) < TOL


@pytest.mark.parametrize("mode", SOFTMAX_MODES)
def test_negnce_margin_two_makes_every_negative_hard(mode):
    """With every negative hard, NegNCE's denominator is InfoNCE's: loss == (1 + weight) x InfoNCE."""
    weight = 0.5
    images, texts = _features(7)
    scale = torch.tensor(LOGIT_SCALE)
    out = build_contrastive_loss(ContrastiveLossConfig(mode=mode, negnce_weight=weight,
                                                       negnce_margin=2.0))(images, texts, scale)
    assert rel_err(out.loss, (1 + weight) * reference_clip_loss(images, texts, scale)) < TOL
    assert out.hard_negatives.item() == 6


def test_negnce_gradient_flows_only_through_the_positive_and_the_hard_negatives():
    logits = torch.tensor([[1.0, 2.0, 0.5, 0.9],
                           [3.0, 1.0, 2.0, 2.5]], requires_grad=True)
    labels = torch.tensor([0, 2])
    term, hard = negnce_loss(logits, labels, logit_scale=1.0, margin=0.0)
    term.backward()
    selected = torch.tensor([[True, True, False, False], [True, False, True, True]])
    assert (logits.grad[~selected] == 0).all() and (logits.grad[selected] != 0).all()
    assert hard.item() == 1.5
    want = (math.log1p(math.exp(2.0 - 1.0)) + math.log1p(math.exp(1.0) + math.exp(0.5))) / 2
    assert term.item() == pytest.approx(want)


def test_negnce_rows_without_hard_negatives_add_exactly_zero():
    logits = torch.tensor([[5.0, 1.0, 2.0], [0.0, 4.0, -1.0]], requires_grad=True)
    term, hard = negnce_loss(logits, torch.tensor([0, 1]), logit_scale=1.0, margin=0.0)
    term.backward()
    assert term.item() == 0.0 and hard.item() == 0.0
    assert (logits.grad == 0).all()


def test_single_process_collectives_are_identity():
    x = torch.randn(3, 4, requires_grad=True)
    counter = CommCounter()
    assert gather_with_grad(x, counter=counter) is x
    assert ring_exchange(x, counter=counter) is x
    assert counter.bytes_sent == 0 and counter.calls == 0


def test_softmax_modes_accept_a_bias_without_changing_the_loss():
    images, texts = _features(6)
    scale = torch.tensor(LOGIT_SCALE)
    bias = torch.tensor(-4.0, requires_grad=True)
    loss_fn = build_contrastive_loss(ContrastiveLossConfig(mode="local"))
    with_bias = loss_fn(images, texts, scale, bias).loss
    without = loss_fn(images, texts, scale).loss
    assert rel_err(with_bias, without) < 1e-6
    with_bias.backward()
    assert bias.grad is not None and abs(bias.grad.item()) < 1e-5


def test_counter_sums_several_calls():
    counter = CommCounter()
    counter.add(10, backward=False)
    counter.add(5, backward=True)
    counter.add(0, backward=True)
    assert (counter.forward_bytes, counter.backward_bytes, counter.bytes_sent, counter.calls) == (
        10, 5, 15, 2)
    counter.add(7, backward=False, ranks=(2, 3))
    assert counter.by_group == {(): 15, (2, 3): 7}
    counter.reset()
    assert counter.bytes_sent == 0 and counter.calls == 0 and counter.by_group == {}


# ------------------------------------------------------------------------------------------------
# Bad configs and inputs


def test_unknown_mode_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown contrastive loss mode 'glbal'.*global, grouped"):
        ContrastiveLossConfig(mode="glbal")


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "grouped", "group_size": 0}, "group_size must be >= 1"),
    ({"mode": "local", "group_size": 2}, "applies to mode 'grouped' only"),
])
def test_bad_group_size_in_config_fails(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ContrastiveLossConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"negnce_weight": -0.1}, "negnce_weight must be >= 0"),
    ({"negnce_weight": float("nan")}, "negnce_weight must be >= 0"),
    ({"negnce_margin": 2.5}, r"negnce_margin must be in \[-1, 2\]"),
    ({"negnce_margin": -1.5}, r"negnce_margin must be in \[-1, 2\]"),
    ({"mode": "sigmoid", "negnce_weight": 0.5}, "needs a softmax mode.*not 'sigmoid'"),
])
def test_bad_negnce_config_fails(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ContrastiveLossConfig(**kwargs)


def test_negnce_bounds_and_sigmoid_without_negnce_are_accepted():
    ContrastiveLossConfig(mode="sigmoid", negnce_margin=0.3)  # weight 0: NegNCE is off
    ContrastiveLossConfig(mode="local", negnce_weight=1.0, negnce_margin=-1.0)
    ContrastiveLossConfig(mode="global", negnce_weight=1.0, negnce_margin=2.0)


def test_grouped_group_size_must_divide_the_world_size_in_a_single_process():
    with pytest.raises(ValueError, match="world size 1 is not divisible by group size 2"):
        build_contrastive_loss(ContrastiveLossConfig(mode="grouped", group_size=2))


def test_rank_groups_layout_and_errors():
    assert rank_groups(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rank_groups(4, 1) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="not divisible"):
        rank_groups(6, 4)
    with pytest.raises(ValueError, match=">= 1"):
        rank_groups(4, 0)


def test_node_groups_list_each_nodes_ranks_in_order():
    from vlp.distributed import node_groups

    assert node_groups([0, 0, 1, 1]) == [[0, 1], [2, 3]]
    assert node_groups(["b", "a", "b", "a", "c"]) == [[0, 2], [1, 3], [4]]
    assert node_groups([]) == []


def test_a_by_node_grouped_loss_refuses_nodes_with_unequal_workers():
    from vlp.config import load_config
    from vlp.train.config import TrainConfig
    from vlp.train.loop import check_groups_follow_nodes

    by_node = load_config(TrainConfig, None, ["objectives.contrastive.loss.mode=grouped"])
    check_groups_follow_nodes(by_node, [0, 0, 1, 1], local_world_size=2)  # two nodes of two: fine
    with pytest.raises(ConfigError, match=r"workers sit on the nodes as \[3, 1\]"):
        check_groups_follow_nodes(by_node, [0, 0, 0, 1], local_world_size=3)
    with pytest.raises(ConfigError, match="group_size is null"):
        check_groups_follow_nodes(by_node, [0, 1, 0, 1], local_world_size=2)  # not node by node
    # a set group size, or another mode, does not depend on the nodes
    fixed = load_config(TrainConfig, None, ["objectives.contrastive.loss.mode=grouped",
                                            "objectives.contrastive.loss.group_size=2"])
    check_groups_follow_nodes(fixed, [0, 0, 0, 1], local_world_size=3)
    local = load_config(TrainConfig, None, ["objectives.contrastive.loss.mode=local"])
    check_groups_follow_nodes(local, [0, 0, 0, 1], local_world_size=3)


def test_sigmoid_without_bias_and_mismatched_shapes_fail():
    images, texts = _features(4)
    with pytest.raises(ValueError, match="needs logit_bias"):
        build_contrastive_loss(ContrastiveLossConfig(mode="sigmoid"))(images, texts,
                                                                     torch.tensor(1.0))
    with pytest.raises(ValueError, match="same shape"):
        build_contrastive_loss(ContrastiveLossConfig(mode="global"))(images, texts[:3],
                                                                    torch.tensor(1.0))
