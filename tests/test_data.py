import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from drmi_ray.data import bundled_mnist, split_indices
from drmi_ray.pools import load_pool


def test_bundled_mnist_is_real_digits(digits):
    images, labels = digits
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    # real digits: dark background, bright strokes, most pixels zero
    assert 0.7 < (images == 0).mean() < 0.9 and images.max() == 255


def test_splits_are_disjoint_and_deterministic():
    a = split_indices(5000, target_train=2000, pool=2000, test=1000, seed=3)
    b = split_indices(5000, target_train=2000, pool=2000, test=1000, seed=3)
    c = split_indices(5000, target_train=2000, pool=2000, test=1000, seed=4)
    every = np.concatenate([a.target_train, a.pool, a.test])
    assert len(np.unique(every)) == 5000
    assert all(np.array_equal(x, y) for x, y in zip(vars(a).values(), vars(b).values()))
    assert not np.array_equal(a.pool, c.pool)
    with pytest.raises(ValueError, match="need 5001 images but the pool has 5000"):
        split_indices(5000, target_train=2000, pool=2000, test=1001)
    with pytest.raises(ValueError, match="at least one image"):
        split_indices(10, target_train=0, pool=5, test=5)


def test_bundled_protocol_pool_is_in_random_order_not_class_order():
    # The bundled digits are stored sorted by label: a sorted split would make every method's
    # query stream reach the target class by class.
    _, labels = bundled_mnist()
    assert (np.diff(labels) == 0).mean() > 0.99  # the file's own order is by class
    pool_labels = labels[split_indices(5000, target_train=2000, pool=2000, test=1000, seed=0).pool]
    assert len(np.unique(pool_labels[:50])) == 10
    assert (np.diff(pool_labels) == 0).mean() < 0.15  # about 1 in 10 neighbours share a class


def write_folder(root, digits, n=12, corrupt=True):
    images, labels = digits
    for i in range(n):
        folder = root / f"class{labels[i * 400]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i * 400]).save(folder / f"img{i:03d}.png")
    if corrupt:
        (root / "class0" / "broken.png").write_bytes(b"\x89PNG not really an image")
    return root


def test_image_folder_reads_real_pngs_and_names_the_corrupt_file(ray_local, tmp_path, digits):
    root = write_folder(tmp_path / "tree", digits)
    with pytest.raises(ValueError, match=r"broken\.png.*on_error='skip'"):
        load_pool(str(root))
    pool = load_pool(str(root), on_error="skip")
    assert len(pool) == 12 and len(pool.skipped) == 1 and pool.skipped[0]["path"].endswith("broken.png")
    first = [p.endswith("img000.png") for p in pool.paths].index(True)
    assert np.array_equal(pool.images[first], digits[0][0])  # PNG is lossless: pixels survive exactly
    assert pool.classes[pool.labels[first]] == f"class{digits[1][0]}"
    Image.new("1", (15000, 15000)).save(root / "class0" / "bomb.png")  # 225 M pixels: PIL's bomb error
    with pytest.raises(ValueError, match=r"bomb\.png: not a readable image \(decompression bomb"):
        load_pool(str(root))
    (root / "class0" / "bomb.png").unlink()
    resized = load_pool(str(root), size=14, on_error="skip")
    assert resized.images.shape == (12, 14, 14)
    # the same tree through an fsspec URL
    assert len(load_pool(f"file://{root}", on_error="skip")) == 12


def test_parquet_shards_read_in_order_and_a_junk_row_is_named_or_skipped(ray_local, tmp_path, digits):
    import io

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    images, labels = digits
    (tmp_path / "shards").mkdir()
    for shard in range(2):
        rows = range(shard * 5, shard * 5 + 5)
        pq.write_table(pa.table({"image": [png(images[i * 300]) for i in rows],
                                 "label": [int(labels[i * 300]) for i in rows]}),
                       tmp_path / "shards" / f"part-{shard}.parquet")
    pool = load_pool(str(tmp_path / "shards"))
    assert pool.images.shape == (10, 28, 28)
    assert np.array_equal(pool.images, images[np.arange(10) * 300])
    assert np.array_equal(pool.labels, labels[np.arange(10) * 300])
    pq.write_table(pa.table({"image": [b"junk"], "label": [1]}), tmp_path / "shards" / "part-2.parquet")
    with pytest.raises(ValueError, match="part-2.parquet#0"):
        load_pool(str(tmp_path / "shards"))
    assert len(load_pool(str(tmp_path / "shards"), on_error="skip").skipped) == 1


def write_idx(path, array):
    kind = 0x0803 if array.ndim == 3 else 0x0801
    with open(path, "wb") as f:
        f.write(struct.pack(">I", kind) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_torchvision_mnist_reads_local_idx_files_and_asks_for_download_without_them(tmp_path, digits):
    images, labels = digits
    with pytest.raises(FileNotFoundError, match="download"):
        load_pool(f"mnist:{tmp_path}")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", images[:300])
    write_idx(raw / "train-labels-idx1-ubyte", labels[:300])
    write_idx(raw / "t10k-images-idx3-ubyte", images[300:400])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[300:400])
    train = load_pool(f"mnist:{tmp_path}")
    test = load_pool(f"mnist-test:{tmp_path}")
    assert np.array_equal(train.images, images[:300]) and np.array_equal(train.labels, labels[:300])
    assert np.array_equal(test.images, images[300:400])


def test_a_missing_pool_path_is_a_file_not_found_error_listing_the_known_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="bundled-mnist"):
        load_pool(str(tmp_path / "nowhere"))


def test_paper_mnist_protocol_keeps_target_and_attacker_apart(tmp_path, digits):
    import dataclasses

    from drmi_ray.config import ExperimentConfig
    from drmi_ray.experiment import apply_protocol
    from drmi_ray.pools import load_data

    images, labels = digits
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", images[:3000])
    write_idx(raw / "train-labels-idx1-ubyte", labels[:3000])
    write_idx(raw / "t10k-images-idx3-ubyte", images[3000:])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[3000:])
    config = apply_protocol(ExperimentConfig(), "paper-mnist", str(tmp_path))
    assert config.pool.source == f"mnist:{tmp_path}" and config.pool.target_train == 60000
    config.pool = dataclasses.replace(config.pool, pool=1200, test=800)
    data = load_data(config.pool)
    assert len(data.target_images) == 3000  # the whole training set (smaller than 60k here)
    assert len(data.pool) == 1200 and len(data.test_images) == 800
    # the attacker's pool and the test split come from the held-out set, disjoint from each other
    held_out = {img.tobytes() for img in images[3000:]}
    pool_keys = {img.tobytes() for img in data.pool}
    assert pool_keys <= held_out and not pool_keys & {img.tobytes() for img in data.test_images}
    config.pool = dataclasses.replace(config.pool, pool=1500, test=600)
    with pytest.raises(ValueError, match="exceed the 2000 held-out images"):
        load_data(config.pool)
