"""Distributed checkpoints (``torch.distributed.checkpoint``) on real Gloo groups, and their loading
in a plain process.

Three phases, each one spawn (tests/dist_workers.py: ``checkpoint_results``), on a dual encoder with
the global contrastive loss over a fixed global batch split evenly over the ranks (so the loss does not
depend on the world size): 2 ranks train step 1, checkpoint (every rank its own folder, merged as Ray
Train merges them; written in the background while steps 2 and 3 run), then steps 2 and 3; 4 ranks
resume that checkpoint and do the same on their own; 2 ranks resume the 4-rank checkpoint.

Promises protected: a resumed run continues with the loss of the uninterrupted run (steps 2 and 3, to
1e-5: the weights and AdamW's moments came back) from 2 to 4 ranks and from 4 to 2, from FSDP into DDP
and from a DDP (``torch``-format) checkpoint into FSDP; the sharded checkpoint holds the weights as
they were when the save began although training went on during the write; each rank wrote only its
shards; the checkpoint loads in this process, with no process group, into the same weights
(``vlp eval``'s, ``vlp export``'s and ``vlp score``'s loaders).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests import dist_workers

TOL = 1e-5


@pytest.fixture(scope="module")
def phases(tmp_path_factory) -> tuple[str, dict[str, list[dict]]]:
    """(the folder holding the checkpoints, {phase: every rank's results})."""
    tokenizer = dist_workers.make_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))
    root = str(tmp_path_factory.mktemp("checkpoints"))
    results = {}
    for phase, world in (("first", 2), ("grow", 4), ("shrink", 2)):
        outdir = str(tmp_path_factory.mktemp(f"ranks-{phase}"))
        results[phase] = dist_workers.spawn_ranks(dist_workers.run_checkpoint_phase, world, outdir,
                                                  tokenizer, root, phase)
    return root, results


def _losses(ranks: list[dict], key: str) -> list[float]:
    values = [r[key]["losses"] if isinstance(r[key], dict) else r[key] for r in ranks]
    assert all(v == values[0] for v in values), f"{key}: the ranks disagree on the loss"
    return values[0]


def test_the_uninterrupted_runs_agree_across_world_sizes(phases):
    """The premise of comparing runs of 2 and 4 ranks: the same steps give the same losses."""
    _, results = phases
    two, four = _losses(results["first"], "fsdp2"), _losses(results["grow"], "fsdp4")
    assert two == pytest.approx(four, abs=TOL)
    # and restoring is what makes a resumed run match: a model from another seed does not
    assert abs(_losses(results["first"], "not_restored")[0] - two[0]) > 1e-3


@pytest.mark.parametrize("resumed,phase,reference,reference_phase", [
    ("fsdp2_into_fsdp", "grow", "fsdp2", "first"),  # 2 -> 4 ranks
    ("fsdp4_into_fsdp", "shrink", "fsdp4", "grow"),  # 4 -> 2 ranks
    ("fsdp2_into_ddp", "grow", "fsdp2", "first"),  # sharded into DDP, 2 -> 4
    ("ddp2_into_fsdp", "first", "ddp2", "first"),  # a torch-format (DDP) checkpoint into FSDP
])
def test_a_resumed_run_continues_with_the_uninterrupted_runs_loss(phases, resumed, phase,
                                                                  reference, reference_phase):
    _, results = phases
    expected = _losses(results[reference_phase], reference)
    got = _losses(results[phase], resumed)
    assert results[phase][0][resumed]["step"] == 1
    # step 2 shows the weights came back, step 3 AdamW's moments and step count
    assert got == pytest.approx(expected, abs=TOL)


def test_each_rank_writes_only_its_shards(phases):
    root, _ = phases
    folder = os.path.join(root, "fsdp2")
    with open(os.path.join(folder, "checkpoint.json")) as f:
        marker = json.load(f)
    assert marker == {"format": "dcp", "strategy": "fsdp", "world_size": 2}
    assert not os.path.exists(os.path.join(folder, "model.pt"))
    assert {"state.json", "config.json", "tokenizer", "sharded"} <= set(os.listdir(folder))
    shards = sorted(f for f in os.listdir(os.path.join(folder, "sharded")) if f.endswith(".distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    # the per-rank folders (as each rank reported them) hold one shard file each
    for rank in (0, 1):
        own = os.listdir(os.path.join(root, f"fsdp2-rank{rank}", "sharded"))
        assert [f for f in own if f.endswith(".distcp")] == [f"__{rank}_0.distcp"]
    # the index says which file holds which piece of which tensor: each rank's file holds about half
    # of the elements (weights and AdamW's moments), and no element twice (file sizes would not show
    # it: at this size DCP's per-tensor framing outweighs the numbers)
    per_file, whole = _elements_per_file(os.path.join(folder, "sharded"))
    assert sum(per_file.values()) == whole
    _, results = phases
    weights = sum(t.numel() for t in results["first"][0]["fsdp2_saved"].values())
    assert whole > 3 * weights  # weights, exp_avg, exp_avg_sq and the step counters
    for name in shards:
        assert 0.45 * whole < per_file[name] < 0.55 * whole, (name, per_file)


def _elements_per_file(folder: str) -> tuple[dict[str, int], int]:
    """({shard file: tensor elements it holds}, elements of the whole state) from a DCP index."""
    import math
    from collections import Counter

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import (
        MetadataIndex,
        TensorStorageMetadata,
    )

    index = FileSystemReader(folder).read_metadata()
    per_file, whole = Counter(), 0
    for fqn, meta in index.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            whole += math.prod(meta.size)
            for chunk in meta.chunks:
                stored = index.storage_data[MetadataIndex(fqn, chunk.offsets)]
                per_file[stored.relative_path] += math.prod(chunk.sizes)
    return dict(per_file), whole


def test_a_sharded_checkpoint_loads_in_a_plain_process(phases):
    """No process group here: the shards of both ranks are read and joined into the weights the run
    had when the save began (training went on during the write)."""
    import torch.distributed as dist

    from vlp.train.checkpoint import load_trained_model, load_trained_pretraining
    from vlp.train.pretrained import load_dual_encoder

    root, results = phases
    folder = os.path.join(root, "fsdp2")
    assert not dist.is_initialized()
    pretraining, tokenizer, config = load_trained_pretraining(folder)
    assert config.scaling.num_workers == 2 and len(tokenizer) > 10
    saved = results["first"][0]["fsdp2_saved"]
    params = dict(pretraining.named_parameters())
    assert set(params) == set(saved)
    for name, value in saved.items():
        assert torch.equal(params[name].detach(), value), name
    model, _, _ = load_trained_model(folder)
    loaded = load_dual_encoder(folder)
    assert loaded.source["kind"] == "checkpoint"
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
