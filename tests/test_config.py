"""Configuration: shipped configs load, overrides apply, and every bad value gets a one-line error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from collafuse.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert 0 <= cfg.cut <= cfg.diffusion.timesteps


def test_overrides_and_cut_forms():
    overrides = ["train.rounds=5", "split.cut_ratio=0.3", "run.name=abc", "data.class_groups=[[0,1],[2],[3,4]]"]
    cfg = load_config(None, overrides)
    assert cfg.train.rounds == 5 and cfg.run.name == "abc" and cfg.data.class_groups == [[0, 1], [2], [3, 4]]
    assert cfg.cut == 300
    assert load_config(None, ["split.cut=0"]).cut == 0
    assert load_config(None, ["split.cut=1000"]).cut == 1000
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0  # TOML integer accepted for a float
    assert Config().cut == 200  # default: 20% of the chain on the client


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["split.cut_ratio=0.25", "sample.sampler=ddpm"])
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict() and again.identity_hash() == cfg.identity_hash()


@pytest.mark.parametrize("override,needle", [
    ("split.cut=1001", "split.cut = 1001 is invalid (allowed: an integer step in [0, 1000]"),
    ("split.cut=-1", "split.cut = -1"),
    ("split.cut_ratio=1.5", "split.cut_ratio = 1.5"),
    ("sample.sampler=euler", "sample.sampler = 'euler' is invalid (expected one of 'ddpm', 'ddim', 'dpmsolver')"),
    ("diffusion.schedule=quadratic", "diffusion.schedule = 'quadratic'"),
    ("data.num_clients=11", "data.num_clients = 11 is invalid (allowed: at most 10 clients"),
    ("train.roundz=3", "unknown key 'train.roundz'"),
    ("trian.rounds=3", "unknown section [trian]"),
    ("train.rounds=abc", "train.rounds = 'abc' is invalid (expected an integer)"),
    ("train.rounds=0", "train.rounds = 0"),
    ("train.lr=-1", "train.lr = -1"),
    ("server_model.norm_num_groups=5", "server_model.norm_num_groups = 5"),
    ("client_model.block_out_channels=[8,16,16,16]", "at most 3 levels"),
    ("client_model.condition_on_client=true", "client_model.condition_on_client"),
    ("data.class_groups=[[0,1],[1,2],[3]]", "do not share a class"),
    ("run.device=gpu", "run.device = 'gpu'"),
    ("sample.ddim_steps=0", "sample.ddim_steps = 0"),
    ("rounds=3", "expected section.key"),
])
def test_bad_values_give_one_line_errors(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_both_cut_forms_in_a_file_are_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[split]\ncut = 100\ncut_ratio = 0.1\n")
    with pytest.raises(ConfigError, match="both set"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[split\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
