"""Composing the train config outside the CLI (tests, the benchmark, notebooks) exactly as the CLI does."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from fmlab.utils.cli import CONFIG_MODULE


def compose_train_config(overrides: list[str], output_dir: str | Path) -> DictConfig:
    """The train config for `overrides`, writing into `output_dir`; like the CLI's, it has no `hydra` node."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)  # resolves ${hydra:runtime.output_dir}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def instantiate_each(node: DictConfig | None) -> list:
    """Every object a dict-of-configs node names (callbacks, loggers); null entries, `group=none` and factories that
    return None (W&B when disabled) give none."""
    from hydra.utils import instantiate

    if not node:
        return []
    built = [instantiate(child) for child in node.values() if child and "_target_" in child]
    return [item for item in built if item is not None]
