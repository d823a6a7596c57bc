"""The target's checkpoint: trained, saved, loaded with weights_only (the service: test_service.py)."""

import numpy as np
import pytest
import torch

from drmi_ray.models import TrainConfig, predict
from drmi_ray.target import load_classifier, train_target


@pytest.fixture(scope="module")
def split(digits):
    images, labels = digits
    perm = np.random.default_rng(0).permutation(len(images))
    return images[perm[:1000]], labels[perm[:1000]], images[perm[4000:]], labels[perm[4000:]]


@pytest.fixture(scope="module")
def checkpoint(split, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("target") / "target.pt")
    meta = train_target(split[0], split[1], path, config=TrainConfig(model="lenet5", lr=2e-3))
    return path, meta


def test_train_target_saves_a_loadable_checkpoint(checkpoint, split):
    path, meta = checkpoint
    assert meta["model"] == "lenet5" and meta["n_train"] == 1000
    assert meta["train_accuracy"] > 0.9
    ckpt = torch.load(path, weights_only=True)
    assert {"model", "in_channels", "num_classes", "image_size", "state_dict"} <= set(ckpt)
    model = load_classifier(path)
    accuracy = (predict(model, split[2]) == split[3]).mean()
    assert accuracy > 0.85, accuracy


def test_load_refuses_pickled_objects(tmp_path, checkpoint):
    ckpt = torch.load(checkpoint[0], weights_only=True)
    ckpt["payload"] = _Arbitrary()
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    with pytest.raises(ValueError, match="weights_only"):
        load_classifier(str(bad))
    with pytest.raises(FileNotFoundError):
        load_classifier(str(tmp_path / "missing.pt"))


class _Arbitrary:
    def __reduce__(self):
        return (print, ("this must never run",))
