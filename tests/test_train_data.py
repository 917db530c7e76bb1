"""The plan of a training pass: every training file once per epoch, the mix cut to its share."""

from collections import Counter

import numpy as np

from vlp.train.shard_plan import ShardSplit, plan_shard_reads


def _split(**mix) -> ShardSplit:
    return ShardSplit(train_files=["t0", "t1", "t2"], train_rows=300, eval_files=[], eval_rows=0,
                      manifest={}, manifest_uri="", kind="video-text", **mix)


def test_every_training_file_once_per_epoch_in_a_new_order():
    reads = plan_shard_reads(_split(), 4, np.random.default_rng(0))
    assert len(reads) == 12 and all(r["rows"] == -1 and r["kind"] == "video-text" for r in reads)
    epochs = [[r["path"] for r in reads[i:i + 3]] for i in range(0, 12, 3)]
    assert all(sorted(e) == ["t0", "t1", "t2"] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # shuffled per epoch


def test_the_mix_takes_its_share_of_every_epoch():
    split = _split(mix_files=["m0", "m1"], mix_file_rows=[40, 70], mix_rows=110, mix_kind="image-text",
                   mix_per_epoch=100)
    reads = plan_shard_reads(split, 3, np.random.default_rng(1))
    rows = {"m0": 40, "m1": 70}
    seen = 0
    for r in reads:
        if r["path"].startswith("m"):
            assert r["kind"] == "image-text"
            seen += r["rows"] if r["rows"] >= 0 else rows[r["path"]]
    assert seen == 3 * 100  # exactly the share, over the pass
    counts = Counter(r["path"] for r in reads)
    assert counts["t0"] == counts["t1"] == counts["t2"] == 3
    # the mix's files are read in turn (m0, m1, m0 cut, ...), not always the first one
    assert counts["m0"] >= 2 and counts["m1"] >= 2
