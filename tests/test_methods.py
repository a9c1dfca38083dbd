"""Every method of the harness learns on 2D data through the same module, sampler and evaluator."""

from __future__ import annotations

import pytest

from fmlab.cli import group_options
from fmlab.train import train
from tests.test_train import untrained_w2

QUICK = ["logger=none", "trainer.max_steps=1000", "data.num_eval_samples=500", "eval.num_draws=1", "eval.nll_samples=0"]


# ScoreFlow and SB-CFM (Sinkhorn every step) are the slowest here; the full-budget test below covers them too
@pytest.mark.parametrize(
    "method",
    [
        "fm_vp",
        "ddpm",
        "score_ve",
        pytest.param("scoreflow", marks=pytest.mark.slow),
        pytest.param("sbcfm", marks=pytest.mark.slow),
    ],
)
def test_method_learns_moons_well_below_untrained_w2(method: str, train_config) -> None:
    cfg = train_config(f"method={method}", *QUICK, "callbacks.sample_logger=null")
    metrics = train(cfg)
    assert metrics["method"] == method
    assert metrics["w2"] < 0.5 * untrained_w2(cfg), metrics


def test_ddpm_ancestral_sampler_evaluates_with_exactly_its_steps(train_config) -> None:
    cfg = train_config("method=ddpm", "solver=ancestral", "solver.num_steps=200", *QUICK)
    metrics = train(cfg)
    assert metrics["nfe"] == 200 and metrics["nfe_max"] == 200
    assert metrics["w2"] < 0.5 * untrained_w2(cfg), metrics


@pytest.mark.slow
@pytest.mark.parametrize("method", group_options("method"))
def test_method_at_full_default_budget_gets_near_the_floor(method: str, train_config) -> None:
    metrics = train(train_config(f"method={method}", "logger=none"))
    # VE score matching converges slowest on moons: seed 0 measured W2 0.383 = 5.1x its floor under torch 2.14.1
    # (the same number before and after the 2026-12-02 restructure); every other method within 4x
    factor = 6 if method == "score_ve" else 4
    assert metrics["w2"] < factor * metrics["w2_floor"], metrics
