"""Offline image sets: Fashion-MNIST from Debian's package, scikit-learn's digits."""

import pytest
import torch

from common.data.images import load_digits, load_fashion_mnist, load_image_set, resize


def test_fashion_mnist_splits_and_labels():
    test = load_fashion_mnist("test")
    assert test.images.shape == (10_000, 28, 28) and test.images.dtype == torch.uint8
    assert sorted(test.labels.unique().tolist()) == list(range(10))
    assert len(test.class_names) == 10


def test_digits_split_is_seeded_and_disjoint_in_size():
    train, test = load_digits("train"), load_digits("test")
    assert len(train) + len(test) == 1797 and int(test.images.max()) == 255
    assert torch.equal(load_digits("test").labels, test.labels)


def test_resize_and_subset():
    images = load_digits("test").subset(5, seed=1).images
    x = resize(images, 16)
    assert x.shape == (5, 1, 16, 16) and 0 <= x.min() and x.max() <= 1


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(root=tmp_path)
    with pytest.raises(ValueError, match="unknown image set 'cifar'"):
        load_image_set("cifar")
