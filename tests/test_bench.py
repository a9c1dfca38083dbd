"""`make bench`'s side-by-side measurement: the two loops run interleaved, chunk for chunk."""

from __future__ import annotations

import pytest
import torch
from benchmarks.bench import TimedBatches, compare, scalar_step_seconds


def test_training_rows_pair_every_chunk_of_fmlab_with_a_chunk_of_the_bare_loop() -> None:
    row = compare("train step", ["trainer.log_every_n_steps=10"], steps=70, warmup=20, chunk=10)
    pairs = (70 - 20) // 10
    assert row["spread"].endswith(f"over {pairs} pairs")
    assert row["fmlab_steps"] == 70 and row["bare_steps"] == 20 + pairs * 10  # warm-up, then one chunk per chunk
    assert row["bare_ms"] > 0 and row["fmlab_ms"] > 0
    assert abs(row["ratio"] - row["fmlab_ms"] / row["bare_ms"]) < 1e-9
    assert row["callbacks"] == 11  # every callback of the default job (evaluation ones as no-ops) + the pacing one


@pytest.mark.parametrize("callbacks", [None, 0, 3])
def test_empty_step_is_timed_from_the_warm_up_batch_to_the_last_one(callbacks: int | None) -> None:
    assert scalar_step_seconds(steps=40, warmup=10, callbacks=callbacks) > 0


def test_timing_an_unfinished_loop_is_refused() -> None:
    batches = TimedBatches(steps=10, warmup=2)
    for index, _ in enumerate(batches):
        if index == 5:
            break
    with pytest.raises(RuntimeError, match="fetched 1 of the 2 timed batches"):
        batches.seconds_per_step()


def test_torchcfm_row_pairs_fmlab_with_torchcfm_s_tutorial_loop_which_learns() -> None:
    pytest.importorskip("torchcfm", reason="the bench extra (make bench installs it)")
    from benchmarks.bench import TUTORIAL_OVERRIDES, TorchCFMLoop

    loop = TorchCFMLoop(exact_ot=True, seed=0)
    row = compare("OT-CFM vs TorchCFM", ["method=otcfm", *TUTORIAL_OVERRIDES], steps=60, warmup=20, chunk=10, bare=loop)
    assert row["spread"].endswith("over 4 pairs") and loop.steps_done == 20 + 4 * 10
    x0, x1 = loop.source(512), loop.target(512)
    t, x_t, u_t = loop.matcher.sample_location_and_conditional_flow(x0, x1)
    with torch.no_grad():
        before = (loop.model(torch.cat([x_t, t[:, None]], -1)) - u_t).pow(2).mean()
    loop.run(300)
    with torch.no_grad():
        after = (loop.model(torch.cat([x_t, t[:, None]], -1)) - u_t).pow(2).mean()
    assert after < 0.7 * before  # the loop trains: its CFM loss on a fixed batch falls
