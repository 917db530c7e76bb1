"""``vlp score`` on a small folder with a tiny random model: sidecars row for row with the shards,
scores equal to the plain cosine of the model's embeddings, an undecodable image a null score and a
count, statistics per language, and the refusals (no accidental append, another embedding size, a
view, a name that is a path)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vlp.config import ConfigError, from_dict
from vlp.data.schema import IMAGE_TEXT_SCHEMA, SCHEMA_VERSION
from vlp.data.tokenizer import TokenizerConfig, train_tokenizer

pytestmark = pytest.mark.ray


def _photo_jpeg(i: int) -> bytes:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    im = Image.fromarray(photos[i % len(photos)]).resize((96 + 8 * (i % 5), 80 + 4 * (i % 3)))
    out = io.BytesIO()
    im.save(out, "JPEG", quality=90)
    return out.getvalue()


CAPTIONS = ["a woman in a space suit", "一杯咖啡", "a cat looking at the camera", "一枚火箭"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny dual encoder saved as a vlp train checkpoint (embedding size 16)."""
    from vlp.objectives.pretraining import build_pretraining
    from vlp.train.checkpoint import TrainState, save_checkpoint
    from vlp.train.config import TrainConfig

    root = tmp_path_factory.mktemp("ckpt")
    tok = train_tokenizer(CAPTIONS * 5, TokenizerConfig(vocab_size=200))
    tok.save_pretrained(str(root / "tok"))
    torch.manual_seed(0)

    def save(embed_dim: int) -> str:
        config = from_dict(TrainConfig, {"model": {"embed_dim": embed_dim, "image_size": 32}})
        pretraining = build_pretraining(config, tok)
        folder = str(root / f"d{embed_dim}")
        return save_checkpoint(folder, pretraining, None, TrainState(), config, str(root / "tok"))

    return save(16), save(24)


@pytest.fixture
def folder(tmp_path):
    """Two shards in the curated format; row 2 of the second holds bytes no decoder reads."""
    root = tmp_path / "curated"
    root.mkdir()
    shards, n = [], 0
    for s, count in enumerate((7, 5)):
        rows = []
        for i in range(count):
            image = _photo_jpeg(n) if not (s == 1 and i == 2) else b"\xff\xd8not a jpeg"
            rows.append({"key": f"k{n}", "caption": CAPTIONS[n % 4], "lang": ["en", "zh"][n % 2],
                         "image": image, "image_format": "jpeg", "width": 96, "height": 80,
                         "orig_width": 96, "orig_height": 80, "sha256": "0" * 64, "phash": n,
                         "source": f"s/{n}"})
            n += 1
        name = f"shard-{s:06d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=IMAGE_TEXT_SCHEMA), root / name)
        shards.append({"name": name, "rows": count, "bytes": 0})
    (root / "_manifest.json").write_text(json.dumps(
        {"schema_version": SCHEMA_VERSION, "status": "complete", "kind": "image-text", "num_rows": n,
         "shards": shards}))
    return str(root)


def test_scores_are_the_cosine_of_the_models_embeddings_row_for_row(folder, tiny_checkpoint, tmp_path):
    from pipelines.scoring_job import run_scoring
    from vlp.scoring.config import ScoreConfig
    from vlp.train.pretrained import load_dual_encoder

    small, other = tiny_checkpoint
    config = ScoreConfig(batch_size=4, embeddings=True, encoders=1, cpus_per_encoder=0.5,
                         cpus_per_prepare_task=0.5)
    stream = io.StringIO()
    stats = run_scoring(folder, small, "tiny", config, stream=stream)
    assert stats["rows"] == 12 and stats["failed"] == 1 and stats["scored"] == 11
    assert stats["clip_score"]["en"]["rows"] + stats["clip_score"]["zh"]["rows"] == 11
    assert "11 of 12 pairs scored" in stream.getvalue()

    # the reference: the model's own embeddings, one pair at a time, without Ray
    loaded = load_dual_encoder(small)
    out = os.path.join(folder, "_scores", "tiny")
    for name in ("shard-000000.parquet", "shard-000001.parquet"):
        shard = pq.read_table(os.path.join(folder, name))
        sidecar = pq.read_table(os.path.join(out, name))
        assert sidecar.column("key").to_pylist() == shard.column("key").to_pylist()
        for row, image, caption in zip(range(shard.num_rows), shard.column("image").to_pylist(),
                                       shard.column("caption").to_pylist()):
            score = sidecar.column("clip_score")[row].as_py()
            try:
                pixels = loaded.preprocess([np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))])
            except Exception:
                assert score is None  # the undecodable row: null, still in its place
                continue
            tok = loaded.tokenizer([caption], padding="max_length", truncation=True,
                                   max_length=loaded.max_text_length, return_tensors="pt")
            with torch.no_grad():
                img = loaded.model.encode_image(pixels)
                txt = loaded.model.encode_text(tok["input_ids"], tok["attention_mask"])
            assert score == pytest.approx(float((img * txt).sum()), abs=1e-5)
            emb = np.asarray(sidecar.column("image_embedding")[row].as_py(), dtype=np.float32)
            assert np.abs(emb - img[0].numpy()).max() < 2e-3  # float16
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    assert manifest["status"] == "complete" and manifest["embedding_dim"] == 16
    assert manifest["model"]["kind"] == "checkpoint" and len(manifest["model"]["sha256"]) == 16

    # the other placement of the prepare step (CPU tasks feeding the encoders, as on a GPU cluster),
    # with reads smaller than a shard: the same sidecars
    tasks = ScoreConfig(batch_size=3, embeddings=True, encoders=1, cpus_per_encoder=0.5,
                        cpus_per_prepare_task=0.5, prepare="tasks", rows_per_read=4)
    log = io.StringIO()
    run_scoring(folder, small, "tasks", tasks, stream=log)
    assert "fed by CPU prepare tasks" in log.getvalue() and "4 reads of up to 4 rows" in log.getvalue()
    for name in ("shard-000000.parquet", "shard-000001.parquet"):
        a, b = (pq.read_table(os.path.join(folder, "_scores", n, name)) for n in ("tiny", "tasks"))
        assert a.column("key").equals(b.column("key"))
        np.testing.assert_allclose(a.column("clip_score").to_numpy(zero_copy_only=False),
                                   b.column("clip_score").to_numpy(zero_copy_only=False), atol=1e-6)

    # refusals, before any work
    with pytest.raises(Exception, match="--resume"):
        run_scoring(folder, small, "tiny", config, stream=io.StringIO())
    with pytest.raises(Exception, match="16-d embeddings, this model gives 24-d"):
        run_scoring(folder, other, "tiny", config, resume=True, stream=io.StringIO())
    with pytest.raises(ConfigError, match="plain name"):
        run_scoring(folder, small, "../x", config, stream=io.StringIO())
    # a finished run resumed is a no-op that gives the same sidecars
    before = pq.read_table(os.path.join(out, "shard-000000.parquet"))
    run_scoring(folder, small, "tiny", config, resume=True, stream=io.StringIO())
    assert pq.read_table(os.path.join(out, "shard-000000.parquet")).equals(before)


def test_clips_score_by_their_middle_frame_or_their_frames_mean(tiny_checkpoint, tmp_path):
    """Video-text shards: ``video_frames: middle`` scores the clip's poster (its ``image`` column),
    ``mean`` averages the stored frames' image embeddings (then normalises): checked against the
    model's embeddings of the same frames."""
    from pipelines.scoring_job import run_scoring
    from vlp.data.schema import VIDEO_TEXT_SCHEMA
    from vlp.scoring.config import ScoreConfig
    from vlp.train.pretrained import load_dual_encoder

    small, _ = tiny_checkpoint
    root = tmp_path / "clips"
    root.mkdir()
    rows = []
    for i in range(5):
        frames = [_photo_jpeg(i + k) for k in range(3 + i % 2)]
        rows.append({"key": f"v{i}#0", "caption": CAPTIONS[i % 4], "lang": ["en", "zh"][i % 2],
                     "image": frames[len(frames) // 2], "image_format": "jpeg", "width": 96,
                     "height": 80, "orig_width": 96, "orig_height": 80, "sha256": "0" * 64,
                     "phash": i, "source": f"s/{i}", "frames": frames,
                     "frame_times_s": [0.5 * k for k in range(len(frames))],
                     "num_frames": len(frames), "fps": 2.0, "duration_s": 2.0, "clip_start_s": 0.0,
                     "clip_end_s": 2.0, "clip_index": 0, "video_id": f"v{i}", "motion": 0.1})
    pq.write_table(pa.Table.from_pylist(rows, schema=VIDEO_TEXT_SCHEMA), root / "shard-000000.parquet")
    (root / "_manifest.json").write_text(json.dumps(
        {"schema_version": SCHEMA_VERSION, "status": "complete", "kind": "video-text", "num_rows": 5,
         "shards": [{"name": "shard-000000.parquet", "rows": 5, "bytes": 0}]}))
    loaded = load_dual_encoder(small)

    def embed(images: list[bytes]) -> torch.Tensor:
        pixels = loaded.preprocess([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        with torch.no_grad():
            return loaded.model.encode_image(pixels)

    def text(caption: str) -> torch.Tensor:
        tok = loaded.tokenizer([caption], padding="max_length", truncation=True,
                               max_length=loaded.max_text_length, return_tensors="pt")
        with torch.no_grad():
            return loaded.model.encode_text(tok["input_ids"], tok["attention_mask"])[0]

    for mode in ("middle", "mean"):
        config = ScoreConfig(batch_size=2, video_frames=mode, encoders=1, cpus_per_encoder=0.5,
                             cpus_per_prepare_task=0.5)
        run_scoring(str(root), small, mode, config, stream=io.StringIO())
        sidecar = pq.read_table(root / "_scores" / mode / "shard-000000.parquet")
        for row, got in zip(rows, sidecar.column("clip_score").to_pylist()):
            if mode == "middle":
                image = embed([row["image"]])[0]
            else:
                image = torch.nn.functional.normalize(embed(row["frames"]).mean(0), dim=-1)
            assert got == pytest.approx(float(image @ text(row["caption"])), abs=1e-5), (mode, row["key"])
    middle = pq.read_table(root / "_scores" / "middle" / "shard-000000.parquet").column("clip_score")
    mean = pq.read_table(root / "_scores" / "mean" / "shard-000000.parquet").column("clip_score")
    assert middle.to_pylist() != mean.to_pylist()  # the two modes really differ on these clips


def test_scoring_reads_and_writes_s3(folder, tiny_checkpoint, s3_server, monkeypatch):
    from pipelines.scoring_job import run_scoring
    from vlp.data.storage import StorageConfig
    from vlp.scoring.config import ScoreConfig

    small, _ = tiny_checkpoint
    storage = s3_server.storage()
    bucket = "s3://vlp-test/score-shards"
    for name in os.listdir(folder):
        storage.write_bytes_atomic(f"{bucket}/{name}", open(os.path.join(folder, name), "rb").read())
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    config = ScoreConfig(batch_size=4, encoders=1, cpus_per_encoder=0.5, cpus_per_prepare_task=0.5,
                         storage=StorageConfig(s3_endpoint_url=s3_server.endpoint))
    stats = run_scoring(bucket, small, "tiny", config, stream=io.StringIO())
    assert stats["scored"] == 11 and stats["failed"] == 1
    local = run_scoring(folder, small, "tiny", ScoreConfig(batch_size=4, encoders=1, cpus_per_encoder=0.5,
                                                           cpus_per_prepare_task=0.5),
                        stream=io.StringIO())
    assert local["clip_score"] == stats["clip_score"]
    for name in ("shard-000000.parquet", "shard-000001.parquet"):
        remote = pq.read_table(pa.BufferReader(storage.read_bytes(f"{bucket}/_scores/tiny/{name}")))
        assert remote.equals(pq.read_table(os.path.join(folder, "_scores", "tiny", name)))
    assert not [f for f in storage.list_files(f"{bucket}/_scores/tiny") if "/_parts/" in f]


def test_reads_cover_the_rows_left_to_score_once_and_in_order(tiny_checkpoint, tmp_path):
    """``plan_reads`` splits shards into ranges and leaves out committed rows; ``read_and_prepare``
    reads exactly a range, across row groups, with the shard's row numbers."""
    from types import SimpleNamespace

    from pipelines.scoring_job import plan_reads, read_and_prepare
    from vlp.data.storage import Storage
    from vlp.train.pretrained import load_dual_encoder

    shards = [SimpleNamespace(path=str(tmp_path / "a.parquet"), rows=11),
              SimpleNamespace(path=str(tmp_path / "b.parquet"), rows=5)]
    reads = plan_reads(shards, 4, {"a.parquet": np.array([1, 2, 8])})
    assert [(r["shard"], r["start"], r["rows"]) for r in reads] == [
        ("a.parquet", 0, 1), ("a.parquet", 3, 4), ("a.parquet", 7, 1), ("a.parquet", 9, 2),
        ("b.parquet", 0, 4), ("b.parquet", 4, 1)]
    covered = sorted(r["start"] + i for r in reads if r["shard"] == "a.parquet" for i in range(r["rows"]))
    assert covered == [0, 3, 4, 5, 6, 7, 9, 10]

    rows = [{"key": f"k{i}", "caption": CAPTIONS[i % 4], "lang": "en", "image": _photo_jpeg(i)}
            for i in range(11)]
    pq.write_table(pa.Table.from_pylist(rows), shards[0].path, row_group_size=3)  # groups 3,3,3,2
    loaded = load_dual_encoder(tiny_checkpoint[0])
    prepare = dict(preprocess=loaded.preprocess, tokenizer=loaded.tokenizer,
                   max_text_length=loaded.max_text_length)
    a_reads = [r for r in reads if r["shard"] == "a.parquet"]
    batches = list(read_and_prepare(pa.Table.from_pylist(a_reads), storage=Storage(), media_column="image",
                                    batch_size=2, prepare=prepare))
    got_rows = np.concatenate([b["row"] for b in batches]).tolist()
    got_keys = np.concatenate([b["key"] for b in batches]).tolist()
    assert got_rows == covered and got_keys == [f"k{i}" for i in covered]
    assert all(len(b["row"]) <= 2 for b in batches)
    one = batches[0]["pixels"]
    assert one.dtype == np.uint8 and one.shape[-1] == 3  # normalised on the encoder, not here
