"""Settings that cannot mean what they say, or that make training learn nothing, end before the run dir.

Each kind is the mechanism's, not one input's: a combination of groups checked against what each part declares it
carries (`fmlab.conditioning.check_parts`), every part's numbers finite unless the part declares them infinite
(`fmlab.build.check_finite_settings`), a part's own range (C²OT's weight search, MeanFlow's weight), any exception a
part's check raises turned into one line (`fmlab.build.checking`), and the initial net's loss on held-out pairs
(`fmlab.build.check_first_loss`); then the training-health callback for what only training shows.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from fmlab.build import build_parts, check_first_loss
from fmlab.callbacks.resume import StopOnNonFiniteLoss
from fmlab.errors import UserError
from fmlab.runs import merged_overrides
from tests.conftest import cli_error

C2OT_X = ["coupling=c2ot", "conditioning=x"]
MEANFLOW = ["method=meanflow"]
# (arguments, what the one line must name)
CASES = [
    # data, conditioning, net and coupling that cannot mean what the run says (the first two, then others)
    (["conditioning=x", "data=digits", "net=unet_small"], "conditioning=x needs data that attach the x condition"),
    (["conditioning=x", "data=digits"], "data=digits provides: class"),
    (["conditioning=continuous", "conditioning.condition=y", "data=digits", "net=unet_small"], "the y condition"),
    (["conditioning=x", "data=tong_moons"], "data=tong_moons provides: class"),
    (["conditioning=continuous", "conditioning.condition=class_sign", "data=8gaussians"], "class_sign condition"),
    (["coupling=c2ot"], "needs a class or continuous condition; conditioning=none gives none"),
    (["coupling=c2ot", "data=digits", "net=unet_small"], "conditioning=none gives none"),
    (["coupling=ot", "coupling.per_class=true"], "needs a class condition; conditioning=none"),
    (["coupling=ot", "coupling.per_class=true", "conditioning=x"], "conditioning=x gives a continuous one"),
    ([*C2OT_X, "coupling.weight=inf", "coupling.target_ratio=null"], "conditioning=x gives a continuous one"),
    (["conditioning=x", "net.num_classes=3"], "a net takes one kind"),
    (["conditioning=class", "net.num_classes=0"], "was built to read none"),
    # numbers where a finite one is meant, and a part's own ranges
    (["time_sampler=u_shaped", "time_sampler.a=inf"], "time_sampler.a=inf is invalid"),
    ([*MEANFLOW, "objective.p=inf"], "objective.p=inf is invalid; it must be a finite number"),
    ([*MEANFLOW, "objective.p=1e300"], "objective.p=1e+300 is invalid; it must be a finite number within"),
    ([*MEANFLOW, "objective.p=100"], "beyond float32"),
    ([*MEANFLOW, "objective.p=20"], "keep p * |ln eps| <= 89"),
    ([*MEANFLOW, "objective.eps=inf"], "objective.eps=inf is invalid"),
    ([*MEANFLOW, "time_sampler.ratio=inf"], "time_sampler.ratio=inf is invalid"),
    ([*C2OT_X, "coupling.initial_weight=inf"], "(of its settings only weight may be inf)"),
    ([*C2OT_X, "coupling.initial_weight=0"], "coupling.initial_weight=0 must be a finite number > 0"),
    ([*C2OT_X, "coupling.initial_weight=-1"], "coupling.initial_weight=-1 must be"),
    ([*C2OT_X, "coupling.max_iterations=0"], "coupling.max_iterations=0 must be a whole number >= 1"),
    ([*C2OT_X, "coupling.max_iterations=2.5"], "coupling.max_iterations=2.5 must be a whole number"),
    ([*C2OT_X, "coupling.ratio_tolerance=0"], "coupling.ratio_tolerance=0 must lie in (0, 1)"),
    ([*C2OT_X, "coupling.ratio_tolerance=2"], "coupling.ratio_tolerance=2 must lie in (0, 1)"),
    ([*C2OT_X, "coupling.ratio_tolerance=nan"], "coupling.ratio_tolerance=nan is invalid"),
    (["coupling=sinkhorn", "coupling.reg=inf"], "coupling.reg=inf is invalid"),
    (["optimizer.lr=1e300"], "optimizer.lr=1e+300 is invalid; it must be a finite number within float32's range"),
    (["schedule=vp_linear", "schedule.beta_max=inf"], "schedule.beta_max=inf is invalid"),
    (["schedule=vp_linear", "schedule.beta_max=1e39"], "within float32's range"),
    (["conditioning=class", "conditioning.p_uncond=nan"], "conditioning.p_uncond=nan is invalid"),
    (["solver=edm_heun", "solver.s_min=nan"], "solver.s_min=nan is invalid"),
    # a part's own check that raises (issue: time_sampler.a=1e6 ended in an OverflowError traceback)
    (["time_sampler=u_shaped", "time_sampler.a=1e6"], "checking time_sampler.a=1000000.0"),
    (["time_sampler=u_shaped", "time_sampler.a=1e30"], "OverflowError"),
    (["solver=euler", "solver.num_steps=1000000000000"], "over solver.max_nfe=10000"),
    (["solver=rk4", "solver.num_steps=2501"], "takes 10004 field calls with rk4"),
    (["path.t_min=0.9999999"], "t_max - t_min >= 1e-05 (float32 times)"),
    # settings whose loss is not finite from the first step: refused on the initial net's loss
    (["schedule=ve_geometric", "schedule.sigma_max=1e30"], "training loss of the initial net on 16 held-out pairs"),
    (["schedule=ve_geometric", "schedule.sigma_max=1e38"], "held-out pairs is nan, before any step"),
]


@pytest.mark.parametrize("args, expected", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_a_setting_that_cannot_mean_what_it_says_ends_in_one_line_before_the_run_dir(
    args: list[str], expected: str, tmp_path, capsys
) -> None:
    run_dir = tmp_path / "run"
    status, out, err = cli_error("train", [*args, "logger=none", f"hydra.run.dir={run_dir}"], capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("fmlab: error: "), err[-2000:]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in out + err and not run_dir.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["solver=edm_heun", "solver.s_max=inf"],
        ["coupling=c2ot", "conditioning=class", "coupling.weight=inf", "coupling.target_ratio=null"],
    ],  # fmt: skip
    ids=["edm s_max=inf", "c2ot weight=inf"],
)
def test_an_infinity_a_part_declares_is_accepted(args: list[str], train_config) -> None:
    parts = build_parts(train_config(*args))
    assert parts.solver is not None


def test_the_first_loss_check_leaves_the_random_streams_and_the_weights_as_they_were(train_config) -> None:
    parts = build_parts(train_config("conditioning=x"))
    before = [p.detach().clone() for p in parts.module.net.parameters()]
    state = torch.random.get_rng_state()
    check_first_loss(parts.module, parts.datamodule)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(before, parts.module.net.parameters(), strict=True))


def test_a_loss_that_is_zero_on_the_initial_net_is_refused(train_config, monkeypatch) -> None:
    parts = build_parts(train_config())
    check_first_loss(parts.module, parts.datamodule)  # the real loss: positive, finite
    monkeypatch.setattr(parts.module, "_loss", lambda x0, x1, labels=None: (x1 - x1).pow(2).mean())
    with pytest.raises(UserError, match="is 0.0, before any step: the run learns nothing"):
        check_first_loss(parts.module, parts.datamodule)


class _Fixed(L.LightningModule):
    """A module whose training loss is `value(step)` times a live parameter (so Lightning steps it)."""

    def __init__(self, value) -> None:
        super().__init__()
        self.weight, self.value = nn.Parameter(torch.ones(())), value

    def training_step(self, batch, batch_idx):
        return self.weight * self.value(self.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)


def _fit(value, steps: int = 8) -> None:
    trainer = L.Trainer(max_steps=steps, callbacks=[StopOnNonFiniteLoss("objective=X()")], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(_Fixed(value))


def test_a_training_loss_that_is_exactly_zero_stops_the_run_in_one_line() -> None:
    with pytest.raises(
        UserError, match=r"exactly 0 at each of steps 1-3: the model learns nothing .*; check objective=X"
    ):
        _fit(lambda step: 0.0)
    _fit(lambda step: 0.0 if step else 1.0)  # zero after a first positive step: a loss that can reach 0 is no fault
    _fit(lambda step: 1.0 if step else 0.0)


def test_a_non_finite_loss_names_the_settings_at_the_first_step_and_the_learning_rate_later() -> None:
    with pytest.raises(UserError, match=r"at step 1, before any update \(so not the learning rate\)") as first:
        _fit(lambda step: float("inf"))
    assert "optimizer.lr" not in str(first.value)
    with pytest.raises(UserError, match="became nan at step 5; no checkpoint yet .lower optimizer.lr"):
        _fit(lambda step: float("nan") if step == 4 else 1.0)


def test_a_resumed_run_lists_each_override_once() -> None:
    saved = ["experiment=c2ot_moons_ot", "trainer.max_steps=10", "+extra=1", "seed=3"]
    merged = merged_overrides(saved, ["trainer.max_steps=20", "extra=2", "logger=none"])
    assert merged == ["experiment=c2ot_moons_ot", "trainer.max_steps=20", "+extra=2", "seed=3", "logger=none"]
    assert merged_overrides(merged, ["trainer.max_steps=20"]) == merged  # resumed again: nothing grows
