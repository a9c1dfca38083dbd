"""Logger construction: W&B online when credentials exist, offline otherwise."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger, WandbLogger

OFFLINE_MODES = ("offline", "dryrun", "disabled")


def wandb_credentials_available() -> bool:
    """True when W&B can authenticate: WANDB_API_KEY, or a netrc entry for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    netrc_file = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(netrc_file).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_should_be_offline(offline: bool | None) -> bool:
    """An explicit `offline` wins; then WANDB_MODE; then online only if credentials are available."""
    if offline is not None:
        return bool(offline)
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in OFFLINE_MODES:
        return True
    if mode == "online":
        return False
    return not wandb_credentials_available()


def sweep_group() -> str | None:
    """`sweep-<sweep dir name>` inside a Hydra multirun (every job of one sweep shares it), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return f"sweep-{Path(hydra_cfg.sweep.dir).name}"


def wandb_logger(offline: bool | None = None, group: str | None = None, **kwargs: Any) -> WandbLogger:
    """A Lightning `WandbLogger` whose online/offline mode follows `wandb_should_be_offline`; in a multirun the jobs
    are grouped by sweep (`sweep-<sweep dir name>`), otherwise by `group`."""
    return WandbLogger(offline=wandb_should_be_offline(offline), group=sweep_group() or group, **kwargs)


def log_final_metrics(loggers: list[Logger], metrics: dict[str, Any]) -> None:
    """The run's metrics.json as a W&B table (`final_metrics`) and in the run summary; other loggers get the scalars
    already, through the Evaluator."""
    rows = [[key, str(value)] for key, value in sorted(metrics.items()) if not isinstance(value, list | dict)]
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key="final_metrics", columns=["metric", "value"], data=rows)
            scalars = {f"final/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
            logger.experiment.summary.update(scalars)


def finish_wandb(loggers: list[Logger]) -> None:
    """Close the W&B run so the next job of a sweep starts its own."""
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()
