"""The one writer: every file fmlab writes (JSON, CSV rows, figures, tensors, plain text) is written whole or not at
all, through a temp file beside the target that is flushed and renamed over it."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def write_atomically(target: str | Path, data: bytes | memoryview) -> Path:
    """Write `data` to `target` whole or not at all: a temp file beside it, flushed to disk, then renamed over it.
    On failure (a full disk) the temp file is removed and `target` keeps what it held."""
    target = Path(target)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


def write_text(target: str | Path, text: str) -> Path:
    return write_atomically(target, text.encode())


def write_json(target: str | Path, value: Any) -> Path:
    """`value` as indented JSON with sorted keys (values JSON lacks, such as paths, as their str)."""
    return write_text(target, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(target: str | Path, rows: Iterable[Mapping[str, Any]], fieldnames: list[str] | None = None) -> Path:
    """Rows of dicts as CSV with a header: `fieldnames`, else the keys of the rows in first-seen order (a row
    lacking a column leaves it empty)."""
    rows = list(rows)
    names = fieldnames or list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=names, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(target, text.getvalue())


def write_tensors(target: str | Path, value: Any) -> Path:
    """A `torch.save` file (tensors, dicts of tensors)."""
    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return write_atomically(target, buffer.getbuffer())


def save_figure(fig: Any, target: str | Path) -> Path:
    """A matplotlib figure as a PNG file written whole, then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    return write_atomically(target, image.getvalue())
