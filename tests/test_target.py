"""The target's checkpoint: trained, saved, loaded with weights_only (the service: test_service.py)."""

import pytest
import torch

from drmi_ray.models import TrainConfig, predict
from drmi_ray.target import load_classifier


def test_train_target_saves_a_checkpoint_that_loads_to_a_classifier_above_85_percent_held_out(lenet5_checkpoint, digits):
    """The session's target (conftest ``lenet5_checkpoint``) is ``train_target``'s output: its
    metadata, the checkpoint's keys and config, and the loaded model on 1,000 unseen digits."""
    path, meta, perm = lenet5_checkpoint
    images, labels = digits
    assert meta["model"] == "lenet5" and meta["n_train"] == 1000 and meta["checkpoint"] == path
    assert meta["config"] == TrainConfig(model="lenet5", lr=2e-3).to_dict()
    model = load_classifier(path)
    train_accuracy = (predict(model, images[perm[:1000]]) == labels[perm[:1000]]).mean()
    assert meta["train_accuracy"] == train_accuracy > 0.9  # measured by train_target on the saved weights
    ckpt = torch.load(path, weights_only=True)
    assert {"model", "in_channels", "num_classes", "image_size", "state_dict"} <= set(ckpt)
    assert (ckpt["model"], ckpt["in_channels"], ckpt["num_classes"], ckpt["image_size"]) == ("lenet5", 1, 10, 28)
    assert ckpt["config"] == meta["config"]
    accuracy = (predict(model, images[perm[4000:]]) == labels[perm[4000:]]).mean()
    assert accuracy > 0.85, accuracy


def test_load_refuses_pickled_objects_and_names_a_missing_file(tmp_path, lenet5_checkpoint):
    ckpt = torch.load(lenet5_checkpoint[0], weights_only=True)
    ckpt["payload"] = _Arbitrary()
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    with pytest.raises(ValueError, match="weights_only"):
        load_classifier(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_classifier(str(tmp_path / "missing.pt"))


class _Arbitrary:
    def __reduce__(self):
        return (print, ("this must never run",))
