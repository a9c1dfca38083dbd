"""Seeds for named random streams: every random draw fmlab makes for data, evaluation and training steps comes from a
generator seeded by (run seed, stream name, indices), so it does not depend on how many draws came before it (exact
resume, the same evaluation under any number of processes)."""

from __future__ import annotations

import numpy as np
import torch


def stream_seed(seed: int, stream: str, *index: int) -> int:
    """A 63-bit seed for one named random stream, independent across (seed, stream, index...)."""
    words = [int(seed) & 0xFFFFFFFF, *[ord(c) for c in stream], *[int(i) for i in index]]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def seeded_generator(seed: int, stream: str, *index: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, stream, *index))
