"""Retrieval databases (.npz loading), ScaNN searchers in the three upstream regimes, and ``ldm build-index``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ldmcli import paths
from ldmcli.errors import LdmError, UsageError
from ldmcli.retrieval import (Retriever, SearcherError, SearcherOptions, build_index, exact_search, load_database,
                              plan_searcher, recall_at_k)
from ldmcli.retrieval.database import DatabaseError, write_shard


def clustered(n: int, dim: int = 32, clusters: int = 20, seed: int = 0, spread: float = 0.6) -> np.ndarray:
    """Points around ``clusters`` fixed centres (the same for every seed), so other seeds give fresh queries."""
    centers = np.random.default_rng(12345).standard_normal((clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    return centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)


def make_db(folder: Path, x: np.ndarray, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(x), shards + 1).astype(int)
    for i in range(shards):
        a, b = bounds[i], bounds[i + 1]
        write_shard(folder / f"part-{i:03d}.npz", x[a:b], np.arange(a, b), np.tile([0, 0, 8, 8], (b - a, 1)))
    return folder


def db_home(name: str) -> Path:
    return paths.databases_dir() / name


# ------------------------------------------------------------------------------------------------------- databases


def test_single_uncompressed_file_is_memory_mapped(tmp_path):
    x = clustered(50)
    make_db(tmp_path / "db", x)
    db = load_database(tmp_path / "db")
    assert isinstance(db.embedding, np.memmap)
    np.testing.assert_array_equal(np.asarray(db.embedding), x)
    assert (len(db), db.dim, db.name) == (50, 32, "db")
    np.testing.assert_array_equal(db.metadata("img_id", np.array([[3, 7]])), [[3, 7]])


def test_shards_concatenate_in_sorted_order_with_progress(tmp_path):
    x = clustered(100)
    make_db(tmp_path / "db", x, shards=3)
    seen = []
    db = load_database(tmp_path / "db", callback=lambda *a: seen.append(a))
    np.testing.assert_array_equal(db.embedding, x)
    assert seen[0] == ("load", 0, 3) and seen[-1] == ("load", 3, 3)
    np.testing.assert_array_equal(db.metadata("img_id", np.array([0, 99])), [0, 99])


def test_compressed_npz_loads(tmp_path):
    x = clustered(20)
    (tmp_path / "db").mkdir()
    np.savez_compressed(tmp_path / "db" / "a.npz", embedding=x, img_id=np.arange(20), patch_coords=np.zeros((20, 4)))
    np.testing.assert_array_equal(load_database(tmp_path / "db").embedding, x)


@pytest.mark.parametrize("case", ["corrupt", "missing_key", "not_2d", "int", "lengths", "dims", "empty"])
def test_bad_databases_raise_one_line_errors(tmp_path, case):
    folder = tmp_path / "db"
    folder.mkdir()
    x = clustered(10)
    if case == "corrupt":
        make_db(folder, x)
        data = (folder / "part-000.npz").read_bytes()
        (folder / "part-000.npz").write_bytes(data[:40] + b"garbage" * 10)
    elif case == "missing_key":
        np.savez(folder / "a.npz", embedding=x, img_id=np.arange(10))
    elif case == "not_2d":
        np.savez(folder / "a.npz", embedding=x[:, 0], img_id=np.arange(10), patch_coords=np.zeros((10, 4)))
    elif case == "int":
        np.savez(folder / "a.npz", embedding=x.astype(int), img_id=np.arange(10), patch_coords=np.zeros((10, 4)))
    elif case == "lengths":
        np.savez(folder / "a.npz", embedding=x, img_id=np.arange(9), patch_coords=np.zeros((10, 4)))
    elif case == "dims":
        write_shard(folder / "a.npz", x, np.arange(10), np.zeros((10, 4)))
        write_shard(folder / "b.npz", x[:, :16], np.arange(10), np.zeros((10, 4)))
    with pytest.raises(LdmError) as e:
        load_database(folder)
    assert "\n" not in str(e.value)
    if case == "empty":
        assert isinstance(e.value, UsageError)


def test_expected_dim_mismatch_is_usage_error(tmp_path):
    make_db(tmp_path / "db", clustered(10))
    with pytest.raises(UsageError, match="32-d embeddings but the CLIP model gives 768-d"):
        load_database(tmp_path / "db", expected_dim=768)


def test_truncated_uncompressed_file_is_database_error(tmp_path):
    make_db(tmp_path / "db", clustered(200))
    path = tmp_path / "db" / "part-000.npz"
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DatabaseError):
        load_database(tmp_path / "db")


# ------------------------------------------------------------------------------------------------------- searchers


def test_plan_follows_upstream_thresholds():
    assert plan_searcher(19_999).kind == "brute_force"
    ah = plan_searcher(50_000)
    assert (ah.kind, ah.reorder, ah.anisotropic_threshold, ah.dims_per_block) == ("ah", 40, 0.2, 2)
    tree = plan_searcher(250_000)
    assert (tree.kind, tree.num_leaves, tree.leaves_to_search, tree.training_sample_size) == ("tree_ah", 500, 25, 25_000)
    assert tree.spherical and not plan_searcher(250_000, SearcherOptions(spherical=False)).spherical
    custom = plan_searcher(3000, SearcherOptions(brute_force_below=100, tree_from=1000, num_leaves=10, knn=5))
    assert (custom.kind, custom.num_leaves, custom.leaves_to_search, custom.reorder) == ("tree_ah", 10, 1, 10)
    with pytest.raises(UsageError):
        plan_searcher(3000, SearcherOptions(brute_force_below=100, tree_from=1000, num_leaves=10, leaves_to_search=11))


def test_exact_search_and_recall():
    x = clustered(500)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:7]
    idx = exact_search(x, q, 5, chunk=64)
    ref = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(idx, ref)
    assert recall_at_k(idx, ref) == 1.0
    assert recall_at_k(idx[:, ::-1], ref) == 1.0
    assert recall_at_k(np.full_like(ref, 499), ref) < 0.3


REGIMES = [
    ("brute", 300, [], "brute_force"),
    ("ah", 1200, ["--brute-force-below", "1000"], "ah"),
    ("tree", 2500, ["--brute-force-below", "1000", "--tree-from", "2000"], "tree_ah"),
    ("tree-upstream", 2500, ["--brute-force-below", "1000", "--tree-from", "2000", "--no-spherical"], "tree_ah"),
]


@pytest.mark.parametrize("name,n,extra,kind", REGIMES, ids=[r[0] for r in REGIMES])
def test_build_index_cli_in_each_scann_regime(cli, name, n, extra, kind):
    x = clustered(n, seed=n)
    make_db(db_home(name), x, shards=2)
    r = cli("build-index", name, "--queries", "200", "--json", "--quiet", *extra)
    assert r.exit_code == 0, r
    report = json.loads(r.stdout)
    assert report["plan"]["kind"] == kind
    assert report["met"] and report["recall"] >= 0.95
    assert report["n"] == n and report["dim"] == 32 and report["recall_k"] == 10
    folder = paths.searchers_dir() / name
    assert Path(report["path"]) == folder
    meta = json.loads((folder / "ldm_searcher.json").read_text())
    assert meta["pre_reorder_num_neighbors"] == report["pre_reorder_num_neighbors"]
    assert meta["leaves_to_search"] == report["leaves_to_search"]
    assert [p.name for p in folder.parent.iterdir()] == [name]  # no temporary folder left behind
    if kind == "tree_ah":
        assert report["plan"]["num_leaves"] == 50 and report["plan"]["leaves_to_search"] == 2
        assert report["plan"]["spherical"] == ("--no-spherical" not in extra)
    # the saved searcher, with its stored defaults, finds the exact neighbours of fresh queries
    retriever = Retriever.open(name)
    queries = clustered(100, seed=n + 1)
    found = retriever.search(queries, 10)
    data = x / np.linalg.norm(x, axis=1, keepdims=True)
    exact = exact_search(data, queries / np.linalg.norm(queries, axis=1, keepdims=True), 10)
    assert recall_at_k(found.indices, exact) >= 0.9
    np.testing.assert_allclose(found.embeddings, data[found.indices], atol=1e-6)
    np.testing.assert_array_equal(found.img_ids, found.indices)


def test_build_index_human_output_and_rebuild_replaces(cli):
    make_db(db_home("small"), clustered(200))
    r = cli("build-index", "small", "--quiet")
    assert r.exit_code == 0, r
    assert "recall@10 against exact search on 200 held-out queries: 1.000" in r.stdout
    r = cli("build-index", "small", "--knn", "5")
    assert r.exit_code == 0, r
    assert "loading database" in r.stderr and "training ScaNN searcher" in r.stderr
    assert json.loads((paths.searchers_dir() / "small" / "ldm_searcher.json").read_text())["plan"]["knn"] == 5
    assert len(list(paths.searchers_dir().iterdir())) == 1


def test_unreachable_target_is_said_plainly(cli):
    rng = np.random.default_rng(0)
    make_db(db_home("hard"), rng.standard_normal((1500, 64)).astype(np.float32))
    r = cli("build-index", "hard", "--brute-force-below", "100", "--tree-from", "1000", "--num-leaves", "30",
            "--leaves-to-search", "1", "--no-tune", "--queries", "100", "--quiet", "--json")
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["met"] is False
    r = cli("build-index", "hard", "--brute-force-below", "100", "--tree-from", "1000", "--num-leaves", "30",
            "--leaves-to-search", "1", "--no-tune", "--queries", "100", "--quiet")
    assert "could not reach recall@10 0.95" in r.stderr


def test_folder_path_database(cli, tmp_path):
    make_db(tmp_path / "mydb", clustered(100))
    r = cli("build-index", str(tmp_path / "mydb"), "--quiet", "--json")
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["database"] == "mydb"
    assert (paths.searchers_dir() / "mydb" / "scann_config.pb").is_file()


@pytest.mark.parametrize("args,code,message", [
    (["no-such-db"], 2, "unknown database 'no-such-db'"),
    (["./missing-folder"], 2, "no database at"),
    (["small", "--target-recall", "1.5"], 2, "--target-recall"),
    (["small", "--knn", "0"], 2, "--knn"),
    (["small", "--num-leaves", "4", "--leaves-to-search", "5"], 2, "--leaves-to-search"),
    (["bad/name", "--from-images", "."], 2, "not a valid database name"),
    (["new", "--from-images", "/no/such/folder"], 2, "is not a folder"),
    (["broken"], 1, "not a readable .npz"),
])
def test_bad_input_is_one_line_error(cli, args, code, message):
    make_db(db_home("small"), clustered(30))
    db_home("broken").mkdir(parents=True)
    (db_home("broken") / "a.npz").write_bytes(b"this is not a zip file")
    r = cli("build-index", *args)
    assert r.exit_code == code, r
    assert len(r.stderr.strip().splitlines()) == 1, r
    assert message in r.stderr


# ------------------------------------------------------------------------------------------------------- retriever


def test_retriever_builds_small_searcher_on_the_fly(tmp_path):
    x = clustered(300)
    make_db(db_home("fly"), x)
    retriever = Retriever.open("fly")
    found = retriever.search(x[:4][:, None, :], 3)  # [B, 1, D] queries as knn2img passes them
    assert found.indices.shape == (4, 3) and found.embeddings.shape == (4, 3, 32)
    assert list(found.indices[:, 0]) == [0, 1, 2, 3]
    np.testing.assert_allclose(np.linalg.norm(found.embeddings, axis=-1), 1.0, atol=1e-6)
    with pytest.raises(UsageError, match="cannot retrieve 301 neighbours"):
        retriever.search(x[:1], 301)


def test_retriever_needs_searcher_for_large_database_and_detects_stale_one():
    x = clustered(400)
    make_db(db_home("big"), x)
    with pytest.raises(SearcherError, match="ldm build-index big"):
        Retriever.open("big", build_below=100)
    build_index(load_database(db_home("big")), options=SearcherOptions(n_queries=50))
    assert len(Retriever.open("big", build_below=100)) == 400
    write_shard(db_home("big") / "zz-extra.npz", x[:10], np.arange(10), np.zeros((10, 4)))
    with pytest.raises(SearcherError, match="built for 400 points but the database now has 410"):
        Retriever.open("big", build_below=100)


# ------------------------------------------------------------------------------------------------ --from-images


def _write_images(folder: Path, count: int, start: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        size = (24 + 4 * (i % 3), 20 + 2 * i)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")


def test_from_images_embeds_resumably_and_builds_searcher(cli, tmp_path):
    from test_clip import save_tiny_clip

    from ldmcli.models.clip import ClipEncoder, load_image

    clip_dir = save_tiny_clip(tmp_path / "clip")
    images = tmp_path / "images"
    _write_images(images, 5)
    (images / "notes.txt").write_text("not an image")
    args = ["build-index", "mine", "--from-images", images, "--clip", clip_dir, "--shard-size", "2",
            "--batch-size", "2", "--device", "cpu", "--json"]
    r = cli(*args)
    assert r.exit_code == 0, r
    report = json.loads(r.stdout)
    assert (report["n"], report["dim"], report["plan"]["kind"]) == (5, 16, "brute_force")
    folder = db_home("mine")
    shards = sorted(p.name for p in folder.iterdir())
    assert shards == ["shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    db = load_database(folder)
    assert db.metadata("img_id", np.arange(5)).tolist() == [f"img{i:02d}.png" for i in range(5)]
    assert db.metadata("patch_coords", np.array([1])).tolist() == [[0, 0, 28, 22]]
    clip = ClipEncoder.from_pretrained(clip_dir)
    np.testing.assert_allclose(db.embedding[3], clip.encode_image(load_image(images / "img03.png")[None])[0].numpy(),
                               atol=1e-5)
    # a rerun resumes: complete shards are kept as they are; a new image only redoes the last shard
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    _write_images(images, 1, start=5)
    r = cli(*args)
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["n"] == 6
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert after["shard-00000.npz"] == stamps["shard-00000.npz"]
    assert after["shard-00001.npz"] == stamps["shard-00001.npz"]
    assert after["shard-00002.npz"] != stamps["shard-00002.npz"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_from_images_without_images_is_usage_error(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("build-index", "mine", "--from-images", tmp_path / "empty")
    assert r.exit_code == 2, r
    assert "no images" in r.stderr


# ------------------------------------------------------------------------------------------- bounded-memory builds


def test_chunked_normalisation_to_file_equals_in_memory(tmp_path):
    from ldmcli.retrieval.database import ShardedRows, normalize_to_file, normalized

    x = clustered(1000, seed=3)
    x[17] = 0.0  # a zero row stays zero
    expected = x / np.where(np.linalg.norm(x, axis=1, keepdims=True) > 0, np.linalg.norm(x, axis=1, keepdims=True), 1)
    seen = []
    out = normalize_to_file(x, tmp_path / "n.f32", chunk=96, callback=lambda *a: seen.append(a))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out, normalized(x, chunk=1000))
    assert seen[-1] == ("normalize", 1000, 1000) and len(seen) == 11
    # a float16 database read through a view over its shards: converted one chunk at a time, same result
    make_db(tmp_path / "db16", x.astype(np.float16), shards=3)
    db = load_database(tmp_path / "db16")
    assert isinstance(db.embedding, ShardedRows) and db.embedding.dtype == np.float16
    out16 = normalize_to_file(db.embedding, tmp_path / "n16.f32", chunk=77)
    np.testing.assert_array_equal(out16, normalized(x.astype(np.float16).astype(np.float32)))


def test_sharded_rows_index_like_one_array(tmp_path):
    x = clustered(100)
    make_db(tmp_path / "db", x, shards=3)
    rows = load_database(tmp_path / "db").embedding
    assert rows.shape == (100, 32) and len(rows) == 100
    idx = np.array([[0, 33, 99], [34, 67, 66]])
    np.testing.assert_array_equal(rows[idx], x[idx])
    np.testing.assert_array_equal(rows[20:80], x[20:80])
    np.testing.assert_array_equal(rows[::7], x[::7])
    np.testing.assert_array_equal(rows[-1], x[-1])
    with pytest.raises(IndexError):
        rows[np.array([100])]


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_embeddings_are_named_before_building(cli, value):
    x = clustered(300)
    x[[5, 250], 3] = value
    make_db(db_home("nan"), x, shards=2)
    r = cli("build-index", "nan", "--quiet")
    assert r.exit_code == 2, r
    assert len(r.stderr.strip().splitlines()) == 1, r
    assert "2 of 300 embedding rows with NaN or infinite values (row 5, 250)" in r.stderr
    assert not paths.searchers_dir().exists() or not list(paths.searchers_dir().iterdir())  # temp folder removed


def test_sharded_searcher_returns_the_exact_merge_of_its_shards(cli):
    import scann

    from ldmcli.retrieval.searcher import ShardedSearcher, load_searcher, merge_top_k

    x = clustered(3000, seed=5)
    make_db(db_home("sharded"), x, shards=2)
    r = cli("build-index", "sharded", "--shard-rows", "1100", "--brute-force-below", "500", "--tree-from", "10000",
            "--queries", "200", "--quiet", "--json")
    assert r.exit_code == 0, r
    report = json.loads(r.stdout)
    assert [(s["path"], s["start"], s["rows"]) for s in report["shards"]] == \
        [("shard-000", 0, 1000), ("shard-001", 1000, 1000), ("shard-002", 2000, 1000)]
    assert report["met"] and report["plan"]["kind"] == "ah"
    folder = paths.searchers_dir() / "sharded"
    searcher, meta = load_searcher(folder, expected_rows=3000)
    assert isinstance(searcher, ShardedSearcher) and meta["reorder_dtype"] == report["reorder_dtype"]
    q = clustered(50, seed=6)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    idx, dist = searcher.search_batched(q, final_num_neighbors=10)
    parts = []
    for shard in report["shards"]:  # each shard on its own, through plain ScaNN
        s = scann.scann_ops_pybind.load_searcher(str(folder / shard["path"]))
        i, d = s.search_batched(q, final_num_neighbors=10)
        parts.append((np.asarray(i, dtype=np.int64) + shard["start"], np.asarray(d)))
    ref_idx, ref_dist = merge_top_k(parts, 10)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dist, ref_dist)
    assert np.all(np.diff(dist, axis=1) <= 0)
    data = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(dist, np.take_along_axis(q @ data.T, idx, axis=1), atol=2e-2)  # scores are dot products
    found = Retriever.open("sharded").search(q, 10)
    np.testing.assert_array_equal(found.indices, idx)
    assert recall_at_k(idx, exact_search(data, q, 10)) >= 0.9


def test_brute_force_shards_merge_to_exact_search(tmp_path):
    x = clustered(900, seed=8)
    make_db(db_home("bf"), x, shards=1)
    report = build_index(load_database(db_home("bf")), options=SearcherOptions(shard_rows=250, n_queries=50))
    assert len(report.shards) == 4 and report.recall == 1.0 and report.reorder_dtype is None
    q = clustered(20, seed=9)
    data = x / np.linalg.norm(x, axis=1, keepdims=True)
    found = Retriever.open("bf").search(q, 7)
    np.testing.assert_array_equal(found.indices, exact_search(data, q / np.linalg.norm(q, axis=1, keepdims=True), 7))


def test_plain_scann_gets_the_tuned_defaults(cli):
    """The saved ScaNN config carries the tuned reordering depth and leaves: plain ScaNN (as upstream's knn2img
    loads it) finds what ldm finds."""
    import scann
    from scann.proto import scann_pb2

    x = clustered(4000, dim=64, clusters=40, seed=11, spread=0.9)
    make_db(db_home("plain"), x)
    r = cli("build-index", "plain", "--brute-force-below", "1000", "--tree-from", "2000", "--reorder", "10",
            "--reorder-type", "float32", "--queries", "300", "--quiet", "--json")
    assert r.exit_code == 0, r
    report = json.loads(r.stdout)
    assert report["met"] and report["reorder_dtype"] == "float32" and len(report["shards"]) == 1
    assert (report["pre_reorder_num_neighbors"], report["leaves_to_search"]) != (10, report["plan"]["leaves_to_search"])
    folder = paths.searchers_dir() / "plain"
    config = scann_pb2.ScannConfig.FromString((folder / "scann_config.pb").read_bytes())
    assert config.exact_reordering.approx_num_neighbors == report["pre_reorder_num_neighbors"]
    assert config.partitioning.query_spilling.max_spill_centers == report["leaves_to_search"]
    found = Retriever.open("plain").search(clustered(200, dim=64, clusters=40, seed=12, spread=0.9), 10)
    q = found.queries  # the unit-norm queries ldm searched with
    plain_idx, _ = scann.scann_ops_pybind.load_searcher(str(folder)).search_batched(q, final_num_neighbors=10)
    np.testing.assert_array_equal(np.asarray(plain_idx), found.indices)
    exact = exact_search(x / np.linalg.norm(x, axis=1, keepdims=True), q, 10)
    assert recall_at_k(np.asarray(plain_idx), exact) >= 0.9


def test_smallest_reordering_type_meeting_the_target_is_kept():
    x = clustered(2500, seed=13)
    make_db(db_home("types"), x)
    report = build_index(load_database(db_home("types")),
                         options=SearcherOptions(brute_force_below=1000, n_queries=200, trial_rows=1500))
    trials = report.dtype_trials
    screened = [t for t in trials if t["rows"] == 1500]  # smaller types first screened on 1500 rows
    full = [t for t in trials if t["rows"] == 2500]
    assert [t["reorder_dtype"] for t in screened] == ["int8", "bfloat16"] and len(screened) + len(full) == len(trials)
    candidates = [t["reorder_dtype"] for t in screened if t["met"]] + ["float32"]
    assert [t["reorder_dtype"] for t in full] == candidates[: len(full)]  # smallest first, stop at the first met
    assert all(not t["met"] for t in full[:-1]) and (full[-1]["met"] or full[-1]["reorder_dtype"] == "float32")
    assert report.reorder_dtype == full[-1]["reorder_dtype"] and report.met
    files = {p.name for p in (paths.searchers_dir() / "types").iterdir()}
    assert ("int8_dataset.npy" in files) == (report.reorder_dtype == "int8")
    assert ("dataset.npy" in files) == (report.reorder_dtype == "float32")


def test_memory_estimate_and_refusal(cli, monkeypatch):
    from ldmcli.retrieval import searcher as searcher_mod
    from ldmcli.retrieval.searcher import BASE_BYTES, SHARD_FACTOR, check_memory, estimate_build_memory

    one = estimate_build_memory(3_500_000, 768, 3_500_000)
    sharded = estimate_build_memory(3_500_000, 768, 1_000_000)
    assert one == pytest.approx(BASE_BYTES + SHARD_FACTOR * 3_500_000 * 768 * 4, rel=0.03)
    assert sharded == pytest.approx(BASE_BYTES + SHARD_FACTOR * 875_000 * 768 * 4, rel=0.03)  # 4 equal shards
    assert sharded <= 1.5 * 3_500_000 * 768 * 4  # OpenImages' size fits the target at the default shard size
    monkeypatch.setattr(searcher_mod, "available_memory", lambda: 2_000_000_000)
    with pytest.raises(UsageError, match=r"needs about 44\.0 GB of RAM but 2\.0 GB is available; shards of at most "):
        check_memory(3_500_000, 768, SearcherOptions(shard_rows=3_500_000))
    fits = int(str(pytest.raises(UsageError, check_memory, 3_500_000, 768,
                                 SearcherOptions(shard_rows=3_500_000)).value).split("at most ")[1].split()[0]
               .replace(",", ""))
    assert check_memory(3_500_000, 768, SearcherOptions(shard_rows=fits))[0] <= 2_000_000_000
    make_db(db_home("small"), clustered(300))
    r = cli("build-index", "small", "--max-memory", "0.5")
    assert r.exit_code == 2, r
    assert len(r.stderr.strip().splitlines()) == 1 and "but 0.5 GB is available" in r.stderr
    assert "not even small shards fit" in r.stderr
    monkeypatch.setattr(searcher_mod, "available_memory", lambda: 100_000_000)
    r = cli("build-index", "small")
    assert r.exit_code == 2 and "needs about 0.9 GB of RAM but 0.1 GB is available" in r.stderr, r
    assert not paths.searchers_dir().exists() or not list(paths.searchers_dir().iterdir())


def test_searcher_saved_by_upstream_train_searcher_loads():
    """A folder ScaNN serialised without ldm_searcher.json (as upstream's train_searcher.py writes) loads as is."""
    from ldmcli.retrieval.searcher import SearcherPlan, build_scann, searcher_dir

    x = clustered(1500, seed=14)
    make_db(db_home("up"), x)
    data = x / np.linalg.norm(x, axis=1, keepdims=True)
    searcher = build_scann(data, SearcherPlan("ah", 10, 40, 0.2, 2))
    searcher_dir("up").mkdir(parents=True)
    searcher.serialize(str(searcher_dir("up")))
    retriever = Retriever.open("up", build_below=100)
    assert retriever.defaults == {}
    assert recall_at_k(retriever.search(x[:20], 5).indices, exact_search(data, data[:20], 5)) >= 0.9
