"""Tests for jaxrlhf.config: tyro command lines, --config files under flags, help text, strict errors."""

import dataclasses
import importlib.util
import json
import os
import re
import sys
from typing import Literal

import pytest

from jaxrlhf.config import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_config,
    save_config,
)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings."""

    lr: float = 1e-3
    """Adam learning rate."""
    clip_norm: float | None = None
    """Global gradient-norm clip; none turns clipping off."""


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """A toy experiment used by the tests."""

    seed: int = 0
    """Seed of every random key in the run."""
    name: str = "toy"
    """Run name, used in the output path."""
    use_kl: bool = True
    """Add the per-token KL penalty to the rewards."""
    hidden_sizes: tuple[int, ...] = (32, 32)
    """Widths of the hidden layers."""
    gammas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 1.0])
    """Discount factors to compare."""
    max_steps: int | None = None
    """Stop after this many steps; none runs to the end."""
    estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator.

    Second line of the docstring."""
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=3e-4))
    """Optimizer settings (nested)."""


@dataclasses.dataclass(frozen=True)
class TrunkConfig:
    shared_trunk: bool = True
    """Policy and critic share one transformer."""


@dataclasses.dataclass(frozen=True)
class NestedBoolConfig:
    run_sft: bool = True
    """Run the SFT script first when its model is missing."""
    ppo: TrunkConfig = TrunkConfig()


def _cli_error(capsys, config_cls, argv) -> str:
    """Parse argv, expect tyro's exit with status 2, return its message (stderr, box drawing removed)."""
    with pytest.raises(SystemExit) as exit_info:
        parse_config(config_cls, argv, prog="toy.py")
    assert exit_info.value.code == 2
    return " ".join(capsys.readouterr().err.replace("│", " ").split())


def test_defaults_without_flags():
    config = parse_config(ToyConfig, [])
    assert config == ToyConfig()
    assert config.optim.lr == 3e-4  # the parent's default_factory wins over the nested class default


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--seed", "3"], {"seed": 3}),
        (["--seed=3"], {"seed": 3}),
        (["--name", "run a"], {"name": "run a"}),
        (["--seed", "-2", "--name=x"], {"seed": -2, "name": "x"}),
    ],
)
def test_scalar_overrides(argv, expected):
    config = parse_config(ToyConfig, argv)
    for key, value in expected.items():
        assert getattr(config, key) == value


def test_bool_flags():
    assert parse_config(ToyConfig, ["--no-use_kl"]).use_kl is False
    assert parse_config(ToyConfig, ["--no_use_kl"]).use_kl is False  # the spelling --help shows
    assert parse_config(ToyConfig, ["--use_kl"]).use_kl is True
    assert parse_config(ToyConfig, ["--no-use_kl", "--use_kl"]).use_kl is True  # the last one wins
    assert parse_config(ToyConfig, ["--use_kl", "--seed", "1"]).use_kl is True
    assert parse_config(ToyConfig, ["--no-use-kl"]).use_kl is False  # dashes for underscores
    assert parse_config(ToyConfig, ["--max-steps", "4"]).max_steps == 4
    nested_off = parse_config(NestedBoolConfig, ["--ppo.no_shared_trunk"])
    assert nested_off.ppo.shared_trunk is False and nested_off.run_sft is True
    assert parse_config(NestedBoolConfig, ["--no-run_sft"]).run_sft is False


def test_sequences_optional_literal_and_nested():
    assert parse_config(ToyConfig, ["--hidden_sizes", "64", "16"]).hidden_sizes == (64, 16)
    assert parse_config(ToyConfig, ["--hidden_sizes=64"]).hidden_sizes == (64,)
    assert parse_config(ToyConfig, ["--gammas", "0.5"]).gammas == [0.5]
    assert parse_config(ToyConfig, ["--hidden_sizes", "--seed", "1"]).hidden_sizes == ()
    assert parse_config(ToyConfig, ["--max_steps", "10"]).max_steps == 10
    assert parse_config(ToyConfig, ["--max_steps", "None"]).max_steps is None
    assert parse_config(ToyConfig, ["--estimator", "k1"]).estimator == "k1"
    config = parse_config(ToyConfig, ["--optim.lr", "1e-4", "--optim.clip_norm", "1"])
    assert config.optim == OptimConfig(lr=1e-4, clip_norm=1.0)
    assert parse_config(ToyConfig, ["--optim.clip_norm", "1", "--optim.clip_norm", "None"]).optim.clip_norm is None
    assert isinstance(config.hidden_sizes, tuple) and isinstance(config.gammas, list)


def test_help_lists_every_field_with_type_default_and_doc(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(ToyConfig, ["--help"], prog="toy.py")
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())  # tyro wraps lines in a box
    assert text.startswith("usage: toy.py")
    for flag in (
        "--seed",
        "--name",
        "--use_kl",
        "--no_use_kl",
        "--hidden_sizes",
        "--gammas",
        "--max_steps",
        "--estimator",
        "--optim.lr",
        "--optim.clip_norm",
        "--config PATH.json",
    ):
        assert flag in text
    assert "Seed of every random key in the run." in text
    assert "Second line of the docstring." in text
    assert "Global gradient-norm clip" in text
    assert "--hidden_sizes [INT [INT ...]]" in text and "--max_steps {None}|INT" in text
    assert "{k1,k2,k3}" in text
    assert "(default: 0.0003)" in text  # nested default from the parent's factory
    assert "A toy experiment used by the tests." in text


def test_help_shows_the_config_file_values_as_defaults(tmp_path, capsys):
    path = tmp_path / "config.json"
    save_config(ToyConfig(seed=41, optim=OptimConfig(lr=0.25)), path)
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--config", str(path), "--help"], prog="toy.py")
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "(default: 41)" in text and "(default: 0.25)" in text


def test_file_round_trip_and_cli_over_file(tmp_path):
    config = ToyConfig(seed=7, hidden_sizes=(8,), max_steps=5, optim=OptimConfig(lr=0.1, clip_norm=2.0))
    path = tmp_path / "sub" / "config.json"
    save_config(config, path)
    assert json.loads(path.read_text())["hidden_sizes"] == [8]
    assert load_config(ToyConfig, path) == config
    assert config_to_dict(load_config(ToyConfig, path)) == config_to_dict(config)
    assert parse_config(ToyConfig, ["--config", str(path)]) == config
    overridden = parse_config(ToyConfig, ["--config", str(path), "--seed", "9", "--optim.lr", "0.5"])
    assert overridden == dataclasses.replace(config, seed=9, optim=OptimConfig(lr=0.5, clip_norm=2.0))
    # --config may come after the flags (and take =); the flags still win over the file.
    assert parse_config(ToyConfig, ["--seed", "9", f"--config={path}", "--max_steps", "None"]) == (
        dataclasses.replace(config, seed=9, max_steps=None)
    )


def test_partial_file_keeps_defaults(tmp_path):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"seed": 4, "optim": {"clip_norm": 1.5}}))
    config = load_config(ToyConfig, path)
    assert config.seed == 4 and config.optim == OptimConfig(lr=3e-4, clip_norm=1.5)
    assert parse_config(ToyConfig, ["--config", str(path)]) == config


@pytest.mark.parametrize(
    "argv, must_mention",
    [
        (["--sed", "1"], ["--sed", "--seed"]),  # unknown flag, with a suggestion
        (["--seed", "1.5"], ["--seed", "INT", "1.5"]),
        (["--seed"], ["--seed"]),
        (["--use_kl", "maybe"], ["maybe"]),  # a bool flag takes no value
        (["--use_kl", "false"], ["false"]),
        (["--hidden_sizes", "a", "b"], ["--hidden_sizes", "INT"]),
        (["--estimator", "k4"], ["--estimator", "k4", "k3"]),
        (["--optim.lrr", "1"], ["--optim.lrr", "--optim.lr"]),
        (["--no-seed"], ["--no-seed", "--seed"]),
        (["--max_steps", "many"], ["--max_steps", "many"]),
        (["positional"], ["positional"]),
    ],
)
def test_cli_errors_name_the_flag(capsys, argv, must_mention):
    message = _cli_error(capsys, ToyConfig, argv)
    for word in must_mention:
        assert word in message


@pytest.mark.parametrize(
    "content, must_mention",
    [
        ({"seeed": 1}, ["seeed", "seed"]),
        ({"seed": "1"}, ["seed", "int"]),
        ({"seed": True}, ["seed", "int"]),
        ({"use_kl": 1}, ["use_kl", "bool"]),
        ({"hidden_sizes": [1, "x"]}, ["hidden_sizes[1]", "int"]),
        ({"optim": {"lr": "fast"}}, ["optim.lr", "float"]),
        ({"optim": {"beta": 1}}, ["optim.beta"]),
    ],
)
def test_file_errors_name_the_key_and_type(tmp_path, content, must_mention):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    for load in (lambda: load_config(ToyConfig, path), lambda: parse_config(ToyConfig, ["--config", str(path)])):
        with pytest.raises(ConfigError) as err:
            load()
        for word in must_mention:
            assert word in str(err.value)


@pytest.mark.parametrize(
    "argv, must_mention",
    [
        (["--config"], ["--config"]),
        (["--config", "--seed", "1"], ["--config"]),
        (["--config", "{missing}"], ["not found", "nothere.json"]),
        (["--config", "{not_json}"], ["not valid JSON"]),
        (["--config", "{a_list}"], ["JSON object"]),
    ],
)
def test_bad_config_flag_or_file(tmp_path, argv, must_mention):
    (tmp_path / "not_json.json").write_text("{seed: 1")
    (tmp_path / "a_list.json").write_text("[1, 2]")
    names = {
        "missing": tmp_path / "nothere.json",
        "not_json": tmp_path / "not_json.json",
        "a_list": tmp_path / "a_list.json",
    }
    with pytest.raises(ConfigError) as err:
        parse_config(ToyConfig, [word.format(**names) for word in argv])
    for word in must_mention:
        assert word in str(err.value)


def test_real_command_line_errors_exit_with_status_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("sys.argv", ["toy.py", "--seed", "x"])
    with pytest.raises(SystemExit) as exit_info:
        parse_config(ToyConfig)
    assert exit_info.value.code == 2
    assert "seed" in capsys.readouterr().err
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"seeed": 1}))
    monkeypatch.setattr("sys.argv", ["toy.py", "--config", str(path)])
    with pytest.raises(SystemExit) as exit_info:
        parse_config(ToyConfig)
    assert exit_info.value.code == 2
    assert "toy.py: error: unknown config key 'seeed'" in capsys.readouterr().err


def test_required_field_must_be_given(capsys, tmp_path):
    @dataclasses.dataclass(frozen=True)
    class NeedsPath:
        data_path: str
        """Where the data lies."""

    assert "--data_path" in _cli_error(capsys, NeedsPath, [])
    assert parse_config(NeedsPath, ["--data_path", "/x"]).data_path == "/x"
    path = tmp_path / "empty.json"
    path.write_text("{}")
    with pytest.raises(ConfigError, match="data_path"):
        load_config(NeedsPath, path)


def test_a_field_named_config_is_an_ordinary_flag():
    @dataclasses.dataclass(frozen=True)
    class HasConfigField:
        config: str = "default"
        """A field that happens to be called config."""

    assert parse_config(HasConfigField, ["--config", "mine"]).config == "mine"


def test_a_config_saved_under_old_field_names_is_refused_with_the_new_name(tmp_path):
    from jaxrlhf.training import PPOConfig

    @dataclasses.dataclass(frozen=True)
    class Experiment:
        ppo: PPOConfig = PPOConfig()

    for old, new in (
        ("cliprange", "clip_eps"),
        ("cliprange_value", "value_clip_eps"),
        ("lam", "gae_lambda"),
        ("init_kl_coef", "kl_coef"),
    ):
        path = tmp_path / f"{old}.json"
        path.write_text(json.dumps({"ppo": {old: 0.1}}))
        with pytest.raises(ConfigError, match=f"config key 'ppo.{old}' was renamed to 'ppo.{new}'"):
            load_config(Experiment, path)
    # An old name that no field of this class took is an ordinary unknown key.
    path = tmp_path / "eps.json"
    path.write_text(json.dumps({"eps": 0.1}))
    with pytest.raises(ConfigError, match="unknown config key 'eps'"):
        load_config(ToyConfig, path)


# ----------------------------------------------------------------------------------------------
# The experiments' command lines: the ones the docs show parse into the intended configs.
# ----------------------------------------------------------------------------------------------

EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments")


def _experiment(name):
    """An experiment script as a module, under its own name (so other tests' imports are untouched)."""
    spec = importlib.util.spec_from_file_location(f"{name}_cli_check", os.path.join(EXPERIMENTS_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and tyro look the class's module up
    spec.loader.exec_module(module)
    return module


def _dotted(config, name):
    for part in name.split("."):
        config = getattr(config, part)
    return config


DOCUMENTED_COMMAND_LINES = [
    (
        "gridworld",
        "--gamma_study 0.5 0.9 0.99 1.0 --out_dir runs/gridworld_gammas",
        {"gamma_study": (0.5, 0.9, 0.99, 1.0), "out_dir": "runs/gridworld_gammas"},
    ),
    ("gridworld", "--slip_prob 0.1 --out_dir runs/gridworld_slippery", {"slip_prob": 0.1}),
    (
        "gridworld",
        "--grid ...FD .#... .F... ...F. S.... --gamma_study 0.9 --step_cost 0",
        {"grid": ("...FD", ".#...", ".F...", "...F.", "S...."), "gamma_study": (0.9,), "step_cost": 0.0},
    ),
    ("randomwalks_sft", "--num_steps 2000 --out_dir runs/rw_sft_long", {"num_steps": 2000}),
    ("randomwalks_ppo", "--seeds 0 1 2", {"seeds": (0, 1, 2)}),
    (
        "randomwalks_ppo",
        "--sft_num_steps 20 --ppo.total_steps 2 --out_dir /tmp/rw_ppo --sft_dir /tmp/rw_sft",
        {"sft_num_steps": 20, "ppo.total_steps": 2, "out_dir": "/tmp/rw_ppo", "sft_dir": "/tmp/rw_sft"},
    ),
    (
        "randomwalks_ppo",
        "--no-run_sft_if_missing --ppo.no_shared_trunk --ppo.lr_schedule cosine",
        {"run_sft_if_missing": False, "ppo.shared_trunk": False, "ppo.lr_schedule": "cosine"},
    ),
    (
        "compare_algorithms",
        "--presets ppo grpo --seeds 0 --steps 20",
        {"presets": ("ppo", "grpo"), "seeds": (0,), "steps": 20},
    ),
    ("countdown_sft", "--correct_fraction 0.2 --num_steps 3000", {"correct_fraction": 0.2, "num_steps": 3000}),
    (
        "dpo_vs_ppo",
        "--seeds 0 --pref_steps 50 --ppo_steps 30 --out_dir runs/dvp_small",
        {"seeds": (0,), "pref_steps": 50, "ppo_steps": 30, "out_dir": "runs/dvp_small"},
    ),
    (
        "reward_hacking",
        "--kl_coefs 0 0.005 0.02 --ppo_steps 200 --out_dir runs/rh_more",
        {"kl_coefs": (0.0, 0.005, 0.02), "ppo_steps": 200},
    ),
    ("steer_smollm", "--full --out_dir runs/steer_smollm", {"full": True, "out_dir": "runs/steer_smollm"}),
]


@pytest.mark.parametrize("name, flags, expected", DOCUMENTED_COMMAND_LINES)
def test_documented_experiment_command_lines(name, flags, expected):
    config_cls = _experiment(name).Config
    config = parse_config(config_cls, flags.split())
    for field, value in expected.items():
        assert _dotted(config, field) == value, field
    default = config_cls()
    for f in dataclasses.fields(config_cls):
        if f.name not in flags:  # every field the line does not name keeps its default
            assert getattr(config, f.name) == getattr(default, f.name), f.name


@pytest.mark.parametrize("name", sorted({name for name, _, _ in DOCUMENTED_COMMAND_LINES}))
def test_experiment_help_shows_every_field_with_its_doc(name, capsys):
    config_cls = _experiment(name).Config
    with pytest.raises(SystemExit) as exit_info:
        parse_config(config_cls, ["--help"], prog=f"{name}.py")
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "--config PATH.json" in text
    default = config_cls()
    for f in dataclasses.fields(config_cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):  # a nested config: its fields are listed under its prefix
            assert f"--{f.name}." in text, f.name
        else:
            assert f"--{f.name} " in text or f"--{f.name}," in text, f.name
    assert text.count("(default:") >= len(dataclasses.fields(config_cls))


# ----------------------------------------------------------------------------------------------
# Config constructors refuse unknown fields with load_config's message.
# ----------------------------------------------------------------------------------------------

EXPERIMENTS = sorted(
    name[: -len(".py")] for name in os.listdir(EXPERIMENTS_DIR) if name.endswith(".py") and name != "sft_policy.py"
)


def _library_configs():
    from jaxrlhf.models import LoraConfig, ModelConfig
    from jaxrlhf.training import PPOConfig
    from jaxrlhf.training.preference import PreferenceConfig
    from jaxrlhf.training.sft import SFTConfig

    return [PPOConfig, PreferenceConfig, SFTConfig, LoraConfig, ModelConfig]


def test_config_constructors_give_the_rename_hint_or_the_closest_field():
    """`PPOConfig(cliprange=0.2)` (TRL's name) and `PPOConfig(learning_rat=1e-4)` used to be
    Python's bare "unexpected keyword argument"; now the message of `load_config`."""
    from jaxrlhf.config import UnknownFieldError
    from jaxrlhf.training import PPOConfig
    from jaxrlhf.training.preference import PreferenceConfig

    cases = [
        (PPOConfig, {"cliprange": 0.2}, "PPOConfig: config key 'cliprange' was renamed to 'clip_eps'"),
        (PPOConfig, {"eps_clip": 0.2}, "'eps_clip' was renamed to 'clip_eps'"),  # OpenRLHF
        (PPOConfig, {"num_ppo_epochs": 2}, "'num_ppo_epochs' was renamed to 'ppo_epochs'"),  # TRL
        (PPOConfig, {"beta": 0.1}, "'beta' was renamed to 'kl_coef'"),  # TRL's GRPO
        (PPOConfig, {"learning_rat": 1e-4}, "PPOConfig: unknown config key 'learning_rat'; did you mean learning_rate"),
        (PreferenceConfig, {"max_completion_length": 9}, "'max_completion_length' was renamed to 'max_response_len'"),
        (PreferenceConfig, {"loss_type": "ipo"}, "'loss_type' was renamed to 'loss'"),
    ]
    for config_cls, kwargs, message in cases:
        with pytest.raises(UnknownFieldError, match=re.escape(message)) as info:
            config_cls(**kwargs)
        assert isinstance(info.value, TypeError) and isinstance(info.value, ConfigError)
        # One message: a config file with the same key says the same after the class name.
        path_message = str(info.value).split(": ", 1)[1]
        with pytest.raises(ConfigError) as from_file:
            config_from_dict(config_cls, kwargs)
        assert str(from_file.value) == path_message
    assert PreferenceConfig(beta=0.3).beta == 0.3  # a field of this config is never "renamed"
    assert PPOConfig().replace(clip_eps=0.1).clip_eps == 0.1  # replace() goes through the check
    with pytest.raises(UnknownFieldError, match="'lam' was renamed to 'gae_lambda'"):
        PPOConfig().replace(lam=0.9)


@pytest.mark.parametrize("config_cls", _library_configs(), ids=lambda c: c.__name__)
def test_every_library_config_refuses_unknown_fields(config_cls):
    with pytest.raises(ConfigError, match=f"{config_cls.__name__}: unknown config key 'no_such_field'"):
        config_cls(no_such_field=1)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_config_refuses_unknown_fields(name):
    config_cls = _experiment(name).Config
    field = dataclasses.fields(config_cls)[0].name
    with pytest.raises(ConfigError, match=f"Config: unknown config key '{field}x'; did you mean {field}"):
        config_cls(**{field + "x": 1})
