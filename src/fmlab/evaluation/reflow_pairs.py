"""Reflow pairs (Liu et al. 2023): (x0, x1 = ODE_teacher(x0)) generated once, stored next to the teacher run, and
read back by the student's datamodule. No Lightning here.

The pairs are cut into fixed chunks like evaluation: chunk i holds the source points of `eval_source(draw=REFLOW_DRAW,
chunk=i)` and the teacher's samples from them, is computed by rank i mod world and written whole (temp file +
rename) as `chunk_<i>.pt`. A killed generation resumes by computing only the missing chunks, so no pair is made
twice and the pairs do not depend on the number of processes. `pairs.json` records what made them; pairs made by
another teacher, solver or size are never mixed in.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fmlab.data.interface import EvaluationData
from fmlab.distributed import Ranks, chunk_sizes
from fmlab.errors import UserError
from fmlab.evaluation.engine import field_device
from fmlab.runs import write_atomically
from fmlab.sampling import VelocityField, sample
from fmlab.seeding import stream_seed

# the source draw the pairs are made from: far from evaluation's draws 0, 1, ... so they never share noise
REFLOW_DRAW = 1_000_003
MANIFEST = "pairs.json"


def chunk_file(pairs_dir: Path, chunk: int) -> Path:
    return pairs_dir / f"chunk_{chunk:06d}.pt"


def check_manifest(pairs_dir: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest of a new pairs dir, or check an existing one describes the same pairs."""
    path = pairs_dir / MANIFEST
    if path.exists():
        stored = json.loads(path.read_text())
        differing = {k: (stored.get(k), v) for k, v in manifest.items() if stored.get(k) != v}
        if differing:
            detail = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differing.items())
            raise UserError(f"{pairs_dir} holds other reflow pairs ({detail}); choose another coupling.pairs_dir")
        return
    pairs_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(manifest, indent=2, sort_keys=True).encode())


def generate_pairs(
    field: VelocityField,
    datamodule: EvaluationData,
    solver: Any,
    num_pairs: int,
    batch_size: int,
    pairs_dir: str | Path,
    ranks: Ranks | None = None,
    manifest: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Generate the missing chunks of `num_pairs` pairs into `pairs_dir` on this rank (chunks rank, rank + world,
    ...). Returns the seconds spent and the chunks made here; the caller waits for every rank before reading."""
    if num_pairs < 1 or batch_size < 1:
        raise UserError(f"coupling.num_pairs={num_pairs} and coupling.batch_size={batch_size} must be >= 1")
    ranks = ranks or Ranks()
    pairs_dir = Path(pairs_dir)
    description = {"num_pairs": num_pairs, "batch_size": batch_size, "solver": repr(solver), **(manifest or {})}
    if ranks.rank == 0:
        check_manifest(pairs_dir, description)
    solver.check_path(field.path)
    sizes = chunk_sizes(num_pairs, batch_size)
    started, made = time.perf_counter(), 0
    device = field_device(field)
    was_training = field.training
    field.eval()
    try:
        for chunk in ranks.chunks(len(sizes)):
            target = chunk_file(pairs_dir, chunk)
            if target.exists():
                continue
            start = sum(sizes[:chunk])
            x0 = datamodule.eval_source(sizes[chunk], draw=REFLOW_DRAW, chunk=chunk, start=start).to(device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(stream_seed(getattr(datamodule, "seed", 0), "reflow_noise", chunk))
                result = sample(field, x0, solver)
            if not torch.isfinite(result.samples).all():
                raise UserError(
                    f"the teacher produced non-finite samples in reflow chunk {chunk}; check the teacher run"
                )
            buffer = io.BytesIO()
            torch.save({"x0": x0.cpu(), "x1": result.samples.cpu(), "nfe": result.nfe}, buffer)
            pairs_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(target, buffer.getvalue())
            made += 1
    finally:
        field.train(was_training)
    return {"pair_generation_seconds": time.perf_counter() - started, "pair_chunks_made": made}


def load_pairs(pairs_dir: str | Path) -> tuple[Tensor, Tensor]:
    """(x0, x1): every chunk of a complete pairs dir, in chunk order."""
    pairs_dir = Path(pairs_dir)
    path = pairs_dir / MANIFEST
    if not path.exists():
        raise UserError(f"{pairs_dir} holds no reflow pairs ({MANIFEST} is missing)")
    manifest = json.loads(path.read_text())
    sizes = chunk_sizes(manifest["num_pairs"], manifest["batch_size"])
    missing = [i for i in range(len(sizes)) if not chunk_file(pairs_dir, i).exists()]
    if missing:
        raise UserError(f"{pairs_dir} misses {len(missing)} of its {len(sizes)} chunks (first: {missing[0]})")
    chunks = [torch.load(chunk_file(pairs_dir, i), map_location="cpu", weights_only=True) for i in range(len(sizes))]
    return torch.cat([c["x0"] for c in chunks]), torch.cat([c["x1"] for c in chunks])
