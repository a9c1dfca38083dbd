"""What evaluation reads from a datamodule, declared instead of guessed: every datamodule fmlab ships satisfies it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class EvaluationData(Protocol):
    """Held-out data and fixed evaluation noise.

    `source` is "gaussian" for a N(0, I) source (likelihoods are defined then) or a dataset's name; image data also
    has `num_levels` (quantisation levels, for bits/dim), `fid_feature` and `reference_images()` (the FID reference).
    """

    name: str
    data_shape: tuple[int, ...]
    is_image: bool
    source: str

    def held_out(self, n: int | None = None, index: int = 0) -> Tensor:
        """`n` data points never trained on, fixed per `index`."""
        ...

    def eval_source(self, n: int | None = None, draw: int = 0, chunk: int = 0, start: int = 0) -> Tensor:
        """`n` source samples to generate from, fixed per (`draw`, `chunk`); `start` is the chunk's first row in the
        draw (a finite source split takes its rows from there)."""
        ...
