"""Loggers: W&B online when credentials exist and the service answers, offline otherwise, off when W&B is disabled;
a CSV logger that keeps a resumed run's history."""

from __future__ import annotations

import csv
import io
import netrc
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from fmlab.errors import first_detail
from fmlab.io import write_atomically

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


class FallbackWandbLogger(WandbLogger):
    """A `WandbLogger` that, when the online run cannot start (a rejected key, no network) within the init timeout,
    says so in one line and logs offline instead of ending the run with a traceback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)  # W&B warns on every run that the setting does nothing

    @property
    def experiment(self) -> Any:
        if self._experiment is None and not self._offline:
            try:
                return super().experiment
            except Exception as error:
                reason = first_detail(error)
                print(f"fmlab: W&B could not start online ({type(error).__name__}: {reason}); logging offline "
                      "instead (sync later with `wandb sync`)", file=sys.stderr, flush=True)  # fmt: skip
                self._offline, self._experiment = True, None
                self._wandb_init["mode"] = "offline"
                self._wandb_init.pop("settings", None)
        return super().experiment


def wandb_logger(
    offline: bool | None = None, group: str | None = None, init_timeout: float = 20.0, **kwargs: Any
) -> WandbLogger | None:
    """A Lightning `WandbLogger` whose online/offline mode follows `wandb_should_be_offline` (None, no logger, when
    WANDB_MODE=disabled); in a multirun the jobs are grouped by sweep (`sweep-<sweep dir name>`), otherwise by
    `group`. Online, a run that cannot start within `init_timeout` seconds falls back to offline."""
    if os.environ.get("WANDB_MODE", "").lower() == "disabled":
        return None
    offline = wandb_should_be_offline(offline)
    if not offline:
        import wandb

        kwargs["settings"] = wandb.Settings(init_timeout=init_timeout)
    return FallbackWandbLogger(offline=offline, group=sweep_group() or group, **kwargs)


class _HistoryKeepingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; this one appends to it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = list(csv.DictReader(handle).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """Lightning's `CSVLogger`, except that a resumed run keeps the history written before it was stopped
    (`keep_history_before` drops only the rows the resumed run writes again)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryKeepingWriter(log_dir=self.log_dir)
        return self._experiment

    def keep_history_before(self, step: int) -> None:
        """Keep the rows of steps before `step` (the checkpoint's): the run logs the later ones again."""
        path = Path(self.experiment.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            fields, rows = list(reader.fieldnames or []), [row for row in reader if int(row["step"]) < step]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        write_atomically(path, text.getvalue().encode())


def keep_history_before(loggers: list[Logger], step: int) -> None:
    """A resumed run (step > 0) keeps each file logger's history up to its checkpoint; a new run starts afresh."""
    for logger in loggers:
        if isinstance(logger, ResumableCSVLogger):
            logger.keep_history_before(step)


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
