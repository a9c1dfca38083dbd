"""Config → the run's parts, in one call, before anything is written.

`build_parts` validates the settings and builds, once, everything a run needs that does not depend on where it
writes: its data (coupled, or the reflow teacher's pairs), its system (net, path, objective, time sampler,
optimiser and schedule), its solver and its evaluator. `build_training` adds what does: callbacks, loggers and the
Lightning trainer. The entry points call these and nothing else assembles. Any error on the way is one line
naming the config key and its value (`instantiated`), raised before a run dir exists: the training entry point
runs `preflight` on the command line's config before Hydra creates the run dir, and the parts it built are
reused by the run itself (`build_parts` remembers them by the settings they depend on).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from fmlab.errors import UserError, find_user_error, first_detail

# the settings the output-independent parts depend on (their cache key)
PART_KEYS = ("seed", "method", "data", "net", "path", "schedule", "objective", "time_sampler", "conditioning",
             "coupling", "optimizer", "scheduler", "scheduler_interval", "performance", "solver", "eval",
             "ckpt_path")  # fmt: skip
# the weights the final evaluation measures: the end of training, or a monitoring checkpoint's best
EVAL_CHECKPOINTS = ("last", "best")


def instantiated(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` of the node at `key`, every failure one `UserError` naming the key and value."""
    from hydra.utils import instantiate

    node = OmegaConf.select(cfg, key)
    try:
        return instantiate(node, **kwargs)
    except Exception as error:
        raise config_error(key, node, error) from None


def _leaves(node: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(node, DictConfig):
        return [leaf for k, v in node.items_ex(resolve=False) for leaf in _leaves(v, f"{prefix}.{k}")]
    return [(prefix, node)]


def config_error(key: str, node: Any, error: BaseException) -> UserError:
    """One line for an error building the config node at `key`: a `UserError` raised inside stays as it is (it
    names its key); an unknown setting is named as `key.setting`; otherwise the setting whose value the message
    quotes (`trainer.precision='banana'`), or the node's target, with the cause's first line."""
    user_error = find_user_error(error)
    if user_error is not None:
        return user_error
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = first_detail(cause)
    target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
    unknown = re.search(r"unexpected keyword argument '([^']+)'", text)
    if unknown:
        return UserError(f"{key}.{unknown.group(1)} is not a setting of {target}; remove it or check its spelling")
    for name, value in _leaves(node, key):
        if isinstance(value, str) and len(value) > 1 and (f"'{value}'" in text or f'"{value}"' in text):
            return UserError(f"{name}={value!r} is invalid: {text}")
    return UserError(f"{key} ({target}) could not be built: {type(cause).__name__}: {text}")


# the groups whose numbers are settings of a part (each checked finite unless its class allows infinity)
SETTING_GROUPS = ("data", "net", "path", "schedule", "objective", "time_sampler", "coupling", "conditioning",
                  "optimizer", "scheduler", "solver", "method", "eval")  # fmt: skip


def allowed_infinite(node: Any) -> tuple[str, ...]:
    """The settings of the node's target that may be infinite: its class's `infinite_settings` (e.g. C²OT's
    `weight=inf`, a pairing within classes only, or EDM's `s_max=inf`, churn at every noise level)."""
    import importlib

    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not isinstance(target, str) or "." not in target:
        return ()
    module_name, name = target.rsplit(".", 1)
    try:
        found = getattr(importlib.import_module(module_name), name)
    except Exception:  # a target the build reports itself
        return ()
    return tuple(getattr(found, "infinite_settings", ())) if isinstance(found, type) else ()


def _numbers(node: Any, prefix: str) -> list[tuple[str, Any, tuple[str, ...]]]:
    """(key, value, the settings allowed to be infinite there) for every number under `node`, resolved."""
    from omegaconf import ListConfig

    if isinstance(node, ListConfig):
        items = [(f"{prefix}[{i}]", node._get_node(i)) for i in range(len(node))]
        allowed: tuple[str, ...] = ()
    elif isinstance(node, DictConfig):
        items = [(f"{prefix}.{key}", node._get_node(key)) for key in node]
        allowed = allowed_infinite(node)
    else:
        return []
    found = []
    for key, child in items:
        try:
            value = child._dereference_node()._value() if child is not None else None
        except Exception:  # an interpolation this scan cannot resolve: the build reports it
            continue
        if isinstance(child, DictConfig | ListConfig) or isinstance(value, DictConfig | ListConfig):
            found += _numbers(child if isinstance(child, DictConfig | ListConfig) else value, key)
        elif isinstance(value, float):
            found.append((key, value, allowed))
    return found


def check_finite_settings(cfg: DictConfig) -> None:
    """Every number of a part's settings is finite (and a float32 number) unless the part declares that setting
    may be infinite: inf, NaN or 1e300 where a finite value is meant fails here, in one line, not as a loss that is
    NaN at step 1."""
    largest = 3.4028234663852886e38  # float32's: the parts compute in float32, where a larger value is inf
    for group in SETTING_GROUPS:
        for key, value, allowed in _numbers(cfg.get(group), group):
            name = key.rsplit(".", 1)[-1]
            if abs(value) <= largest or (name in allowed and math.isinf(value)):
                continue
            infinite = f" (of its settings only {', '.join(allowed)} may be inf)" if allowed else ""
            beyond = "" if not math.isfinite(value) else " within float32's range (|x| <= 3.4e38)"
            raise UserError(f"{key}={value} is invalid; it must be a finite number{beyond}{infinite}")


@contextmanager
def checking(cfg: DictConfig, *keys: str):
    """A check of the parts at `keys` whose own code raises (an `OverflowError` inside a validity check, say) ends
    like any other bad setting: one `UserError` naming those parts' settings, with the cause."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is not None:
            raise user_error from None
        node = OmegaConf.select(cfg, keys[0])
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else {}
        settings = ", ".join(f"{keys[0]}.{k}={v}" for k, v in values.items() if k != "_target_" and not
                             isinstance(v, dict | list))  # fmt: skip
        others = f" (with {', '.join(keys[1:])})" if keys[1:] else ""
        raise UserError(
            f"checking {settings or keys[0]}{others} failed: {type(error).__name__}: {first_detail(error)}; "
            "choose values inside the part's range"
        ) from None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_settings(cfg: DictConfig) -> None:
    """Checks on plain values that Lightning would accept silently (max_steps = -1 trains forever, lr = 0 trains
    nothing) or report with a traceback."""
    check_finite_settings(cfg)
    trainer = cfg.trainer
    if not trainer.get("fast_dev_run") and (not isinstance(trainer.max_steps, int) or trainer.max_steps < 1):
        raise UserError(f"trainer.max_steps={trainer.max_steps} is invalid; it must be a positive integer")
    lr = cfg.optimizer.get("lr")
    if lr is not None and (not _is_number(lr) or lr <= 0):
        raise UserError(f"optimizer.lr={lr!r} is invalid; it must be a positive number such as 2e-3")
    if cfg.get("eval_checkpoint", "last") not in EVAL_CHECKPOINTS:
        raise UserError(
            f"eval_checkpoint={cfg.eval_checkpoint} is not one of {', '.join(EVAL_CHECKPOINTS)}: the weights at the "
            "end of training, or the best checkpoint of a monitoring ModelCheckpoint (callbacks=best_val)"
        )
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise UserError(f"seed={seed!r} is invalid; it must be a whole number from 0 to 2**32 - 1")
    if "ddp" in str(trainer.get("strategy", "")) and trainer.get("devices", 1) != 1 and local_multirun():
        raise UserError(
            f"trainer.strategy={trainer.strategy} cannot run inside a local multirun (Lightning would relaunch the "
            "whole sweep once per rank); run the jobs one at a time or submit them with hydra/launcher=slurm"
        )
    conditioning = cfg.get("conditioning") or {}
    if conditioning.get("labels") and not conditioning.get("num_classes"):
        raise UserError(
            f"conditioning=class needs data with class labels; data={cfg.data.get('target')} has none (labelled: "
            "moons, 8gaussians, tong_moons, tong_8gaussians, digits, mnist, cifar10, imagenet32, imagenet64)"
        )


def check_override_types(defaults: DictConfig, cfg: DictConfig, args: list[str]) -> None:
    """A `key=value` override whose default is a number (or a boolean) must be one too: `data.batch_size=abc`
    would otherwise reach the datamodule as a string and fail deep inside it."""
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+~")
        if "=" not in arg or arg.startswith(("-", "hydra.")) or "." not in key:
            continue
        default, value = OmegaConf.select(defaults, key), OmegaConf.select(cfg, key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise UserError(f"{key}={value!r} is invalid; it must be true or false")
        if _is_number(default) and not isinstance(value, int | float) and value is not None:
            raise UserError(f"{key}={value!r} is invalid; it must be a number (the default is {default})")


def chosen_option(cfg: DictConfig, group: str) -> str:
    """The option of config group `group` this run chose (Hydra's choice; for data its target), for messages."""
    from hydra.core.hydra_config import HydraConfig

    if group == "data" and cfg.data.get("target"):
        return str(cfg.data.target)
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return str(choice)
    target = str((cfg.get(group) or {}).get("_target_", "?"))
    return target.rsplit(".", 1)[-1]


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def local_multirun() -> bool:
    """A Hydra multirun outside SLURM (where srun, not Lightning, starts the ranks)."""
    return in_multirun() and "SLURM_NTASKS" not in os.environ


@dataclass
class Parts:
    """What a run is, independent of where it writes: built once by `build_parts`."""

    datamodule: Any
    module: Any  # fmlab.module.FlowModule
    coupling: Any
    solver: Any
    evaluator: Any  # fmlab.evaluation.Evaluator
    resume_step: int = 0
    teacher: Any = None  # fmlab.reflow.Teacher of a reflow run


_built: dict[str, Any] = {}  # what this process's preflight built, by `parts_key` / `evaluation_key`


def parts_key(cfg: DictConfig) -> str:
    container = {key: OmegaConf.to_container(cfg, resolve=True).get(key) for key in PART_KEYS}
    return json.dumps(container, sort_keys=True, default=str)


def build_parts(cfg: DictConfig) -> Parts:
    """Validate `cfg` and build its data, system, coupling, solver and evaluator (seeded, in the order every run
    builds them: the net's initial weights depend on it). Parts already built for the same settings in this process
    (by `preflight`) are returned as they are."""
    key = parts_key(cfg)
    if key in _built:
        return _built.pop(key)
    import lightning as L

    from fmlab.conditioning import Conditioning, check_parts
    from fmlab.module import FlowModule
    from fmlab.reflow import ReflowCoupling, ReflowDataModule, init_student
    from fmlab.runs import check_resume

    validate_settings(cfg)
    resume_step = check_resume(cfg) if cfg.get("ckpt_path") is not None else 0
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiated(cfg, "data")
    module = FlowModule.from_config(cfg, make=lambda name: instantiated(cfg, name))
    check_optimizer(module)
    coupling = instantiated(cfg, "coupling")
    if module.objective.needs_gaussian_source and datamodule.source != "gaussian":
        raise UserError(
            f"data.source={datamodule.source} cannot be used with method={cfg.method.name}: its objective "
            f"({module.objective!r}) assumes a N(0, I) source; use data.source=gaussian or a velocity objective"
        )
    teacher = None
    if isinstance(coupling, ReflowCoupling):  # training batches: the teacher's pairs; evaluation: the data
        teacher = load_teacher(coupling)
        datamodule = ReflowDataModule(datamodule, coupling, teacher, cfg.data.batch_size, cfg.seed)
        if cfg.ckpt_path is None and coupling.init_from_teacher:
            init_student(module.net, teacher, coupling)
    else:  # the coupling runs where the batches are made (loader workers with data.num_workers)
        with checking(cfg, "coupling", "data"):
            datamodule.couple_with(coupling)
    with checking(cfg, "conditioning", "data", "net", "coupling"):
        check_parts(
            Conditioning.from_config(cfg.get("conditioning")), datamodule, module.net, coupling,
            "coupling=reflow's teacher pairs" if teacher is not None else f"data={chosen_option(cfg, 'data')}",
            f"net={chosen_option(cfg, 'net')}", f"coupling={chosen_option(cfg, 'coupling')} ({coupling!r})",
        )  # fmt: skip
    solver = instantiated(cfg, "solver")
    try:
        with checking(cfg, "solver", "path", "schedule"):
            solver.check_path(module.path)  # e.g. the ancestral sampler on the OT path
    except UserError as refusal:
        raise UserError(f"solver={solver.method}: {refusal}") from None
    if getattr(solver, "needs_durations", False) and getattr(module.net, "time_inputs", 1) != 2:
        raise UserError(f"solver={solver.method} jumps with an average velocity: it needs method=meanflow")
    evaluator = instantiated(cfg, "eval", **reused(cfg.eval, {"${solver}": solver}))
    with checking(cfg, "eval", "data"):
        evaluator.check_field(module.velocity_field(), datamodule)
    with checking(cfg, "time_sampler", "path", "schedule", "objective"):
        check_time_sampler(module)
    with checking(cfg, "objective", "path", "schedule", "time_sampler"):
        check_first_loss(module, datamodule)
    return Parts(datamodule, module, coupling, solver, evaluator, resume_step, teacher)


def check_time_sampler(module: Any) -> None:
    """The training-time distribution must fit the path (`TimeSampler.check`), and intervals go with MeanFlow's loss
    and a net with two time inputs, points in time with every other objective."""
    from fmlab.objectives import MeanFlowObjective
    from fmlab.paths.time_samplers import MeanFlowTimes

    module.time_sampler.check(module.path)
    intervals = isinstance(module.time_sampler, MeanFlowTimes)
    meanflow = isinstance(module.objective, MeanFlowObjective)
    if intervals != meanflow:
        pair = f"{type(module.time_sampler).__name__} with {type(module.objective).__name__}"
        raise UserError(
            f"time_sampler=mean_flow draws intervals for objective=mean_flow and only for it: got {pair}; "
            "use method=meanflow"
        )
    if meanflow and getattr(module.net, "time_inputs", 1) != 2:
        raise UserError(f"objective=mean_flow needs a net with two time inputs: net.time_inputs="
                        f"{getattr(module.net, 'time_inputs', 1)}; use method=meanflow")  # fmt: skip


def check_first_loss(module: Any, datamodule: Any, rows: int = 16) -> None:
    """The loss of the initial net on `rows` held-out pairs (x0 from the evaluation source, x1 from the held-out
    data, conditions as the net reads them), computed as training computes it but before any step: a setting that
    makes it non-finite or exactly 0 (a loss that learns nothing: a weight of 0 for every draw) fails here, in one
    line, not as a normal-looking run. The run's random streams are left as they were."""
    from fmlab.conditioning import net_kind

    if not (hasattr(datamodule, "held_out") and hasattr(datamodule, "eval_source")):
        return  # the training-health callback checks the first steps instead
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(0)
        x1, x0 = datamodule.held_out(rows), datamodule.eval_source(rows)
        pairs = min(len(x1), len(x0))  # a small held-out set may have fewer
        x1, x0 = x1[:pairs], x0[:pairs]
        kind = net_kind(module.net)
        labels = None
        if kind == "class":
            labels = torch.arange(pairs) % module.net.num_classes
        elif kind == "continuous" and hasattr(datamodule, "held_out_conditions"):
            labels = datamodule.held_out_conditions(rows)[:pairs].to(x1.dtype)  # the conditions of x1's rows
        loss = float(module._loss(x0.to(x1.dtype), x1, labels).detach())
    if not math.isfinite(loss) or loss == 0.0:
        cause = "learns nothing" if loss == 0.0 else "cannot train"
        raise UserError(
            f"the training loss of the initial net on {pairs} held-out pairs is {loss}, before any step: the run "
            f"{cause}; check {loss_settings(module)}"
        )


def check_optimizer(module: Any) -> None:
    """Build the optimiser and schedule once, as Lightning will: a bad setting fails now, in one line."""
    try:
        module.configure_optimizers()
    except UserError:
        raise
    except Exception as error:
        raise UserError(
            f"optimizer/scheduler could not be built: {type(error).__name__}: {first_detail(error)}"
        ) from None


def load_teacher(reflow: Any) -> Any:
    """The reflow teacher, loaded once: its net (EMA weights when asked for), field and step. A teacher whose own
    run diverged is refused before any pair is made."""
    from fmlab.reflow import Teacher
    from fmlab.runs import METRICS_FILE, load_run, read_metrics

    run_dir = reflow.teacher_run_dir()
    if (run_dir / METRICS_FILE).is_file() and read_metrics(run_dir).get("diverged"):
        raise UserError(
            f"coupling.teacher={reflow.teacher} diverged (its {METRICS_FILE} says diverged: true); a student "
            "learns its teacher's samples: choose a teacher that trained"
        )
    run = load_run(reflow.teacher, reflow.use_ema, name="coupling.teacher")
    return Teacher(net=run.net, field=run.velocity_field(), step=run.step, data_shape=tuple(run.datamodule.data_shape))


def reused(node: DictConfig, shared: dict[str, Any]) -> dict[str, Any]:
    """The settings of `node` written exactly as one of the interpolations in `shared` (e.g. `${solver}`), mapped to
    that object: the run's own, instead of a second copy built from the same config."""
    written = {setting: node._get_node(setting)._value() for setting in node}
    return {setting: shared[raw] for setting, raw in written.items() if isinstance(raw, str) and raw in shared}


def instantiate_each(cfg: DictConfig, key: str, shared: dict[str, Any] | None = None) -> list:
    """Every object the dict-of-configs node at `key` names (callbacks, loggers); null entries, `group=none` and
    factories that return None (W&B when disabled) give none. A child's setting written exactly as one of the
    interpolations in `shared` (e.g. `${solver}`) gets that object, the run's own, instead of a second copy."""
    node = OmegaConf.select(cfg, key)
    if not node:
        return []
    built = []
    for name, child in node.items():
        if not child or "_target_" not in child:
            continue
        written = {setting: child._get_node(setting)._value() for setting in child}
        reuse = {
            setting: shared[raw] for setting, raw in written.items() if isinstance(raw, str) and raw in (shared or {})
        }
        built.append(instantiated(cfg, f"{key}.{name}", **reuse))
    return [item for item in built if item is not None]


@dataclass
class TrainingRun:
    """A run ready to fit: its parts, and the callbacks, loggers and trainer that write into `output_dir`."""

    cfg: DictConfig
    parts: Parts
    output_dir: Path
    callbacks: list = field(default_factory=list)
    loggers: list = field(default_factory=list)
    trainer: Any = None
    evaluation: Any = None  # the PeriodicEvaluation callback, if any

    @property
    def module(self) -> Any:
        return self.parts.module

    @property
    def datamodule(self) -> Any:
        return self.parts.datamodule


def build_training(cfg: DictConfig, parts: Parts | None = None) -> TrainingRun:
    """`build_parts`, then the callbacks (the configured ones with the run's solver and evaluator, plus those every
    run needs: its config in every checkpoint, per-step seeds, a checkpoint on SIGTERM, a stop on a non-finite
    loss), the loggers (continuing a resumed run's W&B run) and the trainer."""
    from fmlab.callbacks import PeriodicEvaluation
    from fmlab.callbacks.resume import (
        AtomicCheckpointIO,
        CheckpointOnSigterm,
        StepSeed,
        StopOnNonFiniteLoss,
        TrainingClock,
    )
    from fmlab.callbacks.run_config import RunConfigInCheckpoint
    from fmlab.runs import wandb_run_id

    parts = parts or build_parts(cfg)
    callbacks = [
        *instantiate_each(cfg, "callbacks", {"${solver}": parts.solver, "${eval}": parts.evaluator}),
        RunConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True)),
        StepSeed(cfg.seed),
        TrainingClock(),
        CheckpointOnSigterm(),
        StopOnNonFiniteLoss(loss_settings(parts.module)),
    ]
    run_id = wandb_run_id(cfg)
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg and run_id:  # a resumed run logs into the W&B run its checkpoint names
        with open_dict(wandb_cfg):
            wandb_cfg.id, wandb_cfg.resume = run_id, "allow"
    loggers = instantiate_each(cfg, "logger")
    plugins: list[Any] = [AtomicCheckpointIO()]
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():  # ranks from SLURM's variables; the requeue is fmlab's (CheckpointOnSigterm), once
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = instantiated(cfg, "trainer", callbacks=callbacks, logger=loggers or False, plugins=plugins)
    evaluation = next((c for c in callbacks if isinstance(c, PeriodicEvaluation)), None)
    return TrainingRun(cfg, parts, Path(cfg.paths.output_dir), callbacks, loggers, trainer, evaluation)


def loss_settings(module: Any) -> str:
    """The parts that make the training loss, as a message names them."""
    return f"objective={module.objective!r}, path={module.path!r}, time_sampler={module.time_sampler!r}"


@contextmanager
def quiet_lightning():
    """Lightning's start-up notes (GPU available, ...) are printed by the run's own trainer, not by the check's."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def preflight(cfg: DictConfig, args: list[str]) -> None:
    """Before Hydra creates or writes into the run dir: build the whole run from the command line's config (into a
    run dir that is not created) so that any bad value ends in one line, check the run dir (writable, not another
    run's, not in use) and lock it for this process. The parts are kept for the run to reuse."""
    from hydra.core.hydra_config import HydraConfig

    from fmlab.cli import check_writable, compose_for_checks, run_dir_override
    from fmlab.runs import check_new_run_dir, is_launching_process, lock_run_dir

    run_dir = run_dir_override(args)
    resolvable = cfg.copy()
    OmegaConf.set_readonly(resolvable.hydra, False)
    with open_dict(resolvable):
        resolvable.hydra.runtime.output_dir = str(run_dir or resolvable.hydra.run.dir)
    HydraConfig().set_config(resolvable)  # resolves ${hydra:runtime.output_dir}, ${now:...}
    with open_dict(resolvable):
        del resolvable["hydra"]
    try:
        plain = [a for a in args if "=" in a and "." in a.split("=", 1)[0] and not a.startswith(("hydra.", "-"))]
        check_override_types(compose_for_checks("train", [a for a in args if a not in plain]), resolvable, plain)
        parts = build_parts(resolvable)
        with quiet_lightning():
            build_training(resolvable, parts)  # callbacks, loggers, trainer: built to check them, then dropped
        _built[parts_key(resolvable)] = parts
    finally:
        HydraConfig.instance().cfg = None  # Hydra sets its own when it runs the job
    if run_dir is None:  # a new, timestamped run dir under paths.log_dir
        check_writable(Path(str(resolvable.paths.log_dir)), "paths.log_dir")
        return
    check_writable(run_dir)
    if is_launching_process():  # a run dir in use says so first, whatever the running job has written into it
        lock_run_dir(run_dir)
    check_new_run_dir(resolvable, run_dir)


# the sampler lists of conf/sweep and the setting each varies
SWEEP_GROUPS = (
    ("fixed_step_methods", "num_steps", False),
    ("adaptive_methods", "tolerances", True),
    ("stochastic_methods", "stochastic_num_steps", False),
)
SWEEP_KINDS = ("nfe", "guidance")


def solver_from_conf(name: str, key: str, **settings: Any) -> Any:
    """The sampler conf/solver/<name>.yaml builds, with `settings` over its defaults (the registry
    `fmlab.samplers.SAMPLERS` names the choices)."""
    from hydra.utils import instantiate

    from fmlab.cli import CONFIG_DIR
    from fmlab.errors import choices_error
    from fmlab.samplers import SAMPLERS

    if name not in SAMPLERS:
        raise choices_error(key, name, SAMPLERS)
    node = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "solver" / f"{name}.yaml"), settings)
    try:
        return instantiate(node)
    except Exception as error:
        raise config_error(key, node, error) from None


def sweep_samplers(sweep: DictConfig) -> list[Any]:
    """Every sampler a sweep config names, at every setting it lists: fixed-step and native samplers at each step
    count, adaptive ones at each tolerance (atol = rtol), each from its conf/solver file."""
    samplers = []
    for methods_key, values_key, adaptive in SWEEP_GROUPS:
        methods, values = list(sweep.get(methods_key) or []), list(sweep.get(values_key) or [])
        if methods and not values:
            raise UserError(
                f"sweep.{values_key}=[] leaves sweep.{methods_key}={methods} nothing to run; give one or more"
            )
        for name in methods:
            for value in values:
                settings = {"atol": value, "rtol": value} if adaptive else {"num_steps": value}
                sampler = solver_from_conf(name, f"sweep.{methods_key}", **settings)
                if sampler.is_adaptive != adaptive:
                    kind = "an adaptive" if sampler.is_adaptive else "a fixed-step"
                    raise UserError(f"sweep.{methods_key} lists {name}, {kind} sampler; move it to its own list")
                samplers.append(sampler)
    if not samplers:
        raise UserError("the sweep names no sampler: list one under sweep.fixed_step_methods, adaptive_methods or "
                        "stochastic_methods")  # fmt: skip
    return samplers


@dataclass
class EvaluationRun:
    """What `fmlab.evaluate` evaluates: the loaded run, the evaluator, and a sweep's samplers (if any)."""

    key: str
    run: Any  # fmlab.runs.LoadedRun
    evaluator: Any
    sweep_kind: str | None = None
    samplers: list = field(default_factory=list)


def evaluation_key(cfg: DictConfig) -> str:
    settings = [OmegaConf.to_container(cfg.eval, resolve=True), *(cfg.get(k) for k in ("ckpt_path", "use_ema"))]
    sweep = cfg.get("sweep")
    return "evaluate:" + json.dumps([*settings, OmegaConf.to_container(sweep) if sweep else None], default=str)


def build_evaluation(cfg: DictConfig) -> EvaluationRun:
    """The checkpoint's run, rebuilt, and the evaluation `cfg` asks of it, checked: the solver fits its path, a
    sweep names samplers and settings to run. Built once per process (the preflight's is reused)."""
    from fmlab.runs import load_run

    key = evaluation_key(cfg)
    if key in _built:
        return _built.pop(key)
    if not cfg.get("ckpt_path"):
        raise UserError("ckpt_path is required: python -m fmlab.evaluate ckpt_path=<run dir or .ckpt file>")
    run = load_run(cfg.ckpt_path, cfg.use_ema)
    if cfg.eval.num_samples is None:  # default: as many samples as the run evaluated with
        with open_dict(cfg):
            cfg.eval.num_samples = run.config.eval.num_samples
    evaluator = instantiated(cfg, "eval")
    try:
        evaluator.solver.check_path(run.module.path)
    except UserError as refusal:
        raise UserError(f"solver={evaluator.solver.method}: {refusal}") from None
    evaluator.check_field(run.velocity_field(), run.datamodule)
    if not cfg.get("sweep"):
        return EvaluationRun(key, run, evaluator)
    kind = cfg.sweep.get("kind", "nfe")
    if kind not in SWEEP_KINDS:
        from fmlab.errors import choices_error

        raise choices_error("sweep.kind", kind, SWEEP_KINDS)
    if kind == "guidance":
        if not run.velocity_field().is_conditional:
            raise UserError("sweep=guidance needs a class-conditional run (trained with conditioning=class)")
        if not run.velocity_field().learned_null:
            raise UserError("sweep=guidance needs the unconditional model, which conditioning.p_uncond=0 never trained")
        if not list(cfg.sweep.get("guidance_scales") or []):
            raise UserError("sweep.guidance_scales is empty; give at least one scale, e.g. [0, 1, 2]")
    return EvaluationRun(key, run, evaluator, kind, sweep_samplers(cfg.sweep))


def preflight_evaluation(cfg: DictConfig, args: list[str]) -> None:
    """Before Hydra creates the run dir: the checkpoint, the evaluation and the output dir, checked in one line."""
    from fmlab.cli import check_writable, run_dir_override

    built = build_evaluation(cfg)
    _built[built.key] = built
    check_writable(run_dir_override(args) or Path(str(cfg.paths.log_dir)), "hydra.run.dir")
