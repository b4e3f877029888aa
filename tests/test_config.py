"""Configuration: defaults per dataset, YAML + flag precedence, and errors that name the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agent.configfile import config_from_args, read_yaml
from agent.core.config import ConfigError, build_config
from agent.node.runs import config_differences


def test_dataset_defaults_fill_unset_keys() -> None:
    config = build_config({"dataset": "ring8"})
    assert config.model == "mlp" and config.iterations is not None and config.lr is not None
    digits = build_config({"dataset": "digits", "algorithm": "dpoadam"})
    assert digits.model == "dcgan" and digits.lr == pytest.approx(2e-4)


def test_explicit_values_win_over_defaults() -> None:
    config = build_config({"dataset": "ring8", "lr": 0.5, "iterations": 7})
    assert (config.lr, config.iterations) == (0.5, 7)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rate": 0.1}, "unknown configuration key.*learning_rate"),
        ({"lr": -0.1}, "lr: must be a positive number"),
        ({"lr": "fast"}, "lr: expected a number"),
        ({"rounds": 1.5}, "rounds: expected an integer"),
        ({"rounds": 0}, "rounds: must be a positive number"),
        ({"dataset": "imagenet"}, "dataset: 'imagenet' is not one of"),
        ({"algorithm": "adam"}, "algorithm: 'adam' is not one of"),
        ({"beta1": 1.0}, r"beta1: must be in \[0, 1\)"),
        ({"dataset": "mnist"}, "data_path: dataset 'mnist'"),
        ({"topology": "random_regular"}, "degree: topology random_regular needs a degree"),
        ({"wire_dtype": "int8"}, "wire_dtype: 'int8'"),
        ({"nodes": True}, "nodes: expected an integer"),
    ],
)
def test_bad_values_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(values)


def test_config_hash_ignores_node_local_keys() -> None:
    a = build_config({"dataset": "ring8", "device": "cpu", "eval_every": 10})
    b = build_config({"dataset": "ring8", "device": "auto", "eval_every": 20})
    c = build_config({"dataset": "ring8", "lr": 0.3})
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        read_yaml(path)
    path.write_text("lr: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        read_yaml(tmp_path / "missing.yaml")


def test_per_dataset_step_size_overrides_apply_only_when_lr_is_unset() -> None:
    assert build_config({"dataset": "ring8", "algorithm": "dpoadam"}).lr == pytest.approx(5e-4)
    assert build_config({"dataset": "digits", "algorithm": "dpoadam"}).lr == pytest.approx(2e-4)
    assert build_config({"dataset": "ring8", "algorithm": "dpoadam", "lr": 1e-3}).lr == pytest.approx(1e-3)


def test_a_bad_value_from_a_config_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("dataset: ring8\nwire_dtype: huffman\ncompression: randk\n")
    with pytest.raises(ConfigError, match=rf"config file {path}: wire_dtype: 'huffman' is not one of"):
        config_from_args(argparse.Namespace(config=path))
    # The same key fixed by a flag: the remaining conflict is between the flag and the file's compression.
    flag = argparse.Namespace(config=path, wire_dtype="float32-huffman")
    with pytest.raises(ConfigError, match=r"^wire_dtype: compression 'randk' sends its own codes"):
        config_from_args(flag)
    path.write_text("dataset: ring8\nwire_dtype: float32-huffman\n")
    assert config_from_args(argparse.Namespace(config=path)).wire_dtype == "float32-huffman"
    with pytest.raises(ConfigError, match=r"^topology: 'nope'"):  # from a flag: no file named
        config_from_args(argparse.Namespace(config=path, topology="nope"))
    # The key named is not in the file, but what it complains about is: the file is named.
    path.write_text("dataset: ring8\ntopology: random_regular\n")
    with pytest.raises(ConfigError, match=rf"^config file {path}: degree: topology random_regular needs"):
        config_from_args(argparse.Namespace(config=path))
    # A flag and the file clash: the message says which keys the file set.
    path.write_text("dataset: ring8\ncompression: topk\n")
    with pytest.raises(ConfigError, match=rf"use compression none \(config file {path} sets compression\)$"):
        config_from_args(argparse.Namespace(config=path, algorithm="cposg"))


def test_the_float32_wires_are_one_configuration(tmp_path: Path) -> None:
    """float32, float32-huffman, float32-delta and float32-auto (the default) carry the same bits and every
    receiver of theirs takes every encoding: they hash and compare as float32, so run ids from before
    float32-auto stay, nodes with either setting train together, and a checkpoint resumes under another of
    them."""
    before = build_config({"dataset": "ring8", "wire_dtype": "float32"})
    assert build_config({"dataset": "ring8"}).wire_dtype == "float32-auto"
    for wire in ("float32-huffman", "float32-delta", "float32-auto"):
        config = build_config({"dataset": "ring8", "wire_dtype": wire})
        assert config.config_hash() == before.config_hash()
        assert config.effective_run_id() == before.effective_run_id()
        assert config.cluster_dict()["wire_dtype"] == "float32"
        assert config_differences(before.to_dict(), config) == []
        assert config_differences(config.to_dict(), before) == []
    bf16 = build_config({"dataset": "ring8", "wire_dtype": "bfloat16"})
    assert bf16.config_hash() != before.config_hash()
    assert config_differences(bf16.to_dict(), before) == ["wire_dtype"]
    assert build_config({"dataset": "ring8", "compression": "int8"}).wire_dtype == "float32-auto"
