"""Reflow pairs (Liu et al. 2023): (x0, x1 = ODE_teacher(x0)) generated once, stored next to the teacher run, and
read back by the student's datamodule. No Lightning here.

The pairs are cut into fixed chunks like evaluation: chunk i holds the source points of `eval_source(draw=REFLOW_DRAW,
chunk=i)` and the teacher's samples from them, is computed by rank i mod world and written whole (temp file +
rename) as `chunk_<i>.pt`. A killed generation resumes by computing only the missing chunks, so no pair is made
twice and the pairs do not depend on the number of processes. `pairs.json` records what made them (pairs made by
another teacher, solver or size are never mixed in) and, once every chunk exists, each chunk's SHA-256.

A chunk is reused only when it verifies: it loads, has its rows, finite samples, the source points its index
fixes, and (once recorded) its checksum. A chunk that does not is made again, with one line saying so; an unreadable
pairs.json moves the chunks it described aside (nothing is deleted) and the pairs are made again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fmlab.data.interface import EvaluationData
from fmlab.distributed import Ranks, chunk_sizes
from fmlab.errors import UserError
from fmlab.io import write_json, write_tensors
from fmlab.objectives import VelocityField
from fmlab.samplers import Sampler, SolverError, sample
from fmlab.seeding import stream_seed

# the source draw the pairs are made from: far from evaluation's draws 0, 1, ... so they never share noise
REFLOW_DRAW = 1_000_003
MANIFEST = "pairs.json"


def say(line: str) -> None:
    print(f"fmlab: reflow: {line}", flush=True)


def chunk_file(pairs_dir: Path, chunk: int) -> Path:
    return pairs_dir / f"chunk_{chunk:06d}.pt"


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(pairs_dir: Path) -> dict[str, Any] | None:
    """pairs.json, or None when it is missing or unreadable."""
    try:
        manifest = json.loads((pairs_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def set_aside(pairs_dir: Path) -> Path:
    """Move pairs.json and every chunk of `pairs_dir` into a new `unverified-<n>` folder inside it."""
    number = 1
    while (pairs_dir / f"unverified-{number}").exists():
        number += 1
    aside = pairs_dir / f"unverified-{number}"
    aside.mkdir()
    for path in [pairs_dir / MANIFEST, *pairs_dir.glob("chunk_*.pt")]:
        if path.exists():
            path.rename(aside / path.name)
    return aside


def check_manifest(pairs_dir: Path, description: dict[str, Any]) -> None:
    """Write the manifest of a new pairs dir, or check an existing one describes the same pairs. An unreadable one
    (a truncated or foreign pairs.json) cannot vouch for its chunks: they are set aside and made again."""
    path = pairs_dir / MANIFEST
    if path.exists():
        stored = read_manifest(pairs_dir)
        if stored is None:
            say(f"{path} is unreadable; its chunks were moved to {set_aside(pairs_dir)} and the pairs are made again")
        else:
            differing = {k: (stored.get(k), v) for k, v in description.items() if stored.get(k) != v}
            if differing:
                detail = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differing.items())
                raise UserError(f"{pairs_dir} holds other reflow pairs ({detail}); choose another coupling.pairs_dir")
            return
    pairs_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, description)


def load_chunk(pairs_dir: Path, chunk: int, expected_source: Tensor, digest: str | None) -> dict[str, Tensor] | None:
    """A stored chunk that verifies (see the module docstring), or None."""
    path = chunk_file(pairs_dir, chunk)
    if not path.is_file() or (digest is not None and file_digest(path) != digest):
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        x0, x1 = stored["x0"], stored["x1"]
    except Exception:  # truncated, random bytes, another format: made again
        return None
    if x0.shape != expected_source.shape or x1.shape != x0.shape or not bool(torch.isfinite(x1).all()):
        return None
    return stored if torch.equal(x0, expected_source) else None


def generate_pairs(
    field: VelocityField,
    datamodule: EvaluationData,
    solver: Sampler,
    num_pairs: int,
    batch_size: int,
    pairs_dir: str | Path,
    ranks: Ranks | None = None,
    manifest: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Make this rank's chunks of `num_pairs` pairs in `pairs_dir` (chunks rank, rank + world, ...) that are missing
    or do not verify. Returns the seconds spent and the chunks made here; the caller waits for every rank, then
    calls `load_pairs`."""
    ranks = ranks or Ranks()
    pairs_dir = Path(pairs_dir)
    description = {"num_pairs": num_pairs, "batch_size": batch_size, "solver": repr(solver), **(manifest or {})}
    teacher = (manifest or {}).get("teacher", "the teacher")
    if ranks.rank == 0:
        check_manifest(pairs_dir, description)
    solver.check_path(field.path)
    sizes = chunk_sizes(num_pairs, batch_size)
    digests = (read_manifest(pairs_dir) or {}).get("chunks", {})
    started, made = time.perf_counter(), 0
    device = field.device
    was_training = field.training
    field.eval()
    try:
        for chunk in ranks.chunks(len(sizes)):
            x0 = datamodule.eval_source(sizes[chunk], draw=REFLOW_DRAW, chunk=chunk, start=sum(sizes[:chunk]))
            target = chunk_file(pairs_dir, chunk)
            if load_chunk(pairs_dir, chunk, x0, digests.get(target.name)) is not None:
                continue
            if target.exists():
                say(f"{target} does not verify (truncated, foreign or corrupt); making it again")
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(stream_seed(datamodule.seed, "reflow_noise", chunk))
                try:
                    result = sample(field, x0.to(device), solver)
                except SolverError as failure:
                    raise UserError(
                        f"the reflow teacher {teacher} could not generate chunk {chunk}: {failure}"
                    ) from None
            if not torch.isfinite(result.samples).all():
                raise UserError(
                    f"the reflow teacher {teacher} generated non-finite samples in chunk {chunk} (a diverged "
                    "teacher); check its metrics.json, or choose another coupling.teacher"
                )
            try:
                pairs_dir.mkdir(parents=True, exist_ok=True)
                write_tensors(target, {"x0": x0.cpu(), "x1": result.samples.cpu(), "nfe": result.nfe})
            except OSError as error:
                raise UserError(
                    f"could not write the reflow pairs {target} ({error.strerror or error}); the chunks written before "
                    "are kept: free some space (or give a writable coupling.pairs_dir) and resume"
                ) from None
            made += 1
    finally:
        field.train(was_training)
    return {"pair_generation_seconds": time.perf_counter() - started, "pair_chunks_made": made}


def load_pairs(pairs_dir: str | Path, datamodule: EvaluationData, record: bool = False) -> tuple[Tensor, Tensor]:
    """(x0, x1): every chunk of a complete pairs dir, in chunk order, each verified. `record=True` (one process)
    writes the chunks' checksums into pairs.json, so a later run checks them before reusing a chunk."""
    pairs_dir = Path(pairs_dir)
    manifest = read_manifest(pairs_dir)
    if manifest is None:
        raise UserError(f"{pairs_dir} holds no readable reflow pairs ({MANIFEST} is missing or broken)")
    sizes = chunk_sizes(manifest["num_pairs"], manifest["batch_size"])
    missing = [i for i in range(len(sizes)) if not chunk_file(pairs_dir, i).exists()]
    if missing:
        raise UserError(f"{pairs_dir} misses {len(missing)} of its {len(sizes)} chunks (first: {missing[0]})")
    chunks = []
    for chunk, size in enumerate(sizes):
        x0 = datamodule.eval_source(size, draw=REFLOW_DRAW, chunk=chunk, start=sum(sizes[:chunk]))
        stored = load_chunk(pairs_dir, chunk, x0, None)
        if stored is None:
            raise UserError(f"{chunk_file(pairs_dir, chunk)} does not verify (truncated, foreign or corrupt); rerun")
        chunks.append(stored)
    if record and "chunks" not in manifest:
        digests = {chunk_file(pairs_dir, i).name: file_digest(chunk_file(pairs_dir, i)) for i in range(len(sizes))}
        write_json(pairs_dir / MANIFEST, {**manifest, "chunks": digests})
    return torch.cat([c["x0"] for c in chunks]), torch.cat([c["x1"] for c in chunks])
