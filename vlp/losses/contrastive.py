"""Image-text contrastive losses across ranks: one interface, several communication strategies.

Every strategy is an ``nn.Module`` registered under a name and built from a
:class:`ContrastiveLossConfig` by :func:`build_contrastive_loss`. All answer
``forward(image_features, text_features, logit_scale, logit_bias=None) -> ContrastiveOutput``:
features arrive L2-normalised, ``(B, D)`` with the same B on every rank (any B: a trainer may pass a
pool of accumulated micro-batches); ``logit_scale`` is the already exponentiated scale; the model owns
the scale and bias parameters, the loss only receives them.

Strategies (N ranks, B samples and D dimensions per rank, e bytes per element, k ranks per group):

- ``global``: CLIP. Every rank gathers all features and computes the full ``NB x NB`` logits.
  ``NB - 1`` negatives per sample; ``4 (N-1) B D e`` bytes sent per step.
- ``local``: OpenCLIP's ``local_loss`` with ``gather_with_grad``. A rank's ``B`` rows against all
  ``NB`` columns. ``NB - 1`` negatives; ``4 (N-1) B D e`` bytes.
- ``grouped``: M2-Encoder's grouped aggregation. A rank's ``B`` rows against the ``kB`` columns of its
  group of k ranks. ``kB - 1`` negatives; ``4 (k-1) B D e`` bytes.
- ``sigmoid``: SigLIP. Local images against local texts, then N - 1 ring exchanges of text features
  (every received block is all negatives). ``NB - 1`` negatives (pairwise); ``2 (N-1) B D e`` bytes.

Bytes are those this rank sends (:mod:`vlp.distributed.collectives` has the rule): the softmax
strategies all-gather image and text features in forward (``2 (k-1) B D e``, k = N for ``global`` and
``local``) and reduce-scatter their gradients in backward (the same again); sigmoid sends ``B D e``
per ring step forward and the same per step backward. Nothing else is sent: ``logit_scale`` and
``logit_bias`` are replicated parameters whose gradients DDP averages with all the others. ``ContrastiveOutput.comm`` is filled by the forward collectives at once and by the
backward ones when ``backward()`` runs: read it after the backward pass.

Value: each rank's ``loss`` is its own term; the loss of the job is the mean of the N terms. For
``global`` every term is the full CLIP loss; for ``local`` the terms average to it; for ``grouped`` they
average to the mean over groups of each group's CLIP loss (exactly ``local`` when k = N); for
``sigmoid`` (each term divided by the local B) they average to the SigLIP loss of the whole batch.
:mod:`vlp.losses.reference` writes each of these out for a single process.

Gradient convention (OpenCLIP's, all modes): the gradient a rank gets for its *own* features is N
times the gradient of the job's mean loss, because the differentiable collectives sum, over the
ranks that saw a tensor, the gradients of their own terms. DDP then averages parameter gradients
over the N ranks, and the 1/N cancels the N: the averaged gradient is exactly the gradient of the
mean loss. ``logit_scale`` and ``logit_bias`` are not gathered, so their per-rank gradient is that of
the rank's own term, and DDP's average again gives the mean loss's gradient. A trainer must therefore
*not* rescale contrastive gradients by the world size.

NegNCE (DMAE's hard-negative-aware InfoNCE; ``negnce_weight > 0``, softmax strategies only): row i's
hard negatives are the negatives j with ``logit_ij > logit_i,pos - negnce_margin * logit_scale`` (a
similarity above the positive's minus a margin in cosine units; margin 0: the negatives the model
ranks above the positive), selected by a mask computed without gradient. The row's term is
``-log(exp(p_i) / (exp(p_i) + sum_{j hard} exp(logit_ij)))`` (0 with no hard negative), averaged over
rows and over both directions like InfoNCE; the loss is ``InfoNCE + negnce_weight * NegNCE``. DMAE's
code is not published: this is our reconstruction from the paper's description. One helper,
:func:`negnce_loss`, applies it to the very logits each strategy already builds (``global``: the full
``NB x NB``; ``local`` and ``grouped``: the rank's rows against its group's columns), so it adds no
communication, and the values and gradient convention above hold unchanged
(:func:`vlp.losses.reference.reference_negnce_clip_loss` is the single-process definition).

A new strategy is a subclass of :class:`ContrastiveLoss` here (or in a new module of this package,
imported from ``vlp/losses/__init__.py``) with ``@register_contrastive_loss("name")``; it sends
tensors only through :mod:`vlp.distributed.collectives`. A softmax strategy subclasses
:class:`SoftmaxContrastiveLoss` and returns its ``softmax_terms``, which brings NegNCE along.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vlp.config import ConfigError
from vlp.distributed.collectives import (
    CommCounter,
    gather_with_grad,
    group_rank,
    group_size,
    new_rank_group,
    ring_exchange,
    world_size,
)
from vlp.registry import Registry

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

CONTRASTIVE_LOSSES: Registry[type[ContrastiveLoss]] = Registry("contrastive loss mode")


def register_contrastive_loss(name: str):
    """Class decorator: make a :class:`ContrastiveLoss` subclass buildable as ``mode: name``."""
    return CONTRASTIVE_LOSSES.register(name)


@dataclass(frozen=True)
class ContrastiveLossConfig:
    """Which contrastive strategy to run.

    Attributes:
        mode: a registered name: ``global``, ``local``, ``grouped`` or ``sigmoid``.
        group_size: ranks per group (``grouped`` only); must divide the world size. None means the
            ranks of one node, the ``local_world_size`` given to :func:`build_contrastive_loss`.
        negnce_weight: weight of the NegNCE term added to InfoNCE (>= 0; 0 turns it off). Softmax
            modes only (``global``, ``local``, ``grouped``).
        negnce_margin: a negative is hard when its cosine similarity exceeds the positive's minus
            this margin; in [-1, 2] (2 makes every negative hard).
    """

    mode: str = "grouped"
    group_size: int | None = None
    negnce_weight: float = 0.0
    negnce_margin: float = 0.0

    def __post_init__(self):
        if self.mode not in CONTRASTIVE_LOSSES:
            CONTRASTIVE_LOSSES.get(self.mode)  # raises, listing the registered modes
        if self.group_size is not None:
            if self.mode != "grouped":
                raise ConfigError(f"loss.group_size applies to mode 'grouped' only, not {self.mode!r}")
            if self.group_size < 1:
                raise ConfigError(f"loss.group_size must be >= 1, got {self.group_size}")
        if not self.negnce_weight >= 0:  # also rejects NaN
            raise ConfigError(f"loss.negnce_weight must be >= 0, got {self.negnce_weight}")
        if not -1.0 <= self.negnce_margin <= 2.0:
            raise ConfigError(f"loss.negnce_margin must be in [-1, 2] (cosine units), got "
                              f"{self.negnce_margin}")
        if self.negnce_weight > 0 and not issubclass(CONTRASTIVE_LOSSES.get(self.mode),
                                                     SoftmaxContrastiveLoss):
            raise ConfigError(
                f"loss.negnce_weight > 0 needs a softmax mode (global, local, grouped), not "
                f"{self.mode!r}: NegNCE reweights the softmax denominator of InfoNCE, which the "
                "pairwise sigmoid loss does not have"
            )


@dataclass
class ContrastiveOutput:
    """What one loss call returns.

    Attributes:
        loss: this rank's loss term (a scalar); the job's loss is the mean over ranks.
        num_negatives: negatives each sample is contrasted with.
        comm: bytes this rank sent for this call; backward traffic is added when ``backward()`` runs.
        hard_negatives: NegNCE's hard negatives per row, the mean over this rank's rows of both
            directions (a detached scalar, not synchronised); None when NegNCE is off.
    """

    loss: torch.Tensor
    num_negatives: int
    comm: CommCounter
    hard_negatives: torch.Tensor | None = None

    @property
    def bytes_sent(self) -> int:
        """Bytes sent so far by this call: forward only until ``backward()``, then the whole step."""
        return self.comm.bytes_sent


class ContrastiveTerms(NamedTuple):
    """What :meth:`ContrastiveLoss.compute` returns (a plain ``(loss, num_negatives)`` tuple works too)."""

    loss: torch.Tensor
    num_negatives: int
    hard_negatives: torch.Tensor | None = None


class ContrastiveLoss(nn.Module):
    """Base of the registered strategies: checks the inputs, owns the counter, returns the output.

    Attributes:
        group: the process group the strategy communicates in (None: the default group).
        uses_logit_bias: whether ``forward`` needs ``logit_bias`` (the model reads this to create one).
    """

    uses_logit_bias: ClassVar[bool] = False

    def __init__(self, group: ProcessGroup | None = None):
        super().__init__()
        self.group = group
        # The group layout is fixed at build time; a loss built before init_process_group would
        # silently run single-process, so forward() checks the job still has this many ranks.
        self.built_world_size = world_size()

    @classmethod
    def from_config(cls, config: ContrastiveLossConfig, *,
                    local_world_size: int | None = None) -> ContrastiveLoss:
        """Build the strategy for the current job (collective for strategies that create groups)."""
        del config, local_world_size  # the default strategies communicate in the default group
        return cls()

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None, *,
                counter: CommCounter | None = None) -> ContrastiveOutput:
        """This rank's loss term.

        Args:
            image_features, text_features: ``(B, D)``, L2-normalised, row i of each a positive pair;
                the same B on every rank.
            logit_scale: the exponentiated scale (a scalar tensor).
            logit_bias: the additive logit bias; required by ``sigmoid``. The softmax strategies add it
                too (as OpenCLIP does): softmax is shift-invariant, so it changes nothing, but the
                parameter stays in the graph and DDP does not report it unused.
            counter: where to count bytes sent; a fresh one per call when None (pass one to sum
                several calls).

        Raises:
            ValueError: shapes disagree, a needed bias is missing, or the job's world size changed
                since the loss was built.
        """
        if image_features.dim() != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                "image_features and text_features must both be (B, D) with the same shape, got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        if self.uses_logit_bias and logit_bias is None:
            raise ValueError(f"{type(self).__name__} needs logit_bias (set model.init_logit_bias, "
                             "e.g. -10 as in SigLIP)")
        if world_size() != self.built_world_size:
            raise ValueError(
                f"{type(self).__name__} was built for {self.built_world_size} rank(s) but the job has "
                f"{world_size()}: build the loss after init_process_group"
            )
        counter = CommCounter() if counter is None else counter
        terms = ContrastiveTerms(*self.compute(image_features, text_features, logit_scale,
                                               logit_bias, counter))
        return ContrastiveOutput(loss=terms.loss, num_negatives=terms.num_negatives, comm=counter,
                                 hard_negatives=terms.hard_negatives)

    def compute(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None,
                counter: CommCounter) -> ContrastiveTerms | tuple[torch.Tensor, int]:
        """The strategy itself: (this rank's loss term, negatives per sample[, hard negatives])."""
        raise NotImplementedError


def _symmetric_cross_entropy(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor,
                             labels: torch.Tensor) -> torch.Tensor:
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def negnce_loss(logits: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor | float,
                margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DMAE's NegNCE term over the rows of one logit matrix (our reconstruction; see the module doc).

    Args:
        logits: ``(R, C)`` scaled similarities (a constant bias does not change the result).
        labels: ``(R,)`` column of each row's positive.
        logit_scale: the scale in ``logits``, to turn ``margin`` from cosine into logit units.
        margin: a negative is hard when its logit exceeds the positive's minus ``margin * logit_scale``.

    Returns:
        (mean over rows of ``-log(exp(p_i) / (exp(p_i) + sum_{j hard} exp(logit_ij)))``, exactly 0 for
        a row without hard negatives; hard negatives per row, mean over rows, detached). The gradient
        flows through the positive and the selected logits only, never through the selection.
    """
    positive_column = labels[:, None]
    positives = logits.gather(1, positive_column)
    with torch.no_grad():
        hard = logits > positives - margin * logit_scale
        hard.scatter_(1, positive_column, False)
        kept = hard.scatter(1, positive_column, True)
    # logsumexp over the positive and the hard negatives; a row with only its positive gives p_i - p_i.
    per_row = torch.logsumexp(logits.masked_fill(~kept, float("-inf")), dim=1) - positives[:, 0]
    return per_row.mean(), hard.sum(dim=1, dtype=torch.float32).mean()


class SoftmaxContrastiveLoss(ContrastiveLoss):
    """Base of the softmax (InfoNCE) strategies: symmetric cross entropy plus the optional NegNCE term.

    A subclass builds its logits and labels and returns :meth:`softmax_terms` of them, so every softmax
    strategy gets NegNCE on exactly the logits it already computes.

    Attributes:
        negnce_weight: weight of the NegNCE term (0: plain InfoNCE, the term is not computed).
        negnce_margin: hard-negative margin in cosine units.
    """

    def __init__(self, group: ProcessGroup | None = None, *, negnce_weight: float = 0.0,
                 negnce_margin: float = 0.0):
        super().__init__(group)
        self.negnce_weight = negnce_weight
        self.negnce_margin = negnce_margin

    @classmethod
    def from_config(cls, config, *, local_world_size=None):
        del local_world_size  # communicates in the default group
        return cls(negnce_weight=config.negnce_weight, negnce_margin=config.negnce_margin)

    def softmax_terms(self, logits_per_image: torch.Tensor, logits_per_text: torch.Tensor,
                      labels: torch.Tensor, logit_scale: torch.Tensor,
                      num_negatives: int) -> ContrastiveTerms:
        """InfoNCE (+ ``negnce_weight`` x NegNCE) of both directions; rows labelled by ``labels``."""
        loss = _symmetric_cross_entropy(logits_per_image, logits_per_text, labels)
        if self.negnce_weight == 0:
            return ContrastiveTerms(loss, num_negatives)
        image_term, image_hard = negnce_loss(logits_per_image, labels, logit_scale,
                                             self.negnce_margin)
        text_term, text_hard = negnce_loss(logits_per_text, labels, logit_scale, self.negnce_margin)
        loss = loss + self.negnce_weight * (image_term + text_term) / 2
        return ContrastiveTerms(loss, num_negatives, (image_hard + text_hard) / 2)


@register_contrastive_loss("global")
class GlobalClipLoss(SoftmaxContrastiveLoss):
    """CLIP as published: every rank gathers all features and computes the full ``NB x NB`` logits.

    Every rank's term is the whole job's loss; the baseline whose memory and compute grow with N^2.
    """

    def compute(self, image_features, text_features, logit_scale, logit_bias, counter):
        all_images = gather_with_grad(image_features, self.group, counter=counter)
        all_texts = gather_with_grad(text_features, self.group, counter=counter)
        logits = logit_scale * all_images @ all_texts.T
        if logit_bias is not None:
            logits = logits + logit_bias
        labels = torch.arange(logits.shape[0], device=logits.device)
        return self.softmax_terms(logits, logits.T, labels, logit_scale, logits.shape[0] - 1)


@register_contrastive_loss("grouped")
class GroupedContrastiveLoss(SoftmaxContrastiveLoss):
    """M2-Encoder's grouped aggregation: gather only inside a group of k ranks (by default a node).

    Each rank scores its B images against its group's kB texts and its B texts against the group's
    kB images (OpenCLIP's local rows, restricted to the group). Bytes and memory depend on k, not on
    the world size; with k equal to the world size this is exactly ``local``.
    """

    def __init__(self, group: ProcessGroup | None = None, *, negnce_weight: float = 0.0,
                 negnce_margin: float = 0.0):
        super().__init__(group, negnce_weight=negnce_weight, negnce_margin=negnce_margin)
        self.group_size = group_size(group)

    @classmethod
    def from_config(cls, config, *, local_world_size=None):
        k = config.group_size if config.group_size is not None else local_world_size
        if k is None:
            if world_size() > 1:
                raise ValueError("grouped loss: set loss.group_size, or pass local_world_size (the "
                                 "ranks per node) to build_contrastive_loss")
            k = 1
        # Every rank builds every subgroup here (a collective); a bad k raises on all ranks alike.
        return cls(new_rank_group(k), negnce_weight=config.negnce_weight,
                   negnce_margin=config.negnce_margin)

    def compute(self, image_features, text_features, logit_scale, logit_bias, counter):
        batch = image_features.shape[0]
        group_images = gather_with_grad(image_features, self.group, counter=counter)
        group_texts = gather_with_grad(text_features, self.group, counter=counter)
        logits_per_image = logit_scale * image_features @ group_texts.T
        logits_per_text = logit_scale * text_features @ group_images.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        # My samples sit at my group-local rank's offset in the gathered columns.
        offset = group_rank(self.group) * batch
        labels = torch.arange(offset, offset + batch, device=image_features.device)
        return self.softmax_terms(logits_per_image, logits_per_text, labels, logit_scale,
                                  group_images.shape[0] - 1)


@register_contrastive_loss("local")
class LocalClipLoss(GroupedContrastiveLoss):
    """OpenCLIP's ``local_loss=True, gather_with_grad=True``: grouped with one group of all ranks.

    Same value (mean over ranks) and same gradients as ``global``, with ``B x NB`` logits per rank
    instead of ``NB x NB``.
    """

    @classmethod
    def from_config(cls, config, *, local_world_size=None):
        del local_world_size  # one group of all ranks: the default group
        return cls(negnce_weight=config.negnce_weight, negnce_margin=config.negnce_margin)


@register_contrastive_loss("sigmoid")
class SigmoidContrastiveLoss(ContrastiveLoss):
    """SigLIP's pairwise sigmoid loss with a ring exchange of text features.

    Each rank scores its images against its own texts (positives on the diagonal), then passes text
    features N - 1 times around the ring, scoring each received block as all negatives. Sends half the
    bytes of a gather; the received blocks are kept for backward, so memory still grows with N.
    """

    uses_logit_bias = True

    def compute(self, image_features, text_features, logit_scale, logit_bias, counter):
        batch = image_features.shape[0]
        loss = _sigmoid_block_loss(image_features, text_features, logit_scale, logit_bias,
                                   with_positives=True)
        received = text_features
        for _ in range(group_size(self.group) - 1):
            received = ring_exchange(received, self.group, counter=counter)
            loss = loss + _sigmoid_block_loss(image_features, received, logit_scale, logit_bias,
                                              with_positives=False)
        # Divided by the local B (SigLIP's convention): the mean over ranks is the whole batch's loss.
        return loss / batch, group_size(self.group) * batch - 1


def _sigmoid_block_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                        logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                        with_positives: bool) -> torch.Tensor:
    """Sum of ``-log sigmoid(label * logit)`` over one ``B x B`` block of pairs."""
    logits = logit_scale * image_features @ text_features.T + logit_bias
    if not with_positives:
        return -F.logsigmoid(-logits).sum()
    eye = torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype)
    return -F.logsigmoid((2 * eye - 1) * logits).sum()


def build_contrastive_loss(config: ContrastiveLossConfig, *,
                           local_world_size: int | None = None) -> ContrastiveLoss:
    """Build the configured strategy for the current job.

    Call it on every rank, after ``init_process_group`` (``grouped`` creates its subgroups here, a
    collective), or with no process group for a single process.

    Args:
        config: the loss config.
        local_world_size: ranks per node; the ``grouped`` group size when ``config.group_size`` is None.

    Raises:
        ValueError: unknown mode (the message lists the registered ones), or a group size that does not
            divide the world size.
    """
    return CONTRASTIVE_LOSSES.get(config.mode).from_config(config, local_world_size=local_world_size)
