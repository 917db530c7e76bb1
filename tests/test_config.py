"""Typed configs: loading, overrides, and errors that name the offending key."""

import os

import pytest

from vlp.config import ConfigError, config_hash, flatten, load_config, to_dict
from vlp.curation.config import CurationConfig, VideoCurationConfig
from vlp.curation.filters import FILTERS, STAGES, build_filters


def test_defaults_file_and_overrides_compose(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("image:\n  size: 224\nfilters:\n  language: {allowed: [en]}\n")
    cfg = load_config(CurationConfig, str(f), ["image.quality=80", "filters.min_side=null"])
    assert cfg.image.size == 224 and cfg.image.quality == 80
    assert cfg.filters["language"] == {"allowed": ["en"], "min_confidence": 0.3}
    assert cfg.filters["min_side"] is None
    names = {type(x).name for x in build_filters(cfg.filters).image}
    assert "min_side" not in names and "max_aspect_ratio" in names


@pytest.mark.parametrize("override,message", [
    ("image.sise=3", "unknown config key 'image.sise'"),
    ("image.size=big", "image.size: expected an integer"),
    ("image.resize_mode=stretch", "image.resize_mode: must be one of"),
    ("filters.min_sid={}", "unknown filter 'min_sid'"),
    ("filters.min_side.side=3", "unknown config key 'filters.min_side.side'"),
    ("image.quality=0", "quality"),
    ("nonsense", "must look like key.sub=value"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("{", r"\{")):
        load_config(CurationConfig, None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(CurationConfig, str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("image: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(CurationConfig, str(bad))


def test_example_config_file_spells_out_the_defaults():
    from vlp.config import to_dict


    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    example = load_config(CurationConfig, os.path.join(root, "ray_configs", "curate_images.yaml"))
    assert to_dict(example) == to_dict(CurationConfig())
    assert config_hash(example) == config_hash(CurationConfig())


def test_the_video_example_config_is_the_defaults():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    example = load_config(VideoCurationConfig, os.path.join(root, "ray_configs", "curate_videos.yaml"))
    assert to_dict(example) == to_dict(VideoCurationConfig())


def test_hash_and_flatten():
    a, b = load_config(CurationConfig), load_config(CurationConfig, None, ["image.size=128"])
    assert config_hash(a) == config_hash(load_config(CurationConfig)) != config_hash(b)
    flat = flatten(b)
    assert flat["image.size"] == 128 and "dedup.max_distance" in flat


def test_every_registered_filter_builds_from_defaults_and_declares_its_reasons():
    for name, cls in FILTERS.items():
        built = build_filters({name: {}})
        (f,) = built.all()
        assert isinstance(f, cls) and cls.reasons and cls.stage in STAGES
        assert f in getattr(built, cls.stage)
