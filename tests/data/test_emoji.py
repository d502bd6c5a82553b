"""The colour emoji data set (collafuse.data.emoji), read from the Debian packages that ./run installs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from collafuse.config import load_config
from collafuse.data.common import DataError
from collafuse.data.emoji import EMOJI_GROUPS, emoji_images, parse_emoji_test
from collafuse.data.partition import load_client_datasets

ROOT = Path(__file__).resolve().parents[2]
# The counts issue 31 gives for Unicode 15.0's fully-qualified emoji, per group.
ISSUE_COUNTS = {"People & Body": 2148, "Flags": 269, "Objects": 261, "Symbols": 223, "Travel & Places": 218,
                "Smileys & Emotion": 166, "Animals & Nature": 152, "Food & Drink": 133, "Activities": 85}


def test_only_fully_qualified_emoji_are_read_with_their_group():
    text = """# group: Smileys & Emotion
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
263A                                                   ; unqualified         # ☺ E0.6 smiling face
# group: Component
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone
# group: Flags
1F1EB 1F1F7                                            ; fully-qualified     # 🇫🇷 E0.6 flag: France
"""
    assert parse_emoji_test(text) == [("\U0001F600", 0), ("\U0001F1EB\U0001F1F7", 8)]


@pytest.fixture(scope="module")
def emoji_cache(tmp_path_factory):
    """The set rendered once into a fresh XDG cache (``$XDG_CACHE_HOME/collafuse``), shared by this module."""
    cache = tmp_path_factory.mktemp("xdg") / "collafuse"
    return cache, emoji_images(cache_dir=cache)


def test_the_installed_set_has_the_issues_counts_rendered_in_colour_on_white(emoji_cache):
    cache, full = emoji_cache
    assert full.class_names == list(EMOJI_GROUPS)
    counts = np.bincount(full.labels, minlength=9)
    assert dict(zip(EMOJI_GROUPS, counts.tolist())) == ISSUE_COUNTS
    assert full.images.shape == (3655, 32, 32, 3) and full.images.dtype == np.uint8
    assert (full.images[:, 0, 0] == 255).all()  # white corners
    spread = full.images.astype(int).max(axis=3) - full.images.astype(int).min(axis=3)
    assert (spread.max(axis=(1, 2)) > 60).mean() > 0.9  # colour: channels differ in 94.9% (some are black or gray)
    # rendered once: the cache is written whole, and read back the same
    (npz,) = cache.glob("emoji-32-*.npz")
    assert not list(cache.glob("*.tmp*"))
    assert np.array_equal(emoji_images(cache_dir=cache).images, full.images)


def test_the_emoji_config_gives_three_clients_by_group_with_a_fifth_held_out(emoji_cache, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(emoji_cache[0].parent))  # the default cache, already rendered
    cfg = load_config(ROOT / "configs/emoji.toml", [])
    assert cfg.image_shape == (3, 32, 32) and cfg.num_classes == 9
    clients = load_client_datasets(cfg.data, cfg.num_classes, cfg.seeds.data)
    groups = [[1], [0, 2, 3, 4], [5, 6, 7, 8]]
    for c, classes in zip(clients, groups):
        assert sorted(set(c.train_y.tolist())) == classes == sorted(set(c.test_y.tolist()))
        assert c.train_images.shape[1:] == (3, 32, 32)
    # People & Body: round(0.2 * 2148) = 430 held out, 1718 to train
    assert (len(clients[0].train_y), len(clients[0].test_y)) == (1718, 430)
    # 0.2 of each group, rounded per group: 33+30+27+44 = 134 and 17+52+45+54 = 168 held out
    assert [len(c.test_y) for c in clients[1:]] == [134, 168]


def test_a_missing_package_is_named(tmp_path):
    with pytest.raises(DataError, match="fonts-noto-color-emoji"):
        emoji_images(font_path=tmp_path / "none.ttf", cache_dir=tmp_path)


def test_a_tiny_rgb_run_goes_end_to_end(emoji_cache, tmp_path):
    """configs/emoji.toml at toy size through the CLI: RGB samples for every client and a report."""
    tiny = ["data.max_train_per_client=48", "data.max_test_per_client=16", "diffusion.timesteps=20", "split.cut=6",
            *[f"{m}.{k}" for m in ("server_model", "client_model")
              for k in ("block_out_channels=[8,16]", "norm_num_groups=4", "mid_attention=false")],
            "train.rounds=2", "train.client_steps=2", "train.server_steps=2", "train.batch_size=8",
            "sample.ddim_steps=5", "sample.n_per_client=4", "sample.batch_size=4"]
    cmd = [sys.executable, "-m", "collafuse", "run", str(ROOT / "configs/emoji.toml"), "--out", str(tmp_path / "r"),
           *[a for kv in tiny for a in ("--set", kv)]]
    env = {**os.environ, "XDG_CACHE_HOME": str(emoji_cache[0].parent)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    for i in range(3):
        x0 = load_file(tmp_path / "r" / f"samples_client{i}.safetensors")["x0"]
        assert x0.shape == (4, 3, 32, 32)
    assert (tmp_path / "r" / "report.md").is_file()
