"""What a run leaves on disk: metrics.json (what tables and notebooks read), the config digest, checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fmlab.utils.errors import UserError

METRICS_FILE = "metrics.json"
UNHASHED_KEYS = ("paths", "hydra", "ckpt_path")


def config_digest(config: DictConfig) -> str:
    """SHA-256 (first 16 hex digits) of the resolved config, leaving out where outputs go: equal digests, same run."""
    container = OmegaConf.to_container(config, resolve=True)
    for key in UNHASHED_KEYS:
        container.pop(key, None)
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_metrics(output_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write `metrics.json` atomically (a partial file never replaces a good one)."""
    target = Path(output_dir) / METRICS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".json.partial")
    partial.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n")
    partial.replace(target)
    return target


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


# where fmlab keeps its own entries (config, format, W&B run id) in a Lightning checkpoint
CHECKPOINT_KEY = "fmlab"


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint written by `fmlab.train`, or a one-line error saying what is wrong with the file.

    `mmap=True` maps the tensors instead of reading them: cheap when only the metadata is needed.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ckpt_path={path} does not exist; give the path of a .ckpt file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as error:
        raise UserError(f"ckpt_path={path} is not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"ckpt_path={path} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint
