"""Reflow: the rectified flows of Gaussian data in closed form, straightness and path energy against exact fields,
stored pairs that resume without duplicates, the k-step time grid, and reflow of a trained I-CFM teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from fmlab.errors import UserError
from fmlab.metrics.distances import straightness
from fmlab.nets import MLP
from fmlab.objectives import VelocityField, VelocityObjective
from fmlab.paths import AffinePath, CondOT, Linear, MarginalOracle
from fmlab.paths.time_samplers import GridTime
from fmlab.reflow.datamodule import StoredPairStream
from fmlab.reflow.pairs import generate_pairs, load_pairs
from fmlab.samplers import ODESolver, path_energy, sample
from tests.conftest import run_cli

MU = torch.tensor([2.0, -1.0], dtype=torch.float64)
SCALE = 0.5  # data N(μ, s² I)


class GaussianDataField(nn.Module):
    """The exact marginal FM velocity from N(0, I) to N(μ, s² I) on the linear path (α = t, σ = 1 − t):
    p_t = N(α μ, c_t I) with c_t = α² s² + σ², v = α̇ E[x1 | x] + σ̇ E[ε | x], E[ε | x] = σ (x − α μ)/c_t and
    E[x1 | x] = μ + α s² (x − α μ)/c_t.
    Its flow (the 1-rectified flow) maps x0 to μ + s x0 along x_t = t μ + √((1 − t)² + t² s²) x0: curved paths."""

    def __init__(self, path: AffinePath) -> None:
        super().__init__()
        self.path = path
        self.register_buffer("anchor", torch.zeros((), dtype=torch.float64))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        schedule = self.path.schedule
        t = t.to(x.dtype).reshape(-1, 1)
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        spread = alpha**2 * SCALE**2 + sigma**2
        centred = x - alpha * MU
        return schedule.d_alpha(t) * (MU + alpha * SCALE**2 * centred / spread) + schedule.d_sigma(t) * sigma * (
            centred / spread
        )


def closed_form_straightness_of_the_1_rectified_flow(dim: int = 2) -> float:
    """S = E‖x0‖² ∫₀¹ (ṡ_t − (s − 1))² dt with s_t = √((1 − t)² + t² s²), by a fine trapezoid rule."""
    t = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    s_t_dot = (t * SCALE**2 - (1 - t)) / torch.sqrt((1 - t) ** 2 + t**2 * SCALE**2)
    return dim * float(torch.trapezoid((s_t_dot - (SCALE - 1)) ** 2, t))


def test_path_energy_and_straightness_of_the_exact_conditional_ot_field_are_closed_form() -> None:
    # one data point x1*: the conditional OT field moves x0 straight to x1* at constant speed x1* − (1 − σ_min) x0
    sigma_min = 1e-2
    path = AffinePath(CondOT(sigma_min=sigma_min))
    target = torch.tensor([[3.0, -2.0]], dtype=torch.float64)
    field = VelocityField(MarginalOracle(path, target), VelocityObjective(), path)
    x0 = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = path_energy(field, x0, ODESolver("dopri5", atol=1e-9, rtol=1e-9))
    expected = (target - (1 - sigma_min) * x0).pow(2).sum(1)
    torch.testing.assert_close(result.energy, expected, rtol=1e-6, atol=1e-6)
    displacement = (result.samples - result.start).pow(2).sum(1)
    assert abs(straightness(result.energy, displacement)) < 1e-5


def test_the_1_rectified_flow_of_gaussians_is_the_ot_map_but_its_paths_curve_as_the_closed_form_says() -> None:
    path = AffinePath(Linear())
    field = VelocityField(GaussianDataField(path), VelocityObjective(), path)
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = path_energy(field, x0, ODESolver("dopri5", atol=1e-9, rtol=1e-9))
    torch.testing.assert_close(result.samples, MU + SCALE * x0, rtol=1e-5, atol=1e-5)  # the OT map x ↦ μ + s x
    displacement = (result.samples - result.start).pow(2).sum(1)
    measured = straightness(result.energy, displacement)
    # per trajectory S_i = ‖x0_i‖² ∫(ṡ − (s − 1))², so the sample estimate carries only the spread of ‖x0‖²
    exact = closed_form_straightness_of_the_1_rectified_flow() * float(x0.pow(2).sum(1).mean()) / 2
    assert measured == pytest.approx(exact, rel=1e-4)
    assert measured > 0.1


class GaussianSource:
    """A minimal EvaluationData: N(0, I) sources fixed per chunk."""

    name, data_shape, is_image, source, seed = "gaussian", (2,), False, "gaussian", 0

    def eval_source(self, n: int | None = None, draw: int = 0, chunk: int = 0, start: int = 0) -> Tensor:
        generator = torch.Generator().manual_seed(10_000 * draw + chunk)
        return torch.randn(n or 100, 2, generator=generator, dtype=torch.float64)


def test_the_2_rectified_flow_trained_on_the_pairs_is_straight_and_one_euler_step_lands_on_the_data(
    tmp_path: Path,
) -> None:
    path = AffinePath(Linear())
    teacher = VelocityField(GaussianDataField(path), VelocityObjective(), path)
    generate_pairs(teacher, GaussianSource(), ODESolver("dopri5", atol=1e-7, rtol=1e-7), 4096, 1024, tmp_path)
    x0, x1 = load_pairs(tmp_path, GaussianSource())
    torch.manual_seed(0)
    student = MLP((2,), width=32, depth=2, activation="silu").double()
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    objective, stream = VelocityObjective(), StoredPairStream(256, seed=0)
    stream.set_pairs(x0, x1)
    for step in range(1500):
        batch0, batch1 = stream.batch(step)
        t = torch.rand(len(batch0), dtype=torch.float64)
        loss = objective.loss(student, path, t, batch0, batch1, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    field = VelocityField(student, VelocityObjective(), path)
    fresh = torch.randn(4000, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        result = path_energy(field, fresh, ODESolver("dopri5", atol=1e-6, rtol=1e-6))
        one_step = sample(field, fresh, ODESolver("euler", num_steps=1)).samples
    displacement = (result.samples - result.start).pow(2).sum(1)
    rectified = straightness(result.energy, displacement)
    assert rectified < 0.02 * closed_form_straightness_of_the_1_rectified_flow()
    # one Euler step reaches N(μ, s² I): mean and std within a few Monte-Carlo errors (4,000 points)
    assert (one_step.mean(0) - MU).abs().max() < 0.05
    assert (one_step.std(0) - SCALE).abs().max() < 0.03
    # and it is the teacher's own map, sample for sample
    assert (one_step - (MU + SCALE * fresh)).norm(dim=1).mean() < 0.05


class FailingAfter(nn.Module):
    """A velocity that raises once it has been called `calls` times: a generation killed half-way."""

    def __init__(self, inner: nn.Module, calls: int) -> None:
        super().__init__()
        self.inner, self.left = inner, calls

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return self.inner(t, x)


def test_stored_pairs_reload_exactly_and_a_killed_generation_resumes_without_duplicates(tmp_path: Path) -> None:
    path = AffinePath(Linear())
    exact = GaussianDataField(path)
    solver = ODESolver("rk4", num_steps=10)  # 40 net calls per chunk
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    report = generate_pairs(VelocityField(exact, VelocityObjective(), path), GaussianSource(), solver, 450, 100,
                            unbroken)  # fmt: skip
    assert report["pair_chunks_made"] == 5  # 4 full chunks and a remainder
    x0, x1 = load_pairs(unbroken, GaussianSource())
    assert x0.shape == x1.shape == (450, 2)
    torch.testing.assert_close(x0[:100], GaussianSource().eval_source(100, draw=1_000_003, chunk=0))
    direct = sample(VelocityField(exact, VelocityObjective(), path), x0[200:300], solver).samples
    torch.testing.assert_close(x1[200:300], direct)  # stored pairs are the teacher's samples of their x0
    killed = VelocityField(FailingAfter(exact, calls=40 * 2 + 7), VelocityObjective(), path)
    with pytest.raises(KeyboardInterrupt):
        generate_pairs(killed, GaussianSource(), solver, 450, 100, resumed)
    assert sorted(p.name for p in resumed.glob("chunk_*.pt")) == ["chunk_000000.pt", "chunk_000001.pt"]
    assert not list(resumed.glob(".*partial"))  # the chunk in flight left nothing behind
    with pytest.raises(UserError, match="misses 3 of its 5 chunks"):
        load_pairs(resumed, GaussianSource())
    report = generate_pairs(VelocityField(exact, VelocityObjective(), path), GaussianSource(), solver, 450, 100,
                            resumed)  # fmt: skip
    assert report["pair_chunks_made"] == 3
    y0, y1 = load_pairs(resumed, GaussianSource())
    assert torch.equal(y0, x0) and torch.equal(y1, x1)
    assert len(torch.unique(y0, dim=0)) == 450  # no pair twice
    with pytest.raises(UserError, match="holds other reflow pairs"):
        generate_pairs(VelocityField(exact, VelocityObjective(), path), GaussianSource(), solver, 900, 100, resumed)
    assert json.loads((resumed / "pairs.json").read_text())["num_pairs"] == 450


def test_stored_pair_batches_are_a_pure_function_of_the_batch_index() -> None:
    x0, x1 = torch.randn(1000, 2), torch.randn(1000, 2)
    first, second = StoredPairStream(128, seed=3), StoredPairStream(128, seed=3)
    first.set_pairs(x0, x1)
    second.set_pairs(x0, x1)
    assert first.batches_per_epoch == 7
    unbroken = [first.batch(i) for i in range(20)]
    for index in (13, 5, 19):  # any order, as a resumed run asks
        a0, a1 = second.batch(index)
        assert torch.equal(a0, unbroken[index][0]) and torch.equal(a1, unbroken[index][1])
    rows = torch.cat([unbroken[i][0] for i in range(7)])
    assert len(torch.unique(rows, dim=0)) == 7 * 128  # an epoch takes each pair at most once
    pairs = {tuple(r) for r in torch.cat([x0, x1], 1).tolist()}
    assert all(tuple(r) in pairs for r in torch.cat([unbroken[3][0], unbroken[3][1]], 1).tolist())  # kept together


def test_the_k_step_grid_sampler_draws_each_euler_time_equally_often() -> None:
    path = AffinePath(CondOT())
    torch.manual_seed(0)
    t = GridTime(k=4).sample(path, 40_000, dtype=torch.float64)
    values, counts = torch.unique(t, return_counts=True)
    torch.testing.assert_close(values, torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64))
    assert (counts.double() / 40_000 - 0.25).abs().max() < 4 * math.sqrt(0.25 * 0.75 / 40_000)
    assert torch.unique(GridTime(k=1).sample(path, 100)).tolist() == [0.0]
    with pytest.raises(UserError, match="time_sampler.k=0"):
        GridTime(k=0)


@pytest.mark.slow
def test_reflow_of_an_icfm_teacher_lowers_straightness_and_one_step_w2(tmp_path: Path) -> None:
    common = ["method=icfm", "data.source=8gaussians", "trainer.max_steps=2000", "logger=csv", "eval.num_draws=1",
              "eval.nll_samples=0"]  # fmt: skip
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    done = run_cli("fmlab.train", *common, f"hydra.run.dir={teacher}", cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    done = run_cli("fmlab.train", *common, "coupling=reflow", f"coupling.teacher={teacher}", "coupling.num_pairs=8000",
                   f"hydra.run.dir={student}", cwd=tmp_path, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    measured = {run: json.loads((run / "metrics.json").read_text()) for run in (teacher, student)}
    assert measured[student]["straightness"] < 0.5 * measured[teacher]["straightness"]
    assert measured[student]["num_pairs"] == 8000 and measured[student]["pair_generation_seconds"] > 0
    one_step = {}
    for run in (teacher, student):
        done = run_cli("fmlab.evaluate", f"ckpt_path={run}", "solver=euler", "solver.num_steps=1", "eval.num_draws=1",
                       f"hydra.run.dir={run}_euler1", cwd=tmp_path, timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        one_step[run] = json.loads(Path(f"{run}_euler1/metrics.json").read_text())["w2"]
    assert one_step[student] < 0.8 * one_step[teacher]


def test_corrupt_pairs_are_made_again_with_one_line_and_a_full_disk_stops_in_one(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    path = AffinePath(Linear())
    field = VelocityField(GaussianDataField(path), VelocityObjective(), path)
    solver = ODESolver("rk4", num_steps=4)
    good = tmp_path / "good"
    generate_pairs(field, GaussianSource(), solver, 450, 100, good)
    x0, x1 = load_pairs(good, GaussianSource(), record=True)
    assert len(json.loads((good / "pairs.json").read_text())["chunks"]) == 5  # checksums recorded once complete
    broken = tmp_path / "broken"
    generate_pairs(field, GaussianSource(), solver, 450, 100, broken)
    load_pairs(broken, GaussianSource(), record=True)
    chunk = broken / "chunk_000001.pt"
    chunk.write_bytes(chunk.read_bytes()[:100])  # truncated
    (broken / "chunk_000002.pt").write_bytes(b"\x13" * 4096)  # random bytes
    torch.save({"x0": x0[:100], "x1": x1[:100], "nfe": 0}, broken / "chunk_000003.pt")  # another chunk's pairs
    with pytest.raises(UserError, match="chunk_000001.pt does not verify"):
        load_pairs(broken, GaussianSource())
    capsys.readouterr()
    report = generate_pairs(field, GaussianSource(), solver, 450, 100, broken)
    said = [line for line in capsys.readouterr().out.splitlines() if "does not verify" in line]
    assert report["pair_chunks_made"] == 3 and len(said) == 3  # one line per chunk made again
    y0, y1 = load_pairs(broken, GaussianSource())
    assert torch.equal(y0, x0) and torch.equal(y1, x1)
    # an unreadable pairs.json cannot vouch for its chunks: they are set aside (not deleted) and made again
    (broken / "pairs.json").write_text("{not json")
    report = generate_pairs(field, GaussianSource(), solver, 450, 100, broken)
    assert report["pair_chunks_made"] == 5 and len(list((broken / "unverified-1").glob("chunk_*.pt"))) == 5
    assert torch.equal(load_pairs(broken, GaussianSource())[1], x1)
    # a full disk while writing a chunk: one line, the chunks written before kept
    import errno

    from fmlab.reflow import pairs as pairs_module

    def full_disk(target, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pairs_module, "write_tensors", full_disk)
    with pytest.raises(UserError, match=r"could not write the reflow pairs .*chunk_000000.pt \(No space left"):
        generate_pairs(field, GaussianSource(), solver, 450, 100, tmp_path / "full")
