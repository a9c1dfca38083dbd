"""A small CNN classifier of the 8×8 digits whose penultimate layer is the feature space of the digits FID.

Inception features mean little on 8×8 greyscale images, so small-data FID uses this net instead (the same Fréchet
distance, other features). The committed weights were trained by `scripts/train_digits_classifier.py` on the
training split only; it prints the test accuracy (quoted in the README).
"""

from __future__ import annotations

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
