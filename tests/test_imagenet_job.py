"""jobs/imagenet.py and jobs/cifar10.py end to end on small generated pools (local Ray).

The ImageFolder is made here from the bundled real digits, saved as JPEGs in class folders, with
a corrupt and a truncated file among them: both must be listed in ``skipped`` with a reason and
the job must still select exactly K readable images.
"""

import importlib.util
import io
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_CLASS = 30


def load_job(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "jobs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def imagenet():
    return load_job("imagenet")


def jpeg_bytes(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, digits):
    """300 JPEG digits in 10 class folders + one corrupt and one truncated JPEG."""
    images, labels = digits
    root = tmp_path_factory.mktemp("imagefolder")
    for c in range(10):
        (root / f"class{c}").mkdir()
        for i in np.flatnonzero(labels == c)[:PER_CLASS]:
            (root / f"class{c}" / f"{i:05d}.jpg").write_bytes(jpeg_bytes(images[i]))
    (root / "class3" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    good = jpeg_bytes(images[0])
    (root / "class7" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "README.txt").write_text("not an image: ignored by the listing")
    return root


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_partitions_and_proportional_budgets(imagenet):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100, 12, 12), dtype=np.uint8)
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    pool = imagenet.DecodedPool.from_arrays(images, labels, [f"img{i}" for i in range(100)], ["cat", "dog", "a/b"])
    keys, parts = imagenet.partition_pool(pool, "label")
    assert [p.name for p in parts] == ["0000-cat", "0001-dog", "0002-a_b"]
    assert [len(p.members) for p in parts] == [50, 30, 20]
    from drmi_ray.optimize import partition_budgets

    assert partition_budgets(keys, 10) == {0: 5, 1: 3, 2: 2}
    keys, parts = imagenet.partition_pool(pool, "kmeans", clusters=4)
    assert len(parts) == 4 and sum(len(p.members) for p in parts) == 100
    keys, parts = imagenet.partition_pool(pool, "none")
    assert len(parts) == 1 and (keys == 0).all()


def test_listing_batches_stay_within_a_class(imagenet, image_folder):
    listing = imagenet.list_pool(str(image_folder), batch_files=7)
    assert listing.kind == "folder" and listing.n_files == 10 * PER_CLASS + 2
    for labels in listing.labels:
        assert len(set(labels.tolist())) == 1 and len(labels) <= 7


def test_imagenet_job_end_to_end(ray_local, imagenet, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", str(image_folder), "--budget", "40", "--out", str(out), "--size", "20",
            "--tile-size", "16", "--batch-files", "64", "--parallel-partitions", "2"]
    assert imagenet.main(argv) == 0
    printed = capsys.readouterr().out
    assert "decode:" in printed and "MI: 10/10 partitions" in printed and "select:" in printed and "corrupt.jpg" in printed

    sel = read_json(out / "selection.json")
    assert len(sel["selected"]) == 40 == len(set(sel["selected"]))
    assert all(os.path.exists(p.removeprefix("file://")) for p in sel["selected"])
    skipped = {os.path.basename(s["path"]): s["reason"] for s in sel["skipped"]}
    assert set(skipped) == {"corrupt.jpg", "truncated.jpg"}
    assert all("not a readable image" in r for r in skipped.values())
    assert not any(os.path.basename(p) in skipped for p in sel["selected"])
    assert sel["n_files"] == 10 * PER_CLASS + 2 and sel["n_images"] == 10 * PER_CLASS

    # per-class partitions, budgets proportional to size (30 each -> 4 each), chosen inside the class
    parts = sel["partitions"]
    assert len(parts) == 10 and [p["budget"] for p in parts] == [4] * 10
    assert [p["selected"] for p in parts] == [4] * 10
    for c in range(10):
        assert sum(f"/class{c}/" in p for p in sel["selected"]) == 4
    for p in parts:  # every partition has its own tile store and manifest
        assert p["store"] and os.path.exists(p["manifest"].removeprefix("file://"))
    assert len(sel["manifests"]) == 10

    # a rerun into the same folder resumes from the tile stores and gives the same selection
    assert imagenet.main(argv) == 0
    assert read_json(out / "selection.json")["selected"] == sel["selected"]


def test_parquet_shards_unlabeled_kmeans(ray_local, imagenet, digits, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, _ = digits
    root = tmp_path / "shards"
    root.mkdir()
    for shard in range(3):
        rows = [jpeg_bytes(images[i]) for i in range(shard * 40, shard * 40 + 40)]
        if shard == 1:
            rows[5] = b"garbage"
        pq.write_table(pa.table({"image": rows}), root / f"part-{shard}.parquet")
    out = tmp_path / "run"
    rc = imagenet.main(["--data", str(root), "--budget", "12", "--out", str(out), "--size", "16",
                        "--partition", "kmeans", "--clusters", "3", "--tile-size", "32"])
    assert rc == 0
    sel = read_json(out / "selection.json")
    assert len(sel["selected"]) == 12 == len(set(sel["selected"]))
    assert [s["path"].rsplit("/", 1)[-1] for s in sel["skipped"]] == ["part-1.parquet#5"]
    assert sel["n_images"] == 119 and sel["partition"] == "kmeans"
    assert len(sel["partitions"]) == 3 and sum(p["budget"] for p in sel["partitions"]) == 12


def test_label_partition_needs_labels(ray_local, imagenet, digits, tmp_path, capsys):
    images, _ = digits
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(12):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes(images[i]))
    rc = imagenet.main(["--data", str(root), "--budget", "4", "--out", str(tmp_path / "run"), "--size", "16"])
    assert rc == 2
    assert "no labels" in capsys.readouterr().err
    rc = imagenet.main(["--data", str(root), "--budget", "4", "--out", str(tmp_path / "run2"), "--size", "16",
                        "--partition", "none"])
    assert rc == 0 and len(read_json(tmp_path / "run2" / "selection.json")["selected"]) == 4


def test_large_partition_uses_optimizer_actors(ray_local, imagenet, image_folder, tmp_path, capsys):
    """A partition above --dense-max is selected by select_distributed reading its tile store."""
    out = tmp_path / "run"
    rc = imagenet.main(["--data", str(image_folder), "--budget", "10", "--out", str(out), "--size", "12",
                        "--partition", "none", "--dense-max", "100", "--num-actors", "2", "--tile-size", "64"])
    assert rc == 0
    assert "optimizer actors" in capsys.readouterr().out
    sel = read_json(out / "selection.json")
    assert len(sel["selected"]) == 10 and sel["partitions"][0]["size"] == 300


def test_bad_arguments_are_clear(ray_local, imagenet, image_folder, tmp_path, capsys):
    assert imagenet.main(["--data", str(tmp_path / "missing"), "--budget", "4", "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert imagenet.main(["--data", str(image_folder), "--budget", "100000", "--out", str(tmp_path / "r"),
                          "--size", "8"]) == 2
    assert "larger than the pool" in capsys.readouterr().err


@pytest.fixture(scope="module")
def target_ckpt(digits, tmp_path_factory):
    from drmi_ray.models import TrainConfig
    from drmi_ray.target import train_target

    images, labels = digits
    ckpt = str(tmp_path_factory.mktemp("target") / "target.pt")
    pick = np.random.default_rng(1).choice(len(images), 600, replace=False)  # the digits are sorted by class
    train_target(images[pick], labels[pick], ckpt, config=TrainConfig(model="lenet5", epochs=1, min_steps=60))
    return ckpt


def attack_argv(image_folder, out, ckpt, substitute):
    return ["--data", str(image_folder), "--budget", "20", "--out", str(out), "--size", "20",
            "--tile-size", "16", "--target", ckpt, "--substitute", substitute,
            "--epochs", "1", "--min-steps", "4", "--test-size", "40", "--pgd-steps", "3",
            "--train-workers", "0"]  # Train V2 local mode: real Ray Train workers are tested in test_substitute


def test_optional_attack_stage(ray_local, imagenet, image_folder, target_ckpt, tmp_path):
    """--target: query the target actor with the selection, fit a substitute, attack; a rerun
    reuses the saved answers and never asks the target again."""
    out = tmp_path / "run"
    argv = attack_argv(image_folder, out, target_ckpt, "lenet5")
    assert imagenet.main(argv) == 0
    (row,) = read_json(out / "results.json")
    assert row["queries"] == 20 and row["budget"] == 20 and row["substitute"] == "lenet5"
    for metric in ("accuracy", "fidelity", "transfer_rate"):
        assert 0.0 <= row[metric] <= 1.0
    audit = [json.loads(line) for line in open(out / "target-audit.jsonl")]
    assert sum(r["n"] for r in audit if r["accepted"]) == 20
    assert os.path.exists(out / "report.md")

    # a rerun reuses the saved answers: the target is not asked (or charged) again
    assert imagenet.main(argv) == 0
    assert [json.loads(line) for line in open(out / "target-audit.jsonl")] == audit
    assert read_json(out / "results.json")[0]["queries"] == 20


@pytest.mark.heavy
@pytest.mark.parametrize("substitute", ["resnet18", "inception_v3"])
def test_optional_attack_stage_torchvision_substitutes(ray_local, imagenet, image_folder, target_ckpt,
                                                       tmp_path, substitute):
    """The torchvision substitutes (random init) through the same path (≈ 1.5 min each on 2 cores)."""
    out = tmp_path / "run"
    assert imagenet.main(attack_argv(image_folder, out, target_ckpt, substitute)) == 0
    (row,) = read_json(out / "results.json")
    assert row["queries"] == 20 and row["substitute"] == substitute


def test_cifar10_job_on_a_stand_in_pool(ray_local, monkeypatch, tmp_path):
    """jobs/cifar10.py with torchvision's loader replaced by 120 colour images (no download here)."""
    import drmi_ray.data as data

    rng = np.random.default_rng(0)
    fake = data.Pool(rng.integers(0, 256, (120, 32, 32, 3), dtype=np.uint8), np.repeat(np.arange(4), 30),
                     classes=["a", "b", "c", "d"])
    monkeypatch.setattr(data, "torchvision_pool", lambda name, root, train=True, download=False: fake)
    cifar10 = load_job("cifar10")
    out = tmp_path / "run"
    assert cifar10.main(["--root", str(tmp_path), "--budget", "8", "--out", str(out), "--tile-size", "16",
                         "--pool-size", "100"]) == 0
    sel = read_json(out / "selection.json")
    assert len(sel["selected"]) == 8 and all(p.startswith("cifar10/train/") for p in sel["selected"])
    assert sel["mode"] == "RGB" and sel["n_images"] == 100


def test_cifar10_job_without_data_is_a_clear_error(ray_local, tmp_path, capsys):
    cifar10 = load_job("cifar10")
    assert cifar10.main(["--root", str(tmp_path / "nothing"), "--budget", "8", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--download" in err or "download=True" in err
