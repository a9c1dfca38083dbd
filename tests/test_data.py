"""2D data: vectorised samplers with the published definitions, fixed held-out sets, distinct streams."""

from __future__ import annotations

import math

import pytest
import torch

from fmlab.data.toy2d import DISTRIBUTIONS, Toy2DDataModule, get_distribution
from fmlab.errors import UserError
from fmlab.seeding import seeded_generator


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_samplers_are_vectorised_and_reproducible(name: str) -> None:
    sampler = get_distribution(name)
    a = sampler(1000, torch.Generator().manual_seed(0))
    b = sampler(1000, torch.Generator().manual_seed(0))
    c = sampler(1000, torch.Generator().manual_seed(1))
    assert a.shape == (1000, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_moons_mean_matches_closed_form_of_torchcfm_definition() -> None:
    """Evenly spaced angles: outer mean (0, 2/π), inner (1, 0.5 − 2/π); offset mean 0.1; then × 3 − 1."""
    x = get_distribution("moons")(200_000, torch.Generator().manual_seed(0)).double()
    expected = torch.tensor([0.5 + 0.1, 0.25 + 0.1], dtype=torch.float64) * 3 - 1
    torch.testing.assert_close(x.mean(0), expected, atol=2e-3, rtol=0)
    assert x[:, 0].min() > -4.0 - 1e-6 and x[:, 0].max() < 3 * 2.2 - 1 + 1e-6


def test_8gaussians_variance_matches_torchcfm_definition() -> None:
    """Centres 5(cos, sin)(kπ/4) give 12.5 per coordinate; TorchCFM's covariance √0.1 adds √0.1."""
    x = get_distribution("8gaussians")(400_000, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(
        x.var(0), torch.full((2,), 12.5 + math.sqrt(0.1), dtype=torch.float64), rtol=1e-2, atol=0
    )


def test_held_out_set_is_fixed_per_seed_and_independent_of_training_stream() -> None:
    dm = Toy2DDataModule("moons", seed=3, num_eval_samples=500)
    again = Toy2DDataModule("moons", seed=3, num_eval_samples=500)
    other = Toy2DDataModule("moons", seed=4, num_eval_samples=500)
    assert torch.equal(dm.held_out(), again.held_out())
    assert not torch.equal(dm.held_out(), other.held_out())
    assert not torch.equal(dm.held_out(index=0), dm.held_out(index=1))
    x0, x1 = next(iter(dm.train_dataloader()))
    assert x1.shape == (256, 2) and x0.shape == (256, 2)
    assert not torch.equal(x1, dm.held_out(256))


def test_epochs_draw_fresh_batches_and_ranks_draw_distinct_streams() -> None:
    dm = Toy2DDataModule("8gaussians", batches_per_epoch=2, batch_size=8)
    loader = dm.train_dataloader()
    first, second = [b[1] for b in loader], [b[1] for b in loader]
    assert len(first) == 2 and not torch.equal(first[0], second[0])
    rank1 = Toy2DDataModule("8gaussians", batches_per_epoch=2, batch_size=8)
    rank1._stream.rank = 1
    assert not torch.equal(next(iter(rank1.train_dataloader()))[1], first[0])


def test_a_stream_resumed_mid_epoch_draws_the_batches_of_an_unbroken_one() -> None:
    unbroken = Toy2DDataModule("moons", batches_per_epoch=4, batch_size=8)
    loader = unbroken.train_dataloader()
    epochs = [[b[1] for b in loader] for _ in range(3)]
    flat = [b for epoch in epochs for b in epoch]
    assert [len(e) for e in epochs] == [4, 4, 4]
    resumed = Toy2DDataModule("moons", batches_per_epoch=4, batch_size=8)
    resumed.load_state_dict({"next_index": 6})  # stopped after step 6, half-way through the second epoch
    loader = resumed.train_dataloader()
    rest_of_epoch, next_epoch = [b[1] for b in loader], [b[1] for b in loader]
    assert len(rest_of_epoch) == 2 and len(next_epoch) == 4
    assert all(torch.equal(a, b) for a, b in zip(rest_of_epoch + next_epoch, flat[6:], strict=True))


def test_source_choice_gives_data_to_data_pairs() -> None:
    dm = Toy2DDataModule("moons", source="8gaussians", seed=0)
    x0, _ = next(iter(dm.train_dataloader()))
    # 8gaussians points lie near radius 5, unlike N(0, I)
    assert x0.norm(dim=1).mean() > 4.0
    assert dm.name == "8gaussians-moons"


def test_unknown_dataset_names_the_choices() -> None:
    with pytest.raises(UserError, match="data.target='nope'.*2spirals.*moons"):
        Toy2DDataModule("nope")


def test_stream_seeds_differ_by_stream_name() -> None:
    a = torch.randn(4, generator=seeded_generator(0, "held_out", 0))
    b = torch.randn(4, generator=seeded_generator(0, "train", 0))
    assert not torch.equal(a, b)
