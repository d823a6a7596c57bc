"""The reduction pipeline (drmi_ray/reduce.py) through its front ends `drmi reduce`,
jobs/imagenet.py and jobs/cifar10.py, on small generated pools (local Ray).

The ImageFolder is made here from the bundled real digits, saved as JPEGs in class folders, with
bad files of every kind among them (corrupt, truncated, not an image, above the pixel limit, a
real decompression bomb): each must be listed in ``skipped`` with its reason and the job must
still select exactly K readable images.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from drmi_ray import reduce
from drmi_ray.cli import main
from drmi_ray.data import Pool
from drmi_ray.ingest import list_pool, thumbnails

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_CLASS = 30


def drmi_reduce(*argv) -> int:
    return main(["reduce", *map(str, argv)])


def jpeg_bytes(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, digits):
    """300 JPEG digits in 10 class folders + one bad file of each kind."""
    from PIL import Image

    images, labels = digits
    root = tmp_path_factory.mktemp("imagefolder")
    for c in range(10):
        (root / f"class{c}").mkdir()
        for i in np.flatnonzero(labels == c)[:PER_CLASS]:
            (root / f"class{c}" / f"{i:05d}.jpg").write_bytes(jpeg_bytes(images[i]))
    (root / "class3" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    good = jpeg_bytes(images[0])
    (root / "class7" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "class1" / "notes.png").write_text("a text file with an image suffix")
    # 9000 x 9000 (81 M pixels): above the default --max-pixels (64 M), below PIL's own warning
    Image.new("1", (9000, 9000)).save(root / "class2" / "oversized.png")
    # 15000 x 15000 (225 M pixels): PIL itself refuses it as a decompression bomb
    Image.new("1", (15000, 15000)).save(root / "class5" / "bomb.png")
    (root / "README.txt").write_text("not an image: ignored by the listing")
    return root


BAD_FILES = {"corrupt.jpg": "not a readable image", "truncated.jpg": "not a readable image",
             "notes.png": "not a readable image", "oversized.png": "above the limit of 64,000,000",
             "bomb.png": "decompression bomb"}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_partition_pool_by_label_kmeans_or_none_and_budgets_follow_sizes():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100, 12, 12), dtype=np.uint8)
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    pool = Pool(images, labels, [f"img{i}" for i in range(100)], ["cat", "dog", "a/b"], thumbs=thumbnails(images))
    keys, parts = reduce.partition_pool(pool, "label")
    assert [p.name for p in parts] == ["0000-cat", "0001-dog", "0002-a_b"]
    assert [len(p.members) for p in parts] == [50, 30, 20]
    from drmi_ray.partition import partition_budgets

    assert partition_budgets(keys, 10) == {0: 5, 1: 3, 2: 2}
    keys, parts = reduce.partition_pool(pool, "kmeans", clusters=4)
    assert len(parts) == 4 and sum(len(p.members) for p in parts) == 100
    keys, parts = reduce.partition_pool(pool, "none")
    assert len(parts) == 1 and (keys == 0).all()


def test_small_partitions_share_tasks_but_every_cpu_gets_work():
    from drmi_ray.matrix import bundles

    def sizes(*ns):
        return {f"p{i}": n for i, n in enumerate(ns)}

    groups = bundles(sizes(*[30] * 1000), tile_size=1300, cpus=4)  # ImageNet-like: 1,000 small classes
    assert sorted(name for g in groups for name in g) == sorted(sizes(*[30] * 1000))  # each partition once
    assert len(groups) == 8  # 435,000 pairs in bundles of >= 435,000 / (2 * 4 CPUs)
    assert len(bundles(sizes(1000, 1000), tile_size=1300, cpus=2)) == 2  # not both in one task
    # a tile of 100 holds 5,000 pairs: two partitions of 100 (4,950 pairs each) per bundle
    assert len(bundles(sizes(*[100] * 40), tile_size=100, cpus=1)) == 20


def test_listing_cuts_the_sorted_files_into_units(image_folder):
    listing = list_pool(str(image_folder), batch_files=40, cpus=1)
    assert listing.kind == "folder" and listing.n_files == 10 * PER_CLASS + 5
    paths = [p for u in listing.units for p in u["paths"]]
    assert paths == sorted(paths) and len(paths) == listing.n_files
    assert [u["start"] for u in listing.units] == list(range(0, listing.n_files, 40))
    assert listing.classes == [f"class{c}" for c in range(10)]


def test_reduce_end_to_end_lists_every_bad_file(ray_local, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", image_folder, "--budget", 40, "--out", out, "--size", 20, "--partition", "label",
            "--tile-size", 16, "--parallel-partitions", 2]
    assert drmi_reduce(*argv) == 0
    printed = capsys.readouterr().out
    assert "MI: 10/10 partitions" in printed and "select:" in printed and "corrupt.jpg" in printed

    sel = read_json(out / "selection.json")
    assert sel["format"] == "drmi-selection" and sel["version"] == 1
    assert len(sel["selected"]) == 40 == len(set(sel["selected"]))
    assert all(os.path.exists(p.removeprefix("file://")) for p in sel["selected"])
    skipped = {os.path.basename(s["path"]): s["reason"] for s in sel["skipped"]}
    assert set(skipped) == set(BAD_FILES)
    for name, reason in BAD_FILES.items():
        assert reason in skipped[name], (name, skipped[name])
    assert "BytesIO" not in json.dumps(sel["skipped"])  # reasons name no in-memory objects
    assert not any(os.path.basename(p) in skipped for p in sel["selected"])
    assert sel["n_files"] == 10 * PER_CLASS + 5 and sel["n_images"] == 10 * PER_CLASS
    assert sel["settings"]["image_shape"] == [20, 20] and sel["stats"]["mi_pairs"] == 10 * 30 * 29 // 2

    # per-class partitions (asked for), budgets proportional to size (30 each -> 4 each), chosen inside the class
    parts = sel["partitions"]
    assert len(parts) == 10 and [p["budget"] for p in parts] == [4] * 10
    assert [p["selected"] for p in parts] == [4] * 10
    for c in range(10):
        assert sum(f"/class{c}/" in p for p in sel["selected"]) == 4
    for p in parts:  # every partition has its own tile store and manifest
        assert os.path.exists(os.path.join(p["store"].removeprefix("file://"), "manifest.json"))

    # a rerun into the same folder resumes from the tile stores and gives the same selection
    assert drmi_reduce(*argv) == 0
    assert "0 pairs/s computed" in capsys.readouterr().out
    assert read_json(out / "selection.json")["selected"] == sel["selected"]


def test_imagenet_job_and_drmi_reduce_write_the_same_selection(ray_local, image_folder, tmp_path):
    settings = ["--data", str(image_folder), "--budget", "12", "--size", "16", "--clusters", "3", "--tile-size", "64"]
    assert drmi_reduce(*settings, "--out", tmp_path / "reduce") == 0
    job = subprocess.run([sys.executable, "jobs/imagenet.py", *settings, "--out", str(tmp_path / "job")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_ADDRESS": "local"})
    assert job.returncode == 0, job.stderr[-3000:]
    by_reduce, by_job = read_json(tmp_path / "reduce" / "selection.json"), read_json(tmp_path / "job" / "selection.json")
    assert by_job["partition"] == "kmeans" == by_reduce["partition"]  # label-free by default
    assert by_job["selected"] == by_reduce["selected"] and len(by_job["selected"]) == 12
    assert by_job["skipped"] == by_reduce["skipped"]


def test_parquet_shards_without_labels_use_kmeans_by_default(ray_local, digits, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    images, _ = digits
    root = tmp_path / "shards"
    root.mkdir()
    bomb = io.BytesIO()
    Image.new("1", (15000, 15000)).save(bomb, format="PNG")  # 225 M pixels in a few kB
    for shard in range(3):  # no label column anywhere: the attacker's pool is unlabeled
        rows = [jpeg_bytes(images[i]) for i in range(shard * 40, shard * 40 + 40)]
        if shard == 1:
            rows[5], rows[6] = b"garbage", bomb.getvalue()
        pq.write_table(pa.table({"image": rows}), root / f"part-{shard}.parquet", row_group_size=16)
    out = tmp_path / "run"
    assert drmi_reduce("--data", root, "--budget", 12, "--out", out, "--size", 16, "--clusters", 3,
                       "--tile-size", 32) == 0
    sel = read_json(out / "selection.json")
    assert len(sel["selected"]) == 12 == len(set(sel["selected"]))
    assert [s["path"].rsplit("/", 1)[-1] for s in sel["skipped"]] == ["part-1.parquet#5", "part-1.parquet#6"]
    assert "decompression bomb" in sel["skipped"][1]["reason"]
    assert sel["n_images"] == 118 and sel["partition"] == "kmeans"
    assert len(sel["partitions"]) == 3 and sum(p["budget"] for p in sel["partitions"]) == 12


def test_label_partition_without_labels_exits_2_and_partition_none_selects(ray_local, digits, tmp_path, capsys):
    images, _ = digits
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(12):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes(images[i]))
    assert drmi_reduce("--data", root, "--budget", 4, "--out", tmp_path / "run", "--partition", "label") == 2
    assert "no labels" in capsys.readouterr().err
    assert drmi_reduce("--data", root, "--budget", 4, "--out", tmp_path / "run2", "--partition", "none") == 0
    assert len(read_json(tmp_path / "run2" / "selection.json")["selected"]) == 4


def test_large_partition_uses_optimizer_actors(ray_local, image_folder, tmp_path, capsys):
    """A partition above --dense-max is selected by select_distributed reading its tile store."""
    out = tmp_path / "run"
    assert drmi_reduce("--data", image_folder, "--budget", 10, "--out", out, "--size", 12, "--partition", "none",
                       "--dense-max", 100, "--num-actors", 2, "--tile-size", 64) == 0
    assert "optimizer actors" in capsys.readouterr().out
    sel = read_json(out / "selection.json")
    assert len(sel["selected"]) == 10 and sel["partitions"][0]["size"] == 300


def test_missing_data_zero_budget_and_budget_above_the_pool_exit_2_naming_the_problem(ray_local, image_folder, tmp_path, capsys):
    assert drmi_reduce("--data", tmp_path / "missing", "--budget", 4, "--out", tmp_path / "r") == 2
    assert "does not exist" in capsys.readouterr().err
    assert drmi_reduce("--data", image_folder, "--budget", 0, "--out", tmp_path / "r") == 2
    assert "budget must be a positive integer" in capsys.readouterr().err
    assert drmi_reduce("--data", image_folder, "--budget", 100000, "--out", tmp_path / "r", "--size", 8) == 2
    assert "larger than the pool" in capsys.readouterr().err


def test_mixed_sizes_without_size_is_a_clear_error(ray_local, digits, tmp_path, capsys):
    from PIL import Image

    images, _ = digits
    root = tmp_path / "mixed"
    root.mkdir()
    for i in range(6):
        Image.fromarray(images[i]).resize((28 + 4 * (i % 2),) * 2).save(root / f"{i}.png")
    assert drmi_reduce("--data", root, "--budget", 2, "--out", tmp_path / "r") == 2
    assert "pass --size" in capsys.readouterr().err


def attack_argv(image_folder, out, ckpt, substitute, port):
    return ["reduce", "--data", str(image_folder), "--budget", "20", "--out", str(out), "--size", "20",
            "--serve-port", str(port),
            "--tile-size", "16", "--target", ckpt, "--substitute", substitute,
            "--epochs", "1", "--min-steps", "4", "--test-size", "40", "--pgd-steps", "3",
            "--substitute-workers", "0"]  # Train V2 local mode: real Ray Train workers are tested in test_substitute


def test_target_stage_charges_the_budget_once_and_a_rerun_nothing_more(ray_local, image_folder, lenet5_checkpoint,
                                                                       tmp_path, serve_port):
    """--target: serve the target, query it with the selection over HTTP, fit a substitute,
    attack; a rerun gets the journal's stored answers and is charged nothing more."""
    from drmi_ray.service_journal import read_journal

    out = tmp_path / "run"
    argv = attack_argv(image_folder, out, lenet5_checkpoint[0], "lenet5", serve_port)  # the session's target
    assert main(argv) == 0
    (row,) = read_json(out / "results.json")
    assert row["queries"] == 20 and row["budget"] == 20 and row["substitute"] == "lenet5"
    for metric in ("accuracy", "fidelity", "transfer_rate"):
        assert 0.0 <= row[metric] <= 1.0
    journal = out / "target" / "journal.jsonl"
    assert sum(r["n"] for r in read_journal(str(journal)) if r["type"] == "answer") == 20
    assert os.path.exists(out / "report.md")
    # the substitute's weights came back as a Ray Train checkpoint in the run folder
    (weights,) = (out / "train").glob("*/checkpoint_final/model-0.pt")
    assert weights.stat().st_size > 0

    # a rerun asks again with the same request ids: stored answers, nothing new in the journal
    before = journal.read_bytes()
    assert main(argv) == 0
    assert journal.read_bytes() == before
    assert read_json(out / "results.json")[0]["queries"] == 20


def test_target_url_is_charged_at_the_endpoint_and_the_referee_pays_on_its_own_key(
        ray_local, image_folder, lenet5_checkpoint, tmp_path, serve_port):
    """--target-url: the selection is asked of an outside endpoint (here our own service over the
    session's target) on the attack's key; the referee asks the endpoint for the test images'
    labels and for the adversarial examples on the evaluation key, and says how many it asked."""
    from drmi_ray.service import start_target, stop_target

    service = start_target(lenet5_checkpoint[0], str(tmp_path / "endpoint" / "journal.jsonl"), port=serve_port)
    try:
        attack_key, eval_key = service.create_key("attacker", budget=20), service.create_key("referee", budget=80)
        argv = attack_argv(image_folder, tmp_path / "run", lenet5_checkpoint[0], "lenet5", serve_port)
        argv = argv[:argv.index("--size")] + argv[argv.index("--size") + 2:]  # the pool's own 28 x 28
        argv = argv[:argv.index("--target")] + argv[argv.index("--target") + 2:]
        assert main([*argv, "--target-url", service.url, "--api-key", attack_key, "--eval-api-key", eval_key]) == 0
        attacker, referee = service.usage("attacker"), service.usage("referee")
    finally:
        stop_target(service)
    (row,) = read_json(tmp_path / "run" / "results.json")
    assert row["queries"] == attacker["used"] == 20 and not (tmp_path / "run" / "target").exists()
    assert 40 < referee["used"] <= 80  # the 40 test images, then one adversarial example per image it got right
    assert f"scored black-box: {referee['used']} evaluation queries" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.heavy
@pytest.mark.parametrize("substitute", ["resnet18", "inception_v3"])
def test_target_stage_fits_torchvision_substitutes(ray_local, image_folder, lenet5_checkpoint,
                                                   tmp_path, substitute, serve_port):
    """The torchvision substitutes (random init) through the same path (≈ 1.5 min each on 2 cores)."""
    out = tmp_path / "run"
    assert main(attack_argv(image_folder, out, lenet5_checkpoint[0], substitute, serve_port)) == 0
    (row,) = read_json(out / "results.json")
    assert row["queries"] == 20 and row["substitute"] == substitute


def test_cifar10_source_selects_among_its_first_pool_size_rgb_images(ray_local, monkeypatch, tmp_path):
    """cifar10:ROOT (jobs/cifar10.py's pool) with torchvision's loader replaced by 120 colour
    images (no download here)."""
    import drmi_ray.data as data
    import drmi_ray.pools as pools

    rng = np.random.default_rng(0)
    fake = data.Pool(rng.integers(0, 256, (120, 32, 32, 3), dtype=np.uint8), np.repeat(np.arange(4), 30),
                     classes=["a", "b", "c", "d"])
    monkeypatch.setattr(pools, "torchvision_pool", lambda name, root, train=True, download=False: fake)
    out = tmp_path / "run"
    assert drmi_reduce("--data", f"cifar10:{tmp_path}", "--budget", 8, "--out", out, "--tile-size", 16,
                       "--pool-size", 100) == 0
    sel = read_json(out / "selection.json")
    assert len(sel["selected"]) == 8 and all(p.startswith(f"cifar10:{tmp_path}#") for p in sel["selected"])
    assert sel["settings"]["mode"] == "RGB" and sel["n_images"] == 100


def test_cifar10_without_data_exits_2_naming_download(ray_local, tmp_path, capsys):
    assert drmi_reduce("--data", f"cifar10:{tmp_path / 'nothing'}", "--budget", 8, "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "--download" in err or "download=True" in err


# ----------------------------------------------------------------------------- junk among real images

def png(array, **kwargs) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def junk_folder(tmp_path_factory, digits):
    """40 real digits as 8-bit PNGs, two more saved as 16-bit PNG and float TIFF in 0..1 (good,
    when scaled right), and every degenerate kind: 1x1, blank 49 Mpx, nearly constant.
    Returns (root, {file: digit it holds}, {junk file: words of its reason})."""
    from PIL import Image

    images, _ = digits
    root = tmp_path_factory.mktemp("junk")
    good = {}
    for i in range(40):
        (root / f"digit{i:02d}.png").write_bytes(png(images[i * 100]))
        good[f"digit{i:02d}.png"] = images[i * 100]
    (root / "digit16.png").write_bytes(png(images[4001].astype(np.uint16) * 257))  # a 16-bit PNG
    Image.fromarray(images[4002].astype(np.float32) / 255).save(root / "digitf.tif")  # float, 0..1
    good.update({"digit16.png": images[4001], "digitf.tif": images[4002]})
    near = np.full((28, 28), 128, np.uint8)
    near[::2] += 1
    near[0, :3] = 0
    (root / "tiny.png").write_bytes(png(np.full((1, 1), 255, np.uint8)))
    (root / "blank.png").write_bytes(png(np.zeros((7000, 7000), np.uint8), compress_level=1))
    (root / "near.png").write_bytes(png(near))
    junk = {"tiny.png": "1x1 pixels, below the 8x8 floor", "blank.png": "blank (every pixel is 0)",
            "near.png": "nearly constant"}
    return root, good, junk


def test_junk_images_are_skipped_with_their_reason_and_the_rest_decode_exactly(ray_local, junk_folder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from drmi_ray.pools import load_pool
    from drmi_ray.ingest import read_pool

    root, good, junk = junk_folder
    shard = tmp_path / "pool.parquet"  # the same files as Parquet rows
    names = sorted(os.listdir(root))
    pq.write_table(pa.table({"image": [(root / n).read_bytes() for n in names], "path": names}), shard)
    # drmi run's door (load_pool: junk is skipped, not an error) and drmi reduce's (read_pool)
    for pool in (load_pool(str(root)), read_pool(str(shard))):
        decoded = {os.path.basename(p): image for p, image in zip(pool.paths, pool.images)}
        assert sorted(decoded) == sorted(good)
        for name, digit in good.items():
            assert np.array_equal(decoded[name], digit), name
        skipped = {os.path.basename(s["path"]): s["reason"] for s in pool.skipped}
        assert sorted(skipped) == sorted(junk)
        for name, words in junk.items():
            assert skipped[name].startswith("degenerate image: ") and words in skipped[name], skipped[name]


def test_reduce_selects_no_junk(ray_local, junk_folder, tmp_path):
    from drmi_ray.config import ReduceConfig, ReducePoolConfig, ReduceSelectionConfig

    root, good, junk = junk_folder
    config = ReduceConfig(pool=ReducePoolConfig(source=str(root), size=28),
                          selection=ReduceSelectionConfig(budget=8, partition="none"))
    result = reduce.run_reduce(config, str(tmp_path / "run"))
    selected = [os.path.basename(p) for p in result["selected"]]
    assert len(selected) == 8 and set(selected) <= set(good), selected
    assert {os.path.basename(s["path"]) for s in result["skipped"]} == set(junk)


def test_pool_graph_joins_each_partitions_graph_from_its_own_tile_store(ray_local, digits, tmp_path):
    """--learn pool in drmi reduce: the whole pool's graph is block-diagonal, each partition's
    block the kNN graph of its own tile store (images of two partitions are never linked)."""
    from drmi_ray.data import Pool
    from drmi_ray.matrix import compute_mi_matrix
    from drmi_ray.mi import pairwise_mi
    from drmi_ray.reduce import Partition, pool_graph
    from drmi_ray.spread import knn_graph

    images = digits[0][::97][:40]
    members = [np.arange(0, 40, 2), np.arange(1, 40, 2), np.array([], dtype=np.int64)]
    parts = []
    for key, m in enumerate(members):
        store = str(tmp_path / f"mi{key}") if len(m) else None
        if store:
            compute_mi_matrix(images[m], store, tile_size=8)
        parts.append(Partition(key=key, name=f"p{key}", members=m, store=store))
    graph = pool_graph(Pool(images, None, [str(i) for i in range(40)]), parts).toarray()
    for a in members[:2]:
        np.testing.assert_allclose(graph[np.ix_(a, a)], knn_graph(pairwise_mi(images[a])).toarray(), atol=1e-12)
    assert not graph[np.ix_(members[0], members[1])].any()


def test_target_stage_learns_from_the_pool_when_it_is_decoded_at_the_targets_size(
        ray_local, image_folder, lenet5_checkpoint, tmp_path, serve_port):
    out = tmp_path / "run"
    argv = attack_argv(image_folder, out, lenet5_checkpoint[0], "lenet5", serve_port)
    argv[argv.index("--size") + 1] = "28"  # the session's target takes 28 x 28 digits
    assert main([*argv, "--learn", "auto"]) == 0
    (row,) = read_json(out / "results.json")
    assert row["learn"] == "pool" and row["queries"] == 20
