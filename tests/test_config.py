"""Every option of every config group composes, and the objects it names instantiate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from fmlab.build import instantiate_each
from fmlab.cli import CONFIG_DIR, group_options
from fmlab.module import FlowModule
from tests.image_fixtures import WRITERS

GROUPS = [
    "method",
    "path",
    "schedule",
    "objective",
    "coupling",
    "data",
    "net",
    "solver",
    "scheduler",
    "trainer",
    "logger",
]
GROUPS += ["callbacks", "debug", "experiment"]
OPTIONS = [(group, option) for group in GROUPS for option in group_options(group)]


def test_every_group_has_options() -> None:
    assert all(group_options(group) for group in GROUPS)
    assert {"moons", "8gaussians", "checkerboard", "scurve", "swissroll", "circles", "pinwheel", "2spirals"} <= set(
        group_options("data")
    )
    assert (CONFIG_DIR / "train.yaml").is_file()


IMAGE_DATA_OF_NET = {"unet_small": "digits", "unet_cifar10": "cifar10", "unet_imagenet32": "imagenet32"}
IMAGE_DATA_OF_NET["unet_imagenet64"] = "imagenet64"


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group: str, option: str, train_config, tmp_path: Path) -> None:
    overrides = [f"{group}={option}"]
    if group == "net" and option in IMAGE_DATA_OF_NET:
        overrides.append(f"data={IMAGE_DATA_OF_NET[option]}")
    if group == "coupling" and option == "reflow":  # needs a teacher run; it is read only when training starts
        overrides.append(f"coupling.teacher={tmp_path / 'teacher'}")
    cfg = train_config(*overrides)
    if cfg.data.target in WRITERS:  # datasets read from disk: a small copy in the real format, composed again
        WRITERS[cfg.data.target](tmp_path / "data")
        overrides.append(f"data.data_dir={tmp_path / 'data'}")
        cfg = train_config(*overrides)
    datamodule = instantiate(cfg.data)
    with torch.device("meta"):  # every constructor runs, without the memory and random init of 150M+ parameters
        module = FlowModule.from_config(cfg)
    assert isinstance(module, FlowModule)
    assert datamodule.data_shape == tuple(cfg.data.shape)
    if cfg.net._target_.endswith("UNet"):
        assert module.net.data_shape == datamodule.data_shape
    instantiate(cfg.solver)
    callbacks = instantiate_each(cfg, "callbacks")
    loggers = instantiate_each(cfg, "logger")
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        return  # composes; Lightning refuses to build a GPU trainer on a machine without one
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    assert trainer.max_steps == (1 if cfg.trainer.get("fast_dev_run") else cfg.trainer.max_steps)
    if group == "method":
        assert cfg.method.name == option  # the name metrics.json and the tables record is the preset's
    elif group == "experiment":  # a paper's own method label (C²OT's fm / ot / c2ot) or an fmlab preset's
        assert cfg.method.name in group_options("method") or option.endswith(f"_{cfg.method.name}")


def test_method_presets_set_their_components(train_config) -> None:
    expected = {
        "fm_ot": ("CondOT", "none", "IndependentCoupling"),
        "fm_vp": ("VPLinear", "none", "IndependentCoupling"),
        "icfm": ("Linear", "constant", "IndependentCoupling"),
        "otcfm": ("Linear", "constant", "MinibatchOTCoupling"),
        "sbcfm": ("Linear", "bridge", "MinibatchOTCoupling"),
    }
    for method, (schedule, smoothing, coupling) in expected.items():
        cfg = train_config(f"method={method}")
        module = FlowModule.from_config(cfg)
        assert type(module.path.schedule).__name__ == schedule, method
        assert module.path.smoothing == smoothing and type(instantiate(cfg.coupling)).__name__ == coupling, method


def test_command_line_group_choices_override_the_method_preset(train_config) -> None:
    module = FlowModule.from_config(train_config("method=fm_vp", "schedule=vp_cosine"))
    assert type(module.path.schedule).__name__ == "VPCosine"
    module = FlowModule.from_config(train_config("path=vp"))
    assert type(module.path.schedule).__name__ == "VPLinear"
