"""Train the digits FID feature classifier and overwrite its committed weights:

    python scripts/train_digits_classifier.py [--epochs 60] [--seed 0] [--output PATH]

It trains on the digits training split only (fresh dequantisation noise every batch) and prints the accuracy on the
360 test images at their bin centres, which the weights file records (a test checks it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from fmlab.data.images import DigitsDataModule, bin_centers, dequantize
from fmlab.metrics.digits_classifier import WEIGHTS_PATH, DigitsClassifier, accuracy


def train_classifier(epochs: int = 60, batch_size: int = 64, lr: float = 1e-3, seed: int = 0):
    """Train on the digits training split (fresh dequantisation noise every batch); returns (model, test accuracy)
    with the test images at their bin centres."""
    torch.manual_seed(seed)
    data = DigitsDataModule()
    (train_labels, test_labels), levels = data.labels(), data.num_levels
    model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(data.train_levels))
        for batch in order.split(batch_size):
            k = data.train_levels[batch]
            x = dequantize(k, levels, torch.rand(k.shape))
            loss = nn.functional.cross_entropy(model(x), train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model, accuracy(model, bin_centers(data.test_levels, levels), test_labels)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the digits FID feature classifier and save its weights.")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=WEIGHTS_PATH)
    args = parser.parse_args()
    model, test_accuracy = train_classifier(epochs=args.epochs, seed=args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "test_accuracy": test_accuracy}, args.output)
    print(f"digits classifier: test accuracy {test_accuracy:.4f} (360 held-out images); weights -> {args.output}")


if __name__ == "__main__":
    main()
