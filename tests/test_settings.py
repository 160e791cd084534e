"""The settings machinery: checks on construction and on reading files, flags derived from the declaration,
config.json round trips, and choice lists read from their registries only when used."""

import argparse
import dataclasses
import json
import sys

import pytest

from em_unet.config import SearchConfig, TrainConfig
from em_unet.errors import ConfigError
from em_unet.settings import RegistryNames, Settings, add_arguments, from_args, selected, setting


def test_study_and_search_toml_values_are_checked_like_flags():
    with pytest.raises(ConfigError, match=r"space.toml \[tuner\]: --max-trials = 0"):
        SearchConfig.from_dict({"max_trials": 0}, "space.toml [tuner]")
    with pytest.raises(ConfigError, match=r"study.toml \[study\]: unknown settings 'width'"):
        TrainConfig.from_dict({"width": 3}, "study.toml [study]", data="d", labels="l")
    with pytest.raises(ConfigError, match=r"x.json: --loss = 'l2'"):
        TrainConfig.from_dict({"loss": "l2"}, "x.json", data="d", labels="l")


def test_flags_come_from_the_configuration():
    """Every TrainConfig field has exactly one flag on train, with the class's default and choices."""
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig)
    flags = {action.dest: action for action in parser._actions if action.dest != "help"}
    assert set(flags) == {f.name for f in selected(TrainConfig)}
    assert flags["optimizer"].choices == ("sgd", "adam", "adamax")
    assert "(default: 3e-4)" not in flags["learning_rate"].help and "(default: 0.0003)" in flags["learning_rate"].help
    args = parser.parse_args(["--data", "d", "--labels", "l", "--val-slices", "15-19", "--no-augment"])
    config = from_args(TrainConfig, args)
    assert config == TrainConfig(data="d", labels="l", val_slices=(15, 19), augment=False)


def test_config_json_round_trips(tmp_path):
    config = TrainConfig(data="d", labels="l", val_slices=(15, 19), lr_schedule="cosine")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text()), "config.json") == config


@pytest.fixture
def registry_module(tmp_path, monkeypatch):
    """A module ``fake_registry`` with a registry ``COLOURS``, importable but not imported yet."""
    (tmp_path / "fake_registry.py").write_text('COLOURS = {"red": 1, "green": 2}\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_registry", raising=False)
    yield "fake_registry"
    sys.modules.pop("fake_registry", None)


def test_registry_names_read_the_registry_only_when_used(registry_module):
    colours = RegistryNames(registry_module, "COLOURS", first=("auto",))
    assert repr(colours) == "RegistryNames('fake_registry', 'COLOURS', first=('auto',))"
    assert registry_module not in sys.modules
    assert "green" in colours and "blue" not in colours
    assert registry_module in sys.modules
    assert colours == ("auto", "red", "green") and list(colours) == ["auto", "red", "green"]
    assert len(colours) == 3 and colours[1] == "red" and colours.index("green") == 2
    assert colours != ("red", "green") and colours != ["auto", "red", "green"]


def test_flags_leave_registry_choices_unread_until_checked_or_listed(registry_module):
    @dataclasses.dataclass
    class Paint(Settings):
        colour: str = setting("red", "the colour", choices=RegistryNames(registry_module, "COLOURS"))

    parser = argparse.ArgumentParser(prog="paint")
    add_arguments(parser, Paint)
    assert registry_module not in sys.modules  # building the parser reads no choices
    assert from_args(Paint, parser.parse_args(["--colour", "green"])) == Paint(colour="green")
    assert "{red,green}" in parser.format_help()
    with pytest.raises(ConfigError, match=r"^--colour = 'blue': must be one of red, green$"):
        Paint(colour="blue")
