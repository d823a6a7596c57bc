"""The tiled MI matrix on real Ray: equal to pairwise_mi, tile edges, resume, refused manifests."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from drmi_ray.matrix import compute_mi_matrix
from drmi_ray.mi import pairwise_mi
from drmi_ray.tiles import TileStore, tile_grid


def tile_files(store):
    folder = os.path.join(store, "tiles")
    return {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}


def test_tiles_equal_pairwise_mi_and_read_back(ray_local, digits, tmp_path):
    images = digits[0][:70]  # 70 = 2 full tiles of 32 + a ragged one of 6
    store = compute_mi_matrix(images, str(tmp_path / "s"), tile_size=32, progress=False)
    dense = pairwise_mi(images)
    assert store.complete and store.n == 70 and store.bins == 256 and store.color == "flatten"
    assert store.computed == tile_grid(70, 32) and len(store.computed) == 6
    assert np.array_equal(store.to_dense(), dense)  # float64 store: bit-identical
    rows = [69, 0, 33, 31, 64]
    assert np.array_equal(store.read_rows(rows), dense[rows])
    assert np.array_equal(store.read_block([65, 2], [1, 40, 69, 2]), dense[np.ix_([65, 2], [1, 40, 69, 2])])
    reopened = TileStore(str(tmp_path / "s"))
    assert reopened.read_rows([5]).shape == (1, 70) and reopened.dtype == np.float64


@pytest.mark.parametrize("n,tile_size", [(2, 1), (2, 2), (20, 64), (9, 4)])
def test_ragged_and_single_tiles_give_the_dense_matrix(ray_local, digits, tmp_path, n, tile_size):
    images = digits[0][200:200 + n]
    store = compute_mi_matrix(images, str(tmp_path / "s"), tile_size=tile_size, progress=False)
    assert len(store.computed) == len(tile_grid(n, tile_size))
    assert np.array_equal(store.to_dense(), pairwise_mi(images))


def test_float32_luminance_store_equals_pairwise_mi_cast_to_float32(ray_local, rng, tmp_path):
    rgb = rng.integers(0, 256, size=(23, 8, 8, 3), dtype=np.uint8)
    store = compute_mi_matrix(rgb, str(tmp_path / "s"), tile_size=10, color="luminance", bins=64,
                              dtype="float32", progress=False)
    assert store.dtype == np.float32 and store.read_rows([0]).dtype == np.float32
    assert np.array_equal(store.to_dense(), pairwise_mi(rgb, color="luminance", bins=64).astype(np.float32))


def test_resume_recomputes_only_missing_tiles(ray_local, digits, tmp_path):
    images, url = digits[0][:70], str(tmp_path / "s")
    compute_mi_matrix(images, url, tile_size=32, progress=False)
    before = tile_files(url)
    for name in ("tile-00000-00002.parquet", "tile-00001-00001.parquet"):
        os.remove(os.path.join(url, "tiles", name))
    # what a crash mid-write leaves: a temporary file, never a final tile name
    with open(os.path.join(url, "tiles", ".tmp-00002-00002-dead.parquet"), "wb") as f:
        f.write(b"PAR1 half a tile")
    partial = TileStore(url)
    assert not partial.complete and partial.missing_tiles() == [(0, 2), (1, 1)]
    with pytest.raises(FileNotFoundError, match="incomplete.*rerun compute_mi_matrix"):
        partial.read_rows([40])
    store = compute_mi_matrix(images, url, tile_size=32, progress=False)
    assert store.computed == [(0, 2), (1, 1)]
    assert store.stats["tiles_skipped"] == 4
    after = tile_files(url)
    untouched = {k: v for k, v in before.items() if k not in ("tile-00000-00002.parquet", "tile-00001-00001.parquet")}
    assert all(after[k] == v for k, v in untouched.items())  # finished tiles were not rewritten
    assert np.array_equal(store.to_dense(), pairwise_mi(images))
    assert compute_mi_matrix(images, url, tile_size=32, progress=False).computed == []


def test_stray_files_in_tiles_are_ignored_not_fatal(ray_local, digits, tmp_path):
    images, url = digits[0][:40], str(tmp_path / "s")
    compute_mi_matrix(images, url, tile_size=32, progress=False)
    tiles = os.path.join(url, "tiles")
    os.remove(os.path.join(tiles, "tile-00000-00001.parquet"))
    # a copy a user made, junk named like a tile, a tile name in another spelling
    for stray in ("tile-00000-00000-copy.parquet", "tile-abc-def.parquet", "tile-0-1.parquet"):
        with open(os.path.join(tiles, stray), "wb") as f:
            f.write(b"not a tile")
    assert TileStore(url).missing_tiles() == [(0, 1)]
    store = compute_mi_matrix(images, url, tile_size=32, progress=False)
    assert store.computed == [(0, 1)]
    assert np.array_equal(store.to_dense(), pairwise_mi(images))
    assert compute_mi_matrix(images, url, tile_size=32, progress=False).computed == []


@pytest.mark.heavy
def test_interrupted_job_resumes(ray_local, digits, tmp_path):
    """Ctrl-C a real job mid-way (its own process and Ray), then finish it here (20 s idle, 2 min loaded)."""
    url = str(tmp_path / "s")
    script = textwrap.dedent(f"""
        import ray
        from drmi_ray.data import bundled_mnist
        from drmi_ray.matrix import compute_mi_matrix
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        compute_mi_matrix(bundled_mnist()[0][:2000], {url!r}, tile_size=50, max_in_flight=1, progress=False)
    """)
    job = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tiles = os.path.join(url, "tiles")
    deadline = time.time() + 120
    def finished_tiles():  # final names only: a .tmp file is a tile still being written
        return [f for f in os.listdir(tiles) if f.startswith("tile-")] if os.path.isdir(tiles) else []

    while time.time() < deadline and not finished_tiles():
        time.sleep(0.2)
    job.send_signal(signal.SIGINT)
    job.wait(timeout=60)
    assert job.returncode != 0  # it was stopped, not finished
    missing = TileStore(url).missing_tiles()
    assert 0 < len(missing) < len(tile_grid(2000, 50))  # 820 tiles, one at a time: it cannot be done yet
    images = digits[0][:2000]
    store = compute_mi_matrix(images, url, tile_size=50, progress=False)
    assert store.computed == missing
    assert np.array_equal(store.read_rows([0, 1999]), pairwise_mi(images[[0, 1999]], images))


@pytest.mark.parametrize("change", ["bins", "color", "tile_size", "dtype", "pool"])
def test_store_of_other_settings_or_pool_is_refused(ray_local, digits, tmp_path, change):
    images, url = digits[0][:12], str(tmp_path / "s")
    compute_mi_matrix(images, url, tile_size=8, progress=False)
    kwargs = {"tile_size": 8, "progress": False}
    if change == "pool":
        images = images.copy()
        images[5, 14, 14] ^= 1  # one pixel differs
    else:
        kwargs.update({"bins": {"bins": 64}, "color": {"color": "luminance"}, "tile_size": {"tile_size": 4},
                       "dtype": {"dtype": "float32"}}[change])
    with pytest.raises(ValueError, match=f"another pool or other settings.*{change}"):
        compute_mi_matrix(images, url, **kwargs)
    assert len(os.listdir(os.path.join(url, "tiles"))) == 3  # nothing mixed in


def test_gpu_tasks_schedule_and_fall_back_to_cpu(digits, tmp_path):
    """gpus_per_tile on a Ray with (fake) GPUs: tasks get a GPU id; without CUDA they use numba."""
    import ray

    ray.shutdown()  # the shared local Ray has no GPUs; the next ray_local user starts it again
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        images = digits[0][:50]
        store = compute_mi_matrix(images, str(tmp_path / "s"), tile_size=20, gpus_per_tile=1, progress=False)
        assert len(store.computed) == 6
        assert np.array_equal(store.to_dense(), pairwise_mi(images))
    finally:
        ray.shutdown()


def test_missing_store_absent_gpus_float_images_and_rows_out_of_range_are_refused(ray_local, digits, tmp_path):
    with pytest.raises(FileNotFoundError, match="no MI tile store"):
        TileStore(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="gpus_per_tile=1 but the Ray cluster has 0"):
        compute_mi_matrix(digits[0][:4], str(tmp_path / "g"), gpus_per_tile=1, progress=False)
    with pytest.raises(TypeError, match="images must be uint8"):
        compute_mi_matrix(digits[0][:4].astype(float), str(tmp_path / "f"), progress=False)
    store = compute_mi_matrix(digits[0][:4], str(tmp_path / "ok"), progress=False)
    with pytest.raises(IndexError, match=r"0\.\.3"):
        store.read_rows([4])


def test_small_stores_in_one_call_are_the_stores_compute_mi_matrix_writes(ray_local, digits, tmp_path):
    from drmi_ray.matrix import compute_small_stores

    images, other = digits[0][:30], digits[0][30:50]
    whole = compute_mi_matrix(images, str(tmp_path / "a"), tile_size=32, progress=False)
    b, c = str(tmp_path / "b"), str(tmp_path / "c")
    assert compute_small_stores([(images, b), (other, c)], tile_size=32) == [30 * 29 // 2, 20 * 19 // 2]
    np.testing.assert_array_equal(TileStore(b).to_dense(), whole.to_dense())
    assert TileStore(b).manifest == whole.manifest
    np.testing.assert_array_equal(TileStore(c).to_dense(), pairwise_mi(other))
    assert compute_small_stores([(images, b)], tile_size=32) == [0]  # already there: nothing recomputed
    with pytest.raises(ValueError, match="do not fit one tile of 32"):
        compute_small_stores([(digits[0][:40], str(tmp_path / "d"))], tile_size=32)


# ----------------------------------------------------------------------------------------------
# Integrity: self-describing tiles, atomic manifest, concurrent drivers


def test_manifest_deleted_then_other_bins_is_refused_never_mixed(ray_local, digits, tmp_path):
    images, url = digits[0][:20], str(tmp_path / "s")
    compute_mi_matrix(images, url, tile_size=8, progress=False)
    os.remove(os.path.join(url, "manifest.json"))
    assert compute_mi_matrix(images, url, tile_size=8, progress=False).computed == []  # same settings: kept
    os.remove(os.path.join(url, "manifest.json"))
    with pytest.raises(ValueError, match=r"no manifest.json but its tiles/ holds 6 tiles of another pool") as e:
        compute_mi_matrix(images, url, tile_size=8, bins=16, progress=False)
    assert "\n" not in str(e.value) and not os.path.exists(os.path.join(url, "manifest.json"))
    for f in os.listdir(os.path.join(url, "tiles")):  # what the message says to do
        os.remove(os.path.join(url, "tiles", f))
    store = compute_mi_matrix(images, url, tile_size=8, bins=16, progress=False)
    assert store.computed == tile_grid(20, 8) and store.bins == 16
    assert np.array_equal(store.to_dense(), pairwise_mi(images, bins=16))


def test_truncated_and_emptied_tiles_are_named_then_repaired(ray_local, digits, tmp_path, caplog):
    images, url = digits[0][:70], str(tmp_path / "s")
    compute_mi_matrix(images, url, tile_size=32, progress=False)
    truncated, emptied = (os.path.join(url, "tiles", f"tile-{t}.parquet") for t in ("00000-00001", "00001-00002"))
    size = os.path.getsize(truncated)
    os.truncate(truncated, size // 2)
    open(emptied, "wb").close()
    assert os.path.getsize(truncated) == size // 2 and os.path.getsize(emptied) == 0
    store = TileStore(url)
    with pytest.raises(ValueError, match=r"tile-00000-00001\.parquet .*bad: unreadable.*rerun compute_mi_matrix"):
        store.read_rows([0])
    with pytest.raises(ValueError, match=r"tile-00001-00002\.parquet .*bad: unreadable"):
        store.read_tile(1, 2)
    store = compute_mi_matrix(images, url, tile_size=32, progress=False)
    assert store.computed == [(0, 1), (1, 2)] and store.stats["tiles_repaired"] == 2
    assert "repaired 2 tiles" in caplog.text  # a warning on the "drmi" logger
    assert np.array_equal(store.to_dense(), pairwise_mi(images))
    assert compute_mi_matrix(images, url, tile_size=32, progress=False).stats["tiles_repaired"] == 0


def test_corrupted_page_is_caught_by_checksum_and_repaired_with_check_data(ray_local, digits, tmp_path):
    images, url = digits[0][:40], str(tmp_path / "s")
    compute_mi_matrix(images, url, tile_size=32, progress=False)
    path = os.path.join(url, "tiles", "tile-00000-00000.parquet")
    with open(path, "r+b") as f:  # flip bytes inside the data page: the footer stays sound
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match=r"tile-00000-00000\.parquet .*(checksum|CRC)"):
        TileStore(url).read_tile(0, 0)
    assert compute_mi_matrix(images, url, tile_size=32, progress=False).computed == []  # footer check: cheap
    store = compute_mi_matrix(images, url, tile_size=32, progress=False, check_data=True)
    assert store.computed == [(0, 0)] and store.stats["tiles_repaired"] == 1
    assert np.array_equal(store.to_dense(), pairwise_mi(images))


def test_tile_from_another_store_is_recomputed(ray_local, digits, tmp_path):
    import shutil

    from drmi_ray.matrix import compute_small_stores

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    images = digits[0][:20]
    compute_mi_matrix(images, a, tile_size=8, progress=False)
    compute_mi_matrix(digits[0][20:40], b, tile_size=8, progress=False)
    name = "tile-00000-00001.parquet"
    shutil.copy(os.path.join(b, "tiles", name), os.path.join(a, "tiles", name))  # same shape, other pool
    with pytest.raises(ValueError, match=f"{name} .*another store"):
        TileStore(a).read_tile(0, 1)
    store = compute_mi_matrix(images, a, tile_size=8, progress=False)
    assert store.computed == [(0, 1)] and store.stats["tiles_repaired"] == 1
    assert np.array_equal(store.to_dense(), pairwise_mi(images))
    # the one-tile stores are checked the same way
    c, d = str(tmp_path / "c"), str(tmp_path / "d")
    assert compute_small_stores([(images[:8], c), (images[8:16], d)], tile_size=8) == [28, 28]
    shutil.copy(os.path.join(d, "tiles", "tile-00000-00000.parquet"), os.path.join(c, "tiles", "tile-00000-00000.parquet"))
    assert compute_small_stores([(images[:8], c), (images[8:16], d)], tile_size=8) == [28, 0]
    assert np.array_equal(TileStore(c).to_dense(), pairwise_mi(images[:8]))


def test_truncated_manifest_is_one_line_naming_it(ray_local, digits, tmp_path):
    images, url = digits[0][:10], str(tmp_path / "s")
    compute_mi_matrix(images, url, tile_size=8, progress=False)
    path = os.path.join(url, "manifest.json")
    os.truncate(path, os.path.getsize(path) // 2)
    for call in (lambda: TileStore(url), lambda: compute_mi_matrix(images, url, tile_size=8, progress=False)):
        with pytest.raises(ValueError, match=r"manifest\.json is unreadable.*delete it and rerun") as e:
            call()
        assert path in str(e.value) and "\n" not in str(e.value)
    assert not [f for f in os.listdir(url) if f.endswith(".tmp")]  # no temporary manifest left behind


def test_two_drivers_on_one_store_share_the_work(ray_local, digits, tmp_path):
    """Two compute_mi_matrix calls (two threads: two drivers, each with its own claim owner) at once."""
    import threading

    images, url = digits[0][:300], str(tmp_path / "s")
    results, errors = [None, None], []
    barrier = threading.Barrier(2)

    def driver(k):
        try:
            barrier.wait()
            results[k] = compute_mi_matrix(images, url, tile_size=15, max_in_flight=4, progress=False)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=driver, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    a, b = results[0].computed, results[1].computed
    assert a and b  # both drivers computed tiles: they really ran at the same time
    assert not set(a) & set(b) and sorted(a + b) == tile_grid(300, 15)  # shared, none computed twice
    assert results[0].stats["tiles_by_other_drivers"] + results[1].stats["tiles_by_other_drivers"] > 0
    assert not [f for f in os.listdir(os.path.join(url, "tiles")) if not f.startswith("tile-")]  # claims gone
    assert np.array_equal(TileStore(url).to_dense(), pairwise_mi(images))


def test_claims_of_dead_or_stale_drivers_are_taken_over(ray_local, digits, tmp_path):
    import json
    import socket

    images, url = digits[0][:20], str(tmp_path / "s")
    os.makedirs(os.path.join(url, "tiles"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claims = {"00000-00000": {"owner": "x", "host": socket.gethostname(), "pid": dead.pid, "time": time.time()},
              "00000-00001": {"owner": "y", "host": "elsewhere", "pid": 1, "time": time.time() - 5}}
    for name, claim in claims.items():
        with open(os.path.join(url, "tiles", f".claim-{name}"), "w") as f:
            json.dump(claim, f)
    start = time.time()
    store = compute_mi_matrix(images, url, tile_size=8, progress=False, claim_timeout_s=8)
    assert store.computed == tile_grid(20, 8) and time.time() - start >= 2.5  # waited for the live claim
    assert np.array_equal(store.to_dense(), pairwise_mi(images))
