"""FID through torchmetrics: the digits feature extractor, torch-fidelity's InceptionV3 from a weights file, the
reference cache, and the offline error."""

from __future__ import annotations

import urllib.error
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception

from fmlab.data.images import DigitsDataModule, bin_centers
from fmlab.errors import UserError
from fmlab.metrics.digits_classifier import DigitsFeatures, accuracy
from fmlab.metrics.fid import build_fid, inception_cache_path, reference_statistics


def fid_of(metric, prepare, real, fake) -> float:
    metric.reset()
    metric.real_features_sum.zero_()
    metric.real_features_cov_sum.zero_()
    metric.real_features_num_samples.zero_()
    metric.update(prepare(real), real=True)
    metric.update(prepare(fake), real=False)
    return float(metric.compute())


def noised(images: torch.Tensor, level: float, seed: int = 0) -> torch.Tensor:
    return (images + level * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


def test_committed_digits_classifier_has_the_accuracy_it_records() -> None:
    features = DigitsFeatures()
    data = DigitsDataModule()
    _, test_labels = data.labels()
    measured = accuracy(features.classifier, bin_centers(data.test_levels, data.num_levels), test_labels)
    assert measured == pytest.approx(features.test_accuracy, abs=1e-6)
    assert measured > 0.97


def test_digits_fid_is_zero_on_the_same_set_and_grows_with_noise() -> None:
    metric, prepare = build_fid("digits")
    images = DigitsDataModule().reference_images()
    assert fid_of(metric, prepare, images, images) == pytest.approx(0.0, abs=1e-6)
    values = [fid_of(metric, prepare, images, noised(images, level)) for level in (0.1, 0.3, 0.6)]
    assert values[0] > 0.1 and values == sorted(values)
    # another draw of the same distribution (the test split) is closer than strongly noised training images
    test_images = bin_centers(DigitsDataModule().test_levels, 17)
    assert fid_of(metric, prepare, images, test_images) < values[2]


def write_random_inception_weights(target: Path) -> Path:
    """torch-fidelity's InceptionV3 at random init, saved in the format its loader reads (a state dict)."""
    with (
        mock.patch.object(fidelity_inception.FeatureExtractorInceptionV3, "load_state_dict"),
        mock.patch.object(fidelity_inception, "load_state_dict_from_url", return_value=None),
    ):
        torch.manual_seed(0)
        net = fidelity_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), target)
    return target


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth")


def test_inception_fid_from_a_weights_file_is_zero_on_the_same_set_and_monotone_in_noise(inception_weights) -> None:
    metric, prepare = build_fid("inception", weights_path=str(inception_weights), inception_dims=64)
    assert metric.inception.features_list == ["64"]
    images = DigitsDataModule().reference_images()[:24]
    assert prepare(images).dtype == torch.uint8 and prepare(images).shape == (24, 3, 8, 8)
    assert fid_of(metric, prepare, images, images) == pytest.approx(0.0, abs=1e-6)
    values = [fid_of(metric, prepare, images, noised(images, level)) for level in (0.2, 0.5, 1.0)]
    assert values[0] > 0 and values == sorted(values)


@pytest.mark.slow
def test_inception_2048_features_through_the_full_network(inception_weights) -> None:
    # random weights make the pooled features tiny, so only the shape and the dependence on the input are checked
    metric, prepare = build_fid("inception", weights_path=str(inception_weights), inception_dims=2048)
    images = DigitsDataModule().reference_images()[:6]
    features = metric.inception(prepare(images))
    assert features.shape == (6, 2048) and torch.isfinite(features).all()
    assert not torch.equal(features[0], features[1])


def test_missing_inception_weights_say_where_to_put_the_file(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    offline = mock.Mock(side_effect=urllib.error.URLError("no network"))
    monkeypatch.setattr(fidelity_inception, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as error:
        build_fid("inception")
    message = str(error.value)
    assert str(inception_cache_path()) in message and str(tmp_path) in message
    assert "eval.fid.weights_path" in message and "\n" not in message
    with pytest.raises(UserError, match="eval.fid.weights_path=.*does not exist"):
        build_fid("inception", weights_path=str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="eval.fid.feature='clip'.*digits, inception"):
        build_fid("clip")


def test_reference_statistics_are_cached_and_read_back(tmp_path: Path) -> None:
    metric, prepare = build_fid("digits")
    images = DigitsDataModule().reference_images()
    first = reference_statistics(metric, prepare, images, tmp_path, "digits")
    (cache,) = tmp_path.glob("digits-*.pt")
    with mock.patch.object(metric, "update", side_effect=AssertionError("recomputed")):
        second = reference_statistics(metric, prepare, images, tmp_path, "digits")
    assert int(first["real_features_num_samples"]) == len(images)
    for name, value in first.items():
        assert torch.equal(value, second[name]) and torch.equal(getattr(metric, name).cpu(), value)
    assert cache.name.endswith(f"-{len(images)}.pt")


def test_fid_agrees_with_torch_fidelity_on_the_same_image_folders(inception_weights, tmp_path: Path) -> None:
    import torch_fidelity
    from PIL import Image

    from fmlab.metrics.fid import to_inception_input

    real_images = DigitsDataModule().reference_images()[:80]  # more images than the 64 features: full-rank
    fake_images = torch.rand(real_images.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1  # uniform noise
    folders = {"real": to_inception_input(real_images), "fake": to_inception_input(fake_images)}
    for name, pixels in folders.items():  # the two folders torch-fidelity reads: 8x8 RGB PNGs
        (tmp_path / name).mkdir()
        for i, image in enumerate(pixels):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / name / f"{i:04d}.png")
    metric, prepare = build_fid("inception", weights_path=str(inception_weights), inception_dims=64)
    ours = fid_of(metric, lambda x: x, folders["real"], folders["fake"])  # the same uint8 pixels as the files
    theirs = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "fake"), input2=str(tmp_path / "real"), fid=True, feature_layer_fid="64",
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(inception_weights),
        cuda=False, cache=False, verbose=False,
    )["frechet_inception_distance"]  # fmt: skip
    assert ours > 0 and ours == pytest.approx(theirs, rel=1e-3)


def write_image_folders(tmp_path: Path, real_images: torch.Tensor, fake_images: torch.Tensor) -> dict[str, Path]:
    """The uint8 RGB PNG folders torch-fidelity reads, holding exactly the pixels fmlab's extractor sees."""
    from PIL import Image

    from fmlab.metrics.fid import to_inception_input

    folders = {}
    for name, images in {"real": real_images, "fake": fake_images}.items():
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for i, image in enumerate(to_inception_input(images)):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folders[name] / f"{i:04d}.png")
    return folders


def digits_and_noise(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    real = DigitsDataModule().reference_images()[:n]
    # integer levels survive the PNG round trip exactly
    fake = torch.randint(0, 256, real.shape, generator=torch.Generator().manual_seed(1)) / 127.5 - 1
    return real, fake


@pytest.mark.slow  # keeps `make test` inside its 10 minutes; `make test-all` runs it
def test_kid_and_precision_recall_agree_with_torch_fidelity_on_the_same_folders(inception_weights, tmp_path) -> None:
    import torch_fidelity

    from fmlab.metrics.fidelity import build_extractor, extract, fidelity_metrics

    real, fake = digits_and_noise(80)
    folders = write_image_folders(tmp_path, real, fake)
    extractor = build_extractor("inception", str(inception_weights), inception_dims=64)
    ours = fidelity_metrics(("kid", "prc"), extract(extractor, fake), extract(extractor, real)[0], kid_subset_size=50)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(folders["fake"]), input2=str(folders["real"]), kid=True, prc=True, feature_layer_kid="64",
        feature_layer_prc="64", kid_subset_size=50, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(inception_weights), cuda=False, cache=False, verbose=False,
    )  # fmt: skip
    assert ours["kid"] > 0 and ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3)
    assert (ours["precision"], ours["recall"]) == (theirs["precision"], theirs["recall"])


@pytest.mark.slow
def test_inception_score_agrees_with_torch_fidelity_through_the_full_network(inception_weights, tmp_path) -> None:
    import torch_fidelity

    from fmlab.metrics.fidelity import build_extractor, extract, fidelity_metrics

    real, fake = digits_and_noise(40)
    folders = write_image_folders(tmp_path, real, fake)
    extractor = build_extractor("inception", str(inception_weights), inception_dims=2048)
    ours = fidelity_metrics(("isc",), extract(extractor, fake), extract(extractor, real)[0])
    theirs = torch_fidelity.calculate_metrics(
        input1=str(folders["fake"]), isc=True, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(inception_weights), cuda=False, cache=False, verbose=False,
    )  # fmt: skip
    assert ours["inception_score"] == pytest.approx(theirs["inception_score_mean"], rel=1e-4)


def test_digits_features_score_a_blurred_test_set_clearly_worse_than_the_test_set() -> None:
    from torch.nn.functional import avg_pool2d

    from fmlab.metrics.fidelity import build_extractor, extract, fidelity_metrics

    data = DigitsDataModule()
    test = bin_centers(data.test_levels, 17)
    blurred = avg_pool2d(test, 3, stride=1, padding=1, count_include_pad=False)  # a 3x3 box blur
    extractor = build_extractor("digits")
    reference = extract(extractor, data.reference_images())[0]
    names = ("isc", "kid", "prc")
    sharp = fidelity_metrics(names, extract(extractor, test), reference, kid_subset_size=300)
    blurry = fidelity_metrics(names, extract(extractor, blurred), reference, kid_subset_size=300)
    assert blurry["kid"] > 5 * max(sharp["kid"], 1e-3)
    assert blurry["precision"] < sharp["precision"] - 0.2
    assert blurry["inception_score"] < sharp["inception_score"]
    assert sharp["inception_score"] > 7  # ten well-separated classes, equally represented: IS near 10
