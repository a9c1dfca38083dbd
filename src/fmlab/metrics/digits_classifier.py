"""A small CNN classifier of the 8×8 digits whose penultimate layer is the feature space of the digits FID.

Inception features mean little on 8×8 greyscale images, so small-data FID uses this net instead (the same Fréchet
distance, other features). Retrain and overwrite the committed weights with

    python -m fmlab.metrics.digits_classifier

which trains on the training split only and prints the test accuracy (quoted in the README).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

WEIGHTS_PATH = Path(__file__).with_name("weights") / "digits_classifier.pt"


class DigitsClassifier(nn.Module):
    """conv(1→32) → conv(32→64) → max-pool → linear(1024→64) = features → linear(64→10) = logits.

    Takes images in [-1, 1], shape (N, 1, 8, 8), dequantised as the datamodule does.
    """

    num_features = 64

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def features(self, images: Tensor) -> Tensor:
        return self.trunk(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


class DigitsFeatures(nn.Module):
    """The FID feature extractor: the classifier's 64 penultimate activations, frozen, always in eval mode."""

    num_features = DigitsClassifier.num_features

    def __init__(self, weights_path: str | Path | None = None) -> None:
        super().__init__()
        self.classifier = DigitsClassifier()
        state = torch.load(weights_path or WEIGHTS_PATH, map_location="cpu", weights_only=True)
        self.classifier.load_state_dict(state["state_dict"])
        self.test_accuracy = float(state["test_accuracy"])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> DigitsFeatures:
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images.float())


def accuracy(model: DigitsClassifier, images: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def train_classifier(epochs: int = 60, batch_size: int = 64, lr: float = 1e-3, seed: int = 0):
    """Train on the digits training split (fresh dequantisation noise every batch); returns (model, test accuracy)
    with the test images at their bin centres."""
    from fmlab.data.images import DigitsDataModule, bin_centers, dequantize

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
