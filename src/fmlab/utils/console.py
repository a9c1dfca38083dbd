"""What a run prints: each log line once, no third-party advertising or deprecation noise, and the composed config
as a tree (lightning-hydra-template's habit), also written to <run dir>/config_tree.log."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Lightning's tips advertise services; torch's deprecations inside Lightning are not the user's to fix
_ADVERTISING = "💡 Tip:"
THIRD_PARTY_DEPRECATIONS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*The anonymous setting has no effect.*",
)


class _DropAdvertising(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_ADVERTISING)


def quiet_third_party_output() -> None:
    """Once Hydra's handlers are on the root logger (console and <run dir>/<job>.log), Lightning's own console
    handlers would print each of its lines a second time: remove them and let the records propagate. Drop
    Lightning's advertising tips and the third-party deprecation warnings a default run triggers."""
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
            logger.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdvertising())
    for pattern in THIRD_PARTY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=pattern)


def config_tree(cfg: DictConfig, output_dir: str | Path | None = None) -> None:
    """Print the composed config as a tree, one branch per top-level key, and write it to `output_dir`'s
    config_tree.log."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key))
        if isinstance(value, DictConfig):
            try:
                text = OmegaConf.to_yaml(value, resolve=True)
            except Exception:  # an interpolation only the running job can resolve
                text = OmegaConf.to_yaml(value)
            branch.add(Syntax(text, "yaml", theme="ansi_dark"))
        else:
            branch.add(str(value))
    Console().print(tree)
    if output_dir is not None:
        import io

        from fmlab.runs import write_atomically

        text = io.StringIO()
        Console(file=text, width=120, color_system=None).print(tree)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        write_atomically(Path(output_dir) / "config_tree.log", text.getvalue().encode())
