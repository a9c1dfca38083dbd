"""Couplings run in the data pipeline: every coupled batch is a pure function of (seed, rank, batch index), whatever
the number of loader workers, and it is the coupling of the batch as drawn."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from torch.utils.data import DataLoader

from fmlab.couplings import IndependentCoupling, MinibatchOTCoupling, squared_distance_matrix
from fmlab.data import streams
from fmlab.data.images import DigitsDataModule
from fmlab.data.streams import loader_workers
from fmlab.data.tong2d import TongDataModule
from fmlab.data.toy2d import Toy2DDataModule
from fmlab.errors import UserError


def toy_moons() -> Toy2DDataModule:
    return Toy2DDataModule("moons", source="8gaussians", batch_size=64, batches_per_epoch=7, seed=3)


def tong_moons() -> TongDataModule:
    return TongDataModule("tong_moons", batch_size=1000, seed=3)  # 10 batches per epoch


def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=200, seed=3, with_labels=True, num_classes=10)  # 7 batches per epoch


# a coupling with random draws (pairs drawn from the plan), so the batch's generator matters
DRAWN = MinibatchOTCoupling("exact", draw_from_plan=True)
CASES = {
    "toy2d_sinkhorn": (toy_moons, MinibatchOTCoupling("sinkhorn", reg=0.5)),
    "tong2d_drawn": (tong_moons, DRAWN),
    "digits_per_class": (digits, MinibatchOTCoupling("exact", draw_from_plan=True, per_class=True)),
}


def epoch_batches(datamodule, workers: int, start: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """What the training loop gets from `start` to the end of that epoch with `workers` loader workers."""
    datamodule.num_workers = workers
    datamodule.load_state_dict({"next_index": start})  # as a resumed run's checkpoint sets it
    loader = datamodule.train_dataloader()
    assert loader.num_workers == workers
    return [tuple(t.clone() for t in batch) for batch in loader]


@pytest.mark.parametrize("case", CASES)
def test_coupled_batches_are_the_same_with_0_1_or_2_loader_workers_and_after_a_mid_epoch_resume(case: str) -> None:
    make, coupling = CASES[case]
    datamodule = make()
    datamodule.couple_with(coupling)
    stream = datamodule._stream
    expected = [stream.batch(index) for index in range(stream.batches_per_epoch)]
    for workers in (0, 1, 2):
        got = epoch_batches(datamodule, workers)
        assert len(got) == len(expected), workers
        for index, (ours, reference) in enumerate(zip(got, expected, strict=True)):
            assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True)), (workers, index)
    resumed = epoch_batches(datamodule, 2, start=3)  # batches 3.. of the epoch, in order, split over two workers
    assert len(resumed) == len(expected) - 3
    for got, reference in zip(resumed, expected[3:], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))
    # the draws from the plan come from the batch's own generator: another generator draws other pairs
    assert not torch.equal(stream.batch(0)[1], stream.coupling(*stream.draw(0), generator=torch.Generator())[1])


def test_the_loader_batch_is_the_exact_ot_coupling_of_the_batch_as_drawn() -> None:
    datamodule = toy_moons()
    datamodule.couple_with(MinibatchOTCoupling("exact"))
    x0, x1 = datamodule._stream.draw(5)
    paired_x0, paired_x1 = next(iter(loader_from(datamodule, start=5)))
    assert torch.equal(paired_x0, x0)  # exact OT of equal batches re-orders x1 only
    assert sorted(map(tuple, paired_x1.tolist())) == sorted(map(tuple, x1.tolist()))
    cost = squared_distance_matrix(x0, x1).double().numpy()
    optimal = ot.emd2(np.full(64, 1 / 64), np.full(64, 1 / 64), cost)  # mean cost of the optimal plan
    ours = (paired_x0.double() - paired_x1.double()).pow(2).sum(1).mean().item()
    assert ours == pytest.approx(optimal, rel=1e-6)  # float32 costs
    assert ours < 0.5 * (x0.double() - x1.double()).pow(2).sum(1).mean().item()


def loader_from(datamodule, start: int) -> DataLoader:
    datamodule.num_workers = 1
    datamodule.load_state_dict({"next_index": start})
    return datamodule.train_dataloader()


def test_ranks_couple_their_own_batches() -> None:
    datamodule = toy_moons()
    datamodule.couple_with(DRAWN)
    stream = datamodule._stream
    first = stream.batch(0)
    stream.shard(1, 2)
    second = stream.batch(0)
    assert not torch.equal(first[0], second[0])  # rank 1 draws its own batch 0 and couples it
    assert torch.equal(second[1], stream.coupling(*stream.draw(0), generator=_coupling_generator(stream, 0))[1])


def _coupling_generator(stream, index: int) -> torch.Generator:
    from fmlab.seeding import seeded_generator

    return seeded_generator(stream.seed, "coupling", stream.rank, index)


def test_validation_pairs_are_coupled_once_and_scored_the_same_every_time() -> None:
    datamodule = tong_moons()
    datamodule.couple_with(MinibatchOTCoupling("exact"))
    first, again = next(iter(datamodule.val_dataloader())), next(iter(datamodule.val_dataloader()))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    x0, x1 = first
    raw_x1 = datamodule.val_split
    n = len(raw_x1)
    optimal = ot.emd2(np.full(n, 1 / n), np.full(n, 1 / n), squared_distance_matrix(x0, raw_x1).double().numpy())
    assert (x0.double() - x1.double()).pow(2).sum(1).mean().item() == pytest.approx(optimal, rel=1e-6)  # float32 costs
    datamodule.couple_with(IndependentCoupling())  # another coupling: the pairs are made again
    assert torch.equal(next(iter(datamodule.val_dataloader()))[1], raw_x1)


def test_auto_workers_run_ot_beside_the_step_and_bad_counts_fail_in_one_line(monkeypatch) -> None:
    monkeypatch.setattr(streams, "available_cpus", lambda: 2)
    assert loader_workers("auto", MinibatchOTCoupling("exact")) == 1
    assert loader_workers("auto", IndependentCoupling()) == 0
    monkeypatch.setattr(streams, "available_cpus", lambda: 16)
    assert loader_workers("auto", MinibatchOTCoupling("sinkhorn")) == streams.AUTO_OT_WORKERS
    monkeypatch.setattr(streams, "available_cpus", lambda: 1)
    assert loader_workers("auto", MinibatchOTCoupling("exact")) == 0
    assert loader_workers("auto", MinibatchOTCoupling("exact"), cpus=8) == 4  # a process's share of the CPUs
    assert loader_workers(1, IndependentCoupling()) == 1
    with pytest.raises(UserError, match="data.num_workers=3 is more than the 1 CPUs this process may use"):
        loader_workers(3, IndependentCoupling())  # 1,000 workers on 2 cores took 137 s for 50 steps
    for bad in (-1, "many", 1.5, True):
        with pytest.raises(UserError, match=r"data.num_workers=.* must be auto or a whole number >= 0"):
            loader_workers(bad, IndependentCoupling())
    with pytest.raises(UserError, match="data.num_workers='two'"):
        Toy2DDataModule("moons", num_workers="two")
