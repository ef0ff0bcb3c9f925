"""Architectures (standardization inside the model) and datasets on their quantization grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from certlib.data import every_kth, load_cifar10, load_dataset, load_digits, verify_md5
from certlib.models import ARCHITECTURES, Standardize, build_model


@pytest.mark.parametrize(
    "arch,shape",
    [("wrn40_2", (3, 32, 32)), ("resnet110", (3, 32, 32)), ("small_cnn", (1, 8, 8)), ("resnet50", (3, 64, 64))],
)
def test_architectures_standardize_first(arch, shape):
    model = build_model(arch, 10, [0.5] * shape[0], [0.25] * shape[0], shape)
    assert isinstance(model[0], Standardize)
    with torch.no_grad():
        assert model(torch.rand(2, *shape)).shape == (2, 10)
    # Standardize is exactly (x - mean)/std: the inner network sees standardized pixels.
    x = torch.rand(1, *shape)
    torch.testing.assert_close(model[0](x), (x - 0.5) / 0.25)
    assert set(ARCHITECTURES) == {"wrn40_2", "resnet110", "resnet50", "small_cnn"}


def test_wrn40_2_and_resnet110_sizes():
    wrn = build_model("wrn40_2", 10, [0.5] * 3, [0.25] * 3, (3, 32, 32))
    resnet = build_model("resnet110", 10, [0.5] * 3, [0.25] * 3, (3, 32, 32))
    # Published parameter counts: WRN-40-2 about 2.2M, ResNet-110 about 1.7M.
    assert 2.1e6 < sum(p.numel() for p in wrn.parameters()) < 2.3e6
    assert 1.6e6 < sum(p.numel() for p in resnet.parameters()) < 1.8e6
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg", 10, [0.5], [0.5], (1, 8, 8))


def test_cifar10_binary_version(cifar10_dir, dssn_paper):
    verify_md5(cifar10_dir)
    test = load_cifar10(cifar10_dir, "test")
    assert len(test) == 10_000 and test.q == 255 and test.values.dtype == torch.uint8
    assert test.input_shape == (3, 32, 32) and test.class_names[3] == "cat"
    # The official order: labels agree with the authors' per-image file for every test index.
    labels = dssn_paper[
        (dssn_paper.method == "dssn") & (dssn_paper.sigma == 0.25) & (dssn_paper.training == "standard")
    ]
    np.testing.assert_array_equal(test.labels.numpy()[labels["index"].to_numpy()], labels.label.to_numpy())
    x = test.pixels([0, 1])
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    torch.testing.assert_close(torch.round(x * 255) / 255, x)


def test_cifar10_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, "valid")


def test_digits_on_their_grid():
    test, train = load_digits("test"), load_digits("train")
    assert test.q == 16 and len(test) + len(train) == 1797 and len(test) == 360
    assert int(test.values.max()) == 16
    assert (test.indices % 5 == 0).all() and not (train.indices % 5 == 0).any()
    sub = test.subset([3, 1])
    assert sub.indices.tolist() == [15, 5]
    assert load_dataset("digits", "test").num_classes == 10
    with pytest.raises(ValueError, match="root"):
        load_dataset("cifar10")


def test_digits_are_scikit_learns_whether_read_from_its_file_or_through_it(tmp_path, monkeypatch):
    """The CSV read without importing scikit-learn gives load_digits' arrays; a file whose
    numbers differ (or that is missing) is not used: scikit-learn's loader is."""
    import importlib.machinery
    import importlib.util

    import sklearn.datasets

    import certlib.data

    bunch = sklearn.datasets.load_digits()
    expected = (bunch.images.astype(np.uint8), bunch.target.astype(np.int64))

    def refused() -> None:
        raise AssertionError("scikit-learn's loader ran")

    with monkeypatch.context() as patch:  # scikit-learn's own file: its loader is not needed
        patch.setattr(sklearn.datasets, "load_digits", refused)
        values, labels = certlib.data._digits_arrays()
    assert np.array_equal(values, expected[0]) and np.array_equal(labels, expected[1])

    original = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0]) / "datasets" / "data"
    (tmp_path / "datasets" / "data").mkdir(parents=True)
    table = np.loadtxt(original / "digits.csv.gz", delimiter=",")
    table[7, 3] += 1  # one pixel off
    np.savetxt(tmp_path / "datasets" / "data" / "digits.csv.gz", table, delimiter=",")
    for folder in (tmp_path, tmp_path / "elsewhere"):
        spec = importlib.machinery.ModuleSpec("sklearn", None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, spec=spec: spec)
        values, labels = certlib.data._digits_arrays()
        assert np.array_equal(values, expected[0]) and np.array_equal(labels, expected[1])


def test_digits_are_read_once_and_each_caller_gets_its_own_copy(monkeypatch):
    """The CSV is parsed once per process; a caller that changes its dataset in place changes
    nobody else's (the cached arrays are read-only)."""
    import certlib.data

    certlib.data._digits_read_once.cache_clear()
    reads = []
    original = certlib.data._digits_arrays
    monkeypatch.setattr(certlib.data, "_digits_arrays", lambda: reads.append(1) or original())
    first = load_digits("test")
    first.values += 1
    first.labels[:] = 0
    again, train = load_digits("test"), load_digits("train")
    assert len(reads) == 1
    assert not torch.equal(first.values, again.values) and int(again.labels.max()) == 9
    assert int(again.values.max()) == 16 and len(again) + len(train) == 1797
    with pytest.raises(ValueError, match="read-only"):
        certlib.data._digits_read_once()[0][0, 0, 0] = 1


def test_every_kth_subset():
    assert every_kth(1000, 100).tolist() == list(range(0, 1000, 100))
    assert every_kth(10, 3, 1, limit=2).tolist() == [1, 4]
    with pytest.raises(ValueError):
        every_kth(10, 0)


def test_imagenet_folder_is_read_lazily_with_every_kth(tmp_path):
    from PIL import Image

    from certlib.data import load_dataset

    for wnid in ("n01", "n02"):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (300, 260), color=(10 * i, 100, 200)).save(tmp_path / "val" / wnid / f"{i}.png")
    data = load_dataset("imagenet", "test", tmp_path, every=3)
    assert len(data) == 4 and data.indices.tolist() == [0, 3, 6, 9] and data.labels.tolist() == [0, 0, 1, 1]
    assert data.input_shape == (3, 224, 224) and data.q == 255
    x = data.pixels([1])
    assert x.shape == (1, 3, 224, 224) and float(x[0, 0, 0, 0]) == pytest.approx(30 / 255)
    assert data.subset([2]).indices.tolist() == [6]
