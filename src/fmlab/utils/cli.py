"""Command-line checks that run before Hydra: a mistyped option or key, a bad value, or a run dir that cannot be
used ends with one line, before Hydra writes anything into a run dir."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig

from fmlab.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[3] / "conf"


def group_options(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The options of a config group: the yaml files under conf/<group>/."""
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def _override_values(override: Override) -> list[str]:
    if override.is_sweep_override():
        return [str(v) for v in override.sweep_iterator()]
    value = override.value()
    return [] if value is None else [str(value)]


def parse_overrides(args: list[str]) -> list[Override]:
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as error:  # Hydra's grammar errors carry their own message.
        raise UserError(str(error).splitlines()[0]) from None


def check_group_choices(args: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Raise a one-line `UserError` for `group=option` overrides naming an option that does not exist.

    Hydra's own message for this spans many lines; this check reads the same overrides with Hydra's parser.
    """
    for override in parse_overrides(args):
        group = override.key_or_group.lstrip("+~")
        # hydra/* groups also hold plugin options (hydra/launcher=submitit_slurm) that Hydra checks itself
        if override.package or group.startswith("hydra/") or not (config_dir / group).is_dir() or override.is_delete():
            continue
        options = group_options(group, config_dir)
        for value in _override_values(override):
            if value not in options and value != "null":
                raise UserError(f"{group}={value} is not a valid choice; choose one of: {', '.join(options)}")


def is_single_run(args: list[str]) -> bool:
    """A plain run: no multirun flag or sweep, no other Hydra flag (--cfg, --help, ...) that Hydra handles alone."""
    if any(a.startswith("-") for a in args) or any(a.startswith("hparams_search=") for a in args):
        return False
    return not any(o.is_sweep_override() for o in parse_overrides(args))


def condensed_composition_error(error: Exception, config_dir: Path = CONFIG_DIR) -> UserError:
    """Hydra's multi-line composition errors as one line that still names the bad value (and the choices)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    if first.startswith("You must specify '"):  # a group without a default: `table: ???`
        group = first.split("'")[1]
        return UserError(f"{group} is required; choose one of: {', '.join(group_options(group, config_dir))}")
    if first.startswith("Could not override '"):  # an unknown key
        key = first.split("'")[1]
        return UserError(f"{key} is not a key of the config; to add a new key write +{key}=<value>")
    return UserError(" ".join(lines))


def compose_for_checks(config_name: str, args: list[str], config_dir: Path = CONFIG_DIR) -> DictConfig:
    """The config Hydra is about to run, composed without running it (its `hydra` node included, unresolved)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return compose(config_name, overrides=args, return_hydra_config=True)
    except HydraException as error:
        raise condensed_composition_error(error, config_dir) from None


def run_dir_override(args: list[str]) -> Path | None:
    """The run dir a `hydra.run.dir=...` argument names (the last one wins), else None."""
    values = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
    return Path(values[-1]) if values else None


def check_writable(directory: Path, name: str = "hydra.run.dir") -> None:
    """One line when `directory` cannot be created or written: its nearest existing ancestor must be writable."""
    import os

    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is read-only"
    else:
        try:  # root passes os.access on read-only file systems: try for real, leaving nothing behind
            import tempfile

            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as error:
            problem = f"{existing} cannot be written ({error.strerror})"
    if problem:
        raise UserError(f"{name}={directory} cannot be used: {problem}; choose a writable output dir")


def run_entry_point(
    hydra_main: Callable[[], object],
    config_name: str | None = None,
    preflight: Callable[[DictConfig, list[str]], None] | None = None,
) -> None:
    """What every `python -m fmlab.<entry>` does: check the command line (group choices; for a single run the whole
    composed config, then `preflight(cfg, args)`), then hand over to Hydra; a user error anywhere ends as one line
    and exit status 2."""
    from fmlab.errors import exit_on_user_error

    @exit_on_user_error
    def checked() -> None:
        args = sys.argv[1:]
        check_group_choices(args)
        if config_name is not None and is_single_run(args):
            cfg = compose_for_checks(config_name, args)
            if preflight is not None:
                preflight(cfg, args)
        hydra_main()

    checked()
