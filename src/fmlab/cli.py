"""Command-line checks that run before Hydra: a mistyped option or key, a bad value, or a run dir that cannot be
used ends with one line, before Hydra writes anything into a run dir. The checks compose the config with Hydra itself,
so whatever Hydra finds (options on `hydra.searchpath`, nested options such as `experiment=recipes/digits`) passes."""

from __future__ import annotations

import importlib.resources
import logging
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf, open_dict

from fmlab.errors import UserError

# the configs travel with the package: conf/ at the repository's top level is the package resource fmlab.conf
CONFIG_MODULE = "fmlab.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"


def _run_stamp() -> str:
    from fmlab.runs import run_stamp

    return run_stamp()


# a new run dir's first name part: the start time, or the SLURM job (conf/hydra/default.yaml); one per process
if not OmegaConf.has_resolver("fmlab_run_stamp"):
    OmegaConf.register_new_resolver("fmlab_run_stamp", _run_stamp, use_cache=True)
CONFIG_DIR = Path(str(importlib.resources.files(CONFIG_MODULE)))


def group_options(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The options fmlab ships for a config group: the yaml files under conf/<group>/."""
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def parse_overrides(args: list[str]) -> list[Override]:
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as error:  # Hydra's grammar errors carry their own message.
        raise UserError(str(error).splitlines()[0]) from None


def representative_jobs(args: list[str]) -> list[list[str]]:
    """Override lists that between them use every value of every sweep (`a=1,2 b=x,y` gives a=1 b=x, a=2 b=x,
    a=1 b=y): composing each checks a multirun's options without composing all of its jobs."""
    plain = [a for a in args if "=" in a and not a.startswith("-")]
    parsed = parse_overrides(plain)
    values = [
        [str(v) for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.get_value_element_as_str()]
        for o in parsed
    ]
    keys = [o.get_key_element() for o in parsed]
    first = [f"{k}={v[0]}" for k, v in zip(keys, values, strict=True)]
    jobs = [first]
    for index, options in enumerate(values):
        for value in options[1:]:
            jobs.append([*first[:index], f"{keys[index]}={value}", *first[index + 1 :]])
    return jobs


def is_single_run(args: list[str]) -> bool:
    """A plain run: no multirun flag or sweep, no other Hydra flag (--cfg, --help, ...) that Hydra handles alone."""
    if any(a.startswith("-") for a in args) or any(a.startswith("hparams_search=") for a in args):
        return False
    return not any(o.is_sweep_override() for o in parse_overrides(args))


def condensed_composition_error(error: Exception) -> UserError:
    """Hydra's multi-line composition errors as one line that still names the bad value (and the choices)."""
    import re

    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    options = re.search(r"(?:Available options in '[^']*':|Available options:)\n((?:\t.*\n?)*)", text)
    listed = ", ".join(o.strip() for o in options.group(1).splitlines() if o.strip()) if options else ""
    missing = re.search(r"Could not find '(.+)/([^/']+)'", first)
    if missing:  # an option that does not exist: `data=nope`
        return UserError(f"{missing.group(1)}={missing.group(2)} is not a valid choice; choose one of: {listed}")
    if first.startswith("You must specify '"):  # a group without a default: `table: ???`
        group = first.split("'")[1]
        return UserError(f"{group} is required; choose one of: {listed}")
    if first.startswith("Could not override '"):  # an unknown key
        key = first.split("'")[1]
        return UserError(f"{key} is not a key of the config; to add a new key write +{key}=<value>")
    return UserError(" ".join(lines))


def compose_for_checks(config_name: str, args: list[str]) -> DictConfig:
    """The config Hydra is about to run, composed without running it (its `hydra` node included, unresolved)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    try:
        if GlobalHydra.instance().is_initialized():  # inside a running fmlab app: its search path holds fmlab.conf
            return compose(config_name, overrides=args, return_hydra_config=True)
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(config_name, overrides=args, return_hydra_config=True)
    except HydraException as error:
        raise condensed_composition_error(error) from None


def check_composes(config_name: str, args: list[str]) -> None:
    """One line for an option or key Hydra cannot compose, in any job of a multirun over `args`."""
    for job in representative_jobs(args):
        compose_for_checks(config_name, job)


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
    """What every `fmlab-<entry>` / `python -m fmlab.<entry>` does: compose the command line's config (a single run:
    then `preflight(cfg, args)`; a multirun: one job per sweep value), then hand over to Hydra. A user error anywhere
    ends as one line and exit status 2. Hydra's own flags (--help, --cfg, --shell-completion, ...) go straight on."""
    from fmlab.errors import exit_on_user_error

    @exit_on_user_error
    def checked() -> None:
        args = sys.argv[1:]
        quiet_stack_deprecations()  # the checks run parts too (the first loss: MeanFlow's JVP warns inside torch)
        args = sys.argv[1:] = [*args, *rank_arguments(args)]
        flags = [a for a in args if a.startswith("-")]
        if config_name is not None and set(flags) <= {"-m", "--multirun"}:
            if is_single_run(args):
                cfg = compose_for_checks(config_name, args)
                if preflight is not None:
                    preflight(cfg, args)
            else:
                check_composes(config_name, args)
        hydra_main()

    checked()


def rank_arguments(args: list[str]) -> list[str]:
    """In a process that is not the launching one (a second node's command, a rank Lightning or srun started),
    Hydra writes nothing into the shared run dir: no .hydra/ copy of the config and no job log file (rank 0 writes
    both), as Lightning's own launcher asks of the ranks it starts."""
    from fmlab.runs import is_launching_process

    if is_launching_process():
        return []
    given = {a.split("=", 1)[0].lstrip("+~") for a in args}
    extra = {"hydra.output_subdir": "hydra.output_subdir=null", "hydra/job_logging": "hydra/job_logging=stdout"}
    return [value for key, value in extra.items() if key not in given]


# Lightning's tips advertise services; torch's deprecations inside Lightning are not the user's to fix
_ADVERTISING = "💡 Tip:"
# The stack's packages: a deprecation notice a run triggers inside one of them (torch.func.jvp's first call warns
# that torch.jit.script is deprecated, from torch's own code) is for that package's authors, not for a user's config.
# A notice attributed to any other module (a user's net, or fmlab's own calls, which the tests keep clean) shows.
THIRD_PARTY_PACKAGES = ("torch", "torchvision", "torchmetrics", "torchdiffeq", "torch_fidelity", "lightning",
                        "lightning_utilities", "hydra", "omegaconf", "wandb", "ot", "sklearn", "scipy", "numpy",
                        "matplotlib", "PIL")  # fmt: skip
DEPRECATION_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
THIRD_PARTY_MODULES = rf"(?:{'|'.join(re.escape(name) for name in THIRD_PARTY_PACKAGES)})(?:\.|$)"
# messages the stack raises as other categories, or attributes to a caller outside it
THIRD_PARTY_DEPRECATIONS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*The anonymous setting has no effect.*",
    # every point-data run: FlowModule validates only where the datamodule has a val split, nothing to act on
    r".*You defined a `validation_step` but have no `val_dataloader`.*",
)


class _DropAdvertising(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_ADVERTISING)


def quiet_third_party_output() -> None:
    """Once Hydra's handlers are on the root logger (console and <run dir>/<job>.log), Lightning's own console
    handlers would print each of its lines a second time: remove them and let the records propagate. Drop
    Lightning's advertising tips and the deprecation warnings raised inside the stack's packages."""
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
            logger.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdvertising())
    quiet_stack_deprecations()


def quiet_stack_deprecations() -> None:
    """Ignore the deprecation warnings attributed to a module of THIRD_PARTY_PACKAGES, and the listed messages."""
    for category in DEPRECATION_CATEGORIES:
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY_MODULES)
    for pattern in THIRD_PARTY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=pattern)


def config_tree(cfg: DictConfig) -> str:
    """The composed config as a tree, one branch per top-level key (lightning-hydra-template's habit), as text."""
    import io

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
    text = io.StringIO()
    Console(file=text, width=120, color_system=None).print(tree)
    return text.getvalue()


def what_was_run(cfg: DictConfig, output_dir: str | Path, echo: bool = True) -> None:
    """Write the whole composed config to <output_dir>/config_tree.log, and print what a user asks of a run: the
    option each config group chose and the command line's overrides (the whole config is in that file)."""
    from hydra.core.hydra_config import HydraConfig

    from fmlab.io import write_text

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text(output_dir / "config_tree.log", config_tree(cfg))
    if not echo or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if v is not None and not k.startswith("hydra")}
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("hydra.")]
    print("fmlab: groups: " + " ".join(f"{k}={v}" for k, v in sorted(choices.items())), flush=True)
    print(f"fmlab: overrides: {' '.join(overrides) or '(none)'}", flush=True)
    print(f"fmlab: the whole config: {output_dir / 'config_tree.log'}", flush=True)


def compose_train_config(overrides: list[str], output_dir: str | Path) -> DictConfig:
    """The train config for `overrides`, writing into `output_dir`; like the CLI's, it has no `hydra` node."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)  # resolves ${hydra:runtime.output_dir}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
