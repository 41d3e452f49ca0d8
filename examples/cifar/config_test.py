"""Tests for the config: defaults, resolution, flags over a named config, and the presets."""

import argparse

import pytest

from examples.cifar import configs
from examples.cifar.config import Config, add_flags, config_from_flags


def _parse(*argv: str) -> Config:
  parser = argparse.ArgumentParser()
  add_flags(parser)
  return config_from_flags(parser.parse_args(list(argv)))


def test_defaults_are_the_papers_cifar_recipe() -> None:
  config = _parse()
  assert (config.dataset, config.model, config.optimizer, config.gc) == (
      "cifar10", "resnet18", "sgd", "gc")
  assert (config.learning_rate, config.momentum, config.weight_decay, config.batch_size) == (
      0.1, 0.9, 5e-4, 128)
  assert (config.epochs, config.schedule, config.step_boundaries) == (200, "step", (0.3, 0.6, 0.9))


def test_flags_override_the_named_config() -> None:
  config = _parse("--config", "digits", "--optimizer", "adam", "--gc", "gcc", "--seed", "3",
                  "--train-subset", "100", "--data-dir", "/d", "--step-boundaries", "0.3,0.6",
                  "--nesterov", "true", "--distributed", "--gc-axes", "last")
  assert config.dataset == "digits" and config.model == "resnet8"
  assert config.learning_rate == 1e-3  # Adam's default, since neither config nor flag set it.
  assert (config.gc, config.seed, config.train_subset, config.data_dir) == ("gcc", 3, 100, "/d")
  assert config.step_boundaries == (0.3, 0.6) and config.nesterov and config.distributed
  assert config.gc_axes == "last"


def test_a_bare_dataset_picks_its_own_config() -> None:
  digits = _parse("--dataset", "digits")
  assert digits == configs.get_config("digits").resolved()  # ResNet-8, 6 epochs: not ResNet-18.
  assert (digits.model, digits.epochs, digits.batch_size) == ("resnet8", 6, 32)
  assert _parse("--dataset", "cifar100") == configs.get_config("cifar100").resolved()
  assert _parse("--dataset", "cifar10") == _parse()  # The paper's CIFAR recipe.
  # An explicit --config wins; --dataset then only replaces the dataset.
  mixed = _parse("--config", "cifar10_resnet20", "--dataset", "cifar100")
  assert (mixed.model, mixed.dataset) == ("resnet20", "cifar100")
  assert _parse("--dataset", "digits", "--epochs", "2").epochs == 2


def test_launch_flags_imply_distributed_and_are_checked() -> None:
  config = _parse("--coordinator-address", "10.0.0.1:1234", "--num-processes", "4",
                  "--process-id", "3", "--distributed-timeout", "30")
  assert config.distributed and config.coordinator_address == "10.0.0.1:1234"
  assert (config.num_processes, config.process_id, config.distributed_timeout) == (4, 3, 30)
  assert _parse("--process-id", "0").distributed and not _parse("--num-processes", "1").distributed
  assert not _parse().distributed and _parse().distributed_timeout == 120
  for flags, message in [(("--coordinator-address", "10.0.0.1"), "must be HOST:PORT"),
                         (("--num-processes", "0"), "at least 1"),
                         (("--num-processes", "2", "--process-id", "2"), r"\[0, --num-processes\)"),
                         (("--distributed-timeout", "0"), "must be positive")]:
    with pytest.raises(ValueError, match=message):
      _parse(*flags)


def test_bad_values_are_clear_errors() -> None:
  with pytest.raises(ValueError, match="optimizer must be one of"):
    Config(optimizer="lion").resolved()
  with pytest.raises(ValueError, match="Unknown config"):
    configs.get_config("nope")
  with pytest.raises(ValueError, match="--gc-axes must be one of"):
    Config(gc_axes="first").resolved()
  with pytest.raises(ValueError, match="--model must be one of"):
    Config(model="resnet9").resolved()
  with pytest.raises(ValueError, match="no conv-only"):
    _parse("--gc", "gcc", "--gc-axes", "optax")
  with pytest.raises(ValueError, match=r"^--batch-size must be positive, got 0\.$"):
    _parse("--batch-size", "0")
  with pytest.raises(ValueError, match=r"^--train-subset must be positive, got -5\.$"):
    Config(train_subset=-5).resolved()


@pytest.mark.parametrize("flag, field", [
    ("--dataset", "dataset"), ("--model", "model"), ("--optimizer", "optimizer"), ("--gc", "gc"),
    ("--gc-location", "gc_location"), ("--gc-axes", "gc_axes"), ("--schedule", "schedule"),
    ("--augment", "augment")])
def test_argparse_offers_and_checks_every_fixed_choice(flag: str, field: str, capsys) -> None:
  parser = argparse.ArgumentParser()
  add_flags(parser)
  (action,) = [a for a in parser._actions if flag in a.option_strings]
  Config(**{field: action.choices[-1]}).resolved()  # Every choice is a value Config accepts.
  with pytest.raises(ValueError):
    Config(**{field: "nope"}).resolved()
  with pytest.raises(SystemExit):
    parser.parse_args([flag, "nope"])
  assert f"argument {flag}: invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("name", configs.names())
def test_every_preset_resolves_and_says_how_to_run_it(name: str) -> None:
  configs.get_config(name).resolved()
  module = __import__(f"examples.cifar.configs.{name}", fromlist=["_"])
  assert "python -m examples.cifar." in module.__doc__


def test_config_round_trips_through_json_dicts() -> None:
  config = Config(step_boundaries=(0.1,), train_subset=5).resolved()
  assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", ["default", "cifar100"])
def test_paper_presets_use_the_gc_codes_step_lr(name: str) -> None:
  # The GC authors' CIFAR script: StepLR(step_size=60, gamma=0.1) over 200 epochs, stepped once
  # per epoch, so epoch e trains at 0.1 * 0.1 ** (e // 60).
  from examples.cifar import train

  config = configs.get_config(name).resolved()
  steps_per_epoch = 391  # ceil(50,000 / 128)
  lr = train.make_learning_rate(config, steps_per_epoch)
  for epoch in range(config.epochs):
    want = 0.1 * 0.1 ** (epoch // 60)
    first, last = epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch - 1
    assert float(lr(first)) == pytest.approx(want, rel=1e-6), epoch
    assert float(lr(last)) == pytest.approx(want, rel=1e-6), epoch


def test_resnet20_preset_keeps_he_et_als_schedule() -> None:
  from examples.cifar import train

  lr = train.make_learning_rate(configs.get_config("cifar10_resnet20").resolved(), 10)
  assert [float(lr(e * 10)) for e in (0, 99, 100, 149, 150, 199)] == pytest.approx(
      [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rel=1e-6)


def test_allow_unverified_data_is_an_opt_in_switch() -> None:
  assert _parse().allow_unverified_data is False
  assert _parse("--dataset", "cifar100", "--allow-unverified-data").allow_unverified_data is True
  with pytest.raises(ValueError, match="allow_unverified_data must be True or False, got 'yes'"):
    Config(allow_unverified_data="yes").resolved()
