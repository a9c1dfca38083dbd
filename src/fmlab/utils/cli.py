"""Command-line checks that run before Hydra, so a mistyped option ends with one line listing the choices."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override

from fmlab.utils.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[3] / "conf"


def group_options(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The options of a config group: the yaml files under conf/<group>/."""
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def _override_values(override: Override) -> list[str]:
    if override.is_sweep_override():
        return [str(v) for v in override.sweep_iterator()]
    value = override.value()
    return [] if value is None else [str(value)]


def check_group_choices(args: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Raise a one-line `UserError` for `group=option` overrides naming an option that does not exist.

    Hydra's own message for this spans many lines; this check reads the same overrides with Hydra's parser.
    """
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as error:  # Hydra's grammar errors carry their own message.
        raise UserError(str(error).splitlines()[0]) from None
    for override in parsed:
        group = override.key_or_group.lstrip("+~")
        # hydra/* groups also hold plugin options (hydra/launcher=submitit_slurm) that Hydra checks itself
        if override.package or group.startswith("hydra/") or not (config_dir / group).is_dir() or override.is_delete():
            continue
        options = group_options(group, config_dir)
        for value in _override_values(override):
            if value not in options and value != "null":
                raise UserError(f"{group}={value} is not a valid choice; choose one of: {', '.join(options)}")


def run_entry_point(hydra_main: Callable[[], object]) -> None:
    """What every `python -m fmlab.<entry>` does: check the group choices on the command line, then hand over to
    Hydra; a user error anywhere ends as one line and exit status 2."""
    from fmlab.utils.errors import exit_on_user_error

    @exit_on_user_error
    def checked() -> None:
        check_group_choices(sys.argv[1:])
        hydra_main()

    checked()
