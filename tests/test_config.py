"""Every config option and experiment composes and validates; bad configs fail at start naming the key."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from distill.config import ConfigError, register_configs, validate

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
register_configs()


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "method", "data", "optim", "trainer", "logger"])
def test_every_group_option_composes(group):
    for option in _options(group):
        extra = []
        if (group, option.split("_")[0]) == ("method", "sim"):  # a one-step student validates at 1 step
            extra = ["trainer.validation_steps=[1]"]
        if (group, option) == ("method", "d2gan"):  # one step, on teacher ODE pairs
            extra = ["trainer.validation_steps=[1]", "data=pairs"]
        if group == "data" and "prompts" in option:  # captions only: a data-free method
            extra = ["method=sim", "trainer.validation_steps=[1]"]
        cfg = _compose([f"{group}={option}", "data.shards='/x/{0..1}.tar'", *extra])
        typed = validate(cfg)
        from distill.methods import known_methods

        assert typed.method.name in known_methods()


@pytest.mark.parametrize("name", _options("experiment"))
def test_every_experiment_composes(name):
    cfg = _compose([f"+experiment={name}", "data.shards='/x/{0..1}.tar'"])
    typed = validate(cfg)
    assert name in typed.tags or typed.tags, "experiments tag their runs"


def test_debug_preset_composes():
    cfg = validate(_compose(["+experiment=lcm_lora_tiny", "+debug=fast"]))
    assert cfg.trainer.max_steps == 2 and cfg.model.pretrained == "distill:random-sdxl"


def test_lora_experiment_is_lora_and_full_is_not():
    assert validate(_compose(["+experiment=lcm_lora_sdxl", "data.shards=x"])).method.lora.rank == 64
    assert not validate(_compose(["+experiment=lcm_sdxl", "data.shards=x"])).method.lora.enabled


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigCompositionException, match="trainer.max_stepz"):
        _compose(["trainer.max_stepz=3"])
    with pytest.raises(ConfigError, match="trainer.bogus"):
        cfg = OmegaConf.to_container(_compose([]))
        cfg["trainer"]["bogus"] = 1
        validate(OmegaConf.create(cfg))


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException, match="trainer.max_steps"):
        _compose(["trainer.max_steps=many"])
    with pytest.raises(ConfigCompositionException, match="method.w_min"):
        _compose(["method.w_min=high"])


def test_lora_option_on_full_method_is_rejected():
    with pytest.raises(ConfigError, match="method.lora.rank"):
        validate(_compose(["method=lcd", "method.lora.rank=8"]))


def test_incompatible_values_are_rejected():
    with pytest.raises(ConfigError, match="method.w_min"):
        validate(_compose(["method=lcd", "method.w_min=9", "method.w_max=3"]))
    with pytest.raises(ConfigError, match="trainer.mixed_precision"):
        validate(_compose(["trainer.mixed_precision=fp8"]))
    with pytest.raises(ConfigError, match="method.inference_w"):
        validate(_compose(["method=lcd", "method.w_min=2", "method.w_max=8", "method.inference_w=9"]))
    with pytest.raises(ConfigError, match="method.inference_gamma"):
        validate(_compose(["method=lcd", "method.inference_gamma=1.5"]))
    validate(_compose(["method=lcd", "method.inference_gamma=0.3"]))
    with pytest.raises(ConfigError, match="method.num_ddim_timesteps"):
        validate(_compose(["method=lcd", "method.num_ddim_timesteps=30"]))
    with pytest.raises(ConfigError, match="trainer.validation_steps"):
        validate(_compose(["method=lcd", "method.num_ddim_timesteps=4", "trainer.validation_steps=[1,8]"]))


def test_config_changes_names_each_changed_leaf():
    from distill.tracking import config_changes

    old = {"method": {"num_ddim_timesteps": 10, "lora": {"rank": 8}}, "gone": 1, "resume": None}
    new = {"method": {"num_ddim_timesteps": 20, "lora": {"rank": 8}}, "added": [1, 2], "resume": "latest"}
    assert config_changes(old, new) == ["added: <unset> -> [1, 2]", "gone: 1 -> <unset>",
                                        "method.num_ddim_timesteps: 10 -> 20"]
    assert config_changes(None, new) == [] and config_changes(old, old) == []
