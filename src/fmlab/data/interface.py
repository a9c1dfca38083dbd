"""What evaluation reads from a datamodule, declared instead of guessed: every datamodule fmlab ships satisfies it
(`PairStreamDataModule` gives point data the image members' defaults), and the engine reads nothing else."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class EvaluationData(Protocol):
    """Held-out data and fixed evaluation noise.

    `source` is "gaussian" for a N(0, I) source (likelihoods are defined then) or a dataset's name; `seed` seeds
    every evaluation stream (source draws, sampler noise). Image data (`is_image`) also have `num_levels`
    (quantisation levels, for bits/dim), `fid_feature` (the FID feature space) and `reference_images()` (the FID
    reference set); point data have 0, None and no reference images. `variant` says which version of the dataset
    this is, in words (the result card records it: two ImageNet-32s give different numbers).
    """

    name: str
    data_shape: tuple[int, ...]
    is_image: bool
    source: str
    seed: int
    num_levels: int
    fid_feature: str | None
    variant: str  # which version of the dataset, in words (result cards record it)

    def held_out(self, n: int | None = None, index: int = 0) -> Tensor:
        """`n` data points never trained on, fixed per `index` (images take `dequantization=k` too: the k-th
        uniform dequantisation of the same test images)."""
        ...

    def eval_source(self, n: int | None = None, draw: int = 0, chunk: int = 0, start: int = 0) -> Tensor:
        """`n` source samples to generate from, fixed per (`draw`, `chunk`); `start` is the chunk's first row in the
        draw (a finite source split takes its rows from there)."""
        ...

    def reference_images(self) -> Tensor:
        """The FID reference set (image data)."""
        ...
