"""`make bench`'s side-by-side measurement: the two loops run interleaved, chunk for chunk."""

from __future__ import annotations

from fmlab.bench import compare


def test_training_rows_pair_every_chunk_of_fmlab_with_a_chunk_of_the_bare_loop() -> None:
    row = compare("train step", ["trainer.log_every_n_steps=10"], steps=70, warmup=20, chunk=10)
    pairs = (70 - 20) // 10
    assert row["spread"].endswith(f"over {pairs} pairs")
    assert row["fmlab_steps"] == 70 and row["bare_steps"] == 20 + pairs * 10  # warm-up, then one chunk per chunk
    assert row["bare_ms"] > 0 and row["fmlab_ms"] > 0
    assert abs(row["ratio"] - row["fmlab_ms"] / row["bare_ms"]) < 1e-9
