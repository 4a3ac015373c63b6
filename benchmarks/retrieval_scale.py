"""How ``ldm build-index`` scales: clustered 768-d float32 databases of growing size, each built by ``ldm build-index
--json`` in a child process at the stored defaults; prints wall time, the child's peak resident memory, the searcher's
size on disk and its RAM once loaded, and recall@10, then fits the growth and projects it to OpenImages' size.

Each database is written (streamed, never whole in memory) as one uncompressed ``.npz`` under ``--workdir``, with
the generator of ``retrieval_recall.py`` (1000 clusters, each a 16-d subspace plus isotropic noise, the hard case for
reordering; generated cluster by cluster). Every build runs alone: the parent takes ``--lock`` (``flock``) around each child whose estimate is
above 4 GB. A second child loads the saved searcher, reports its resident memory, and measures recall@10 of fresh
queries from the same clusters against exact search (at the stored defaults, as ``ldm knn2img`` searches).

    python benchmarks/retrieval_scale.py                          # 1e5, 3e5, 1e6, 3.5e6 (about an hour on 2 cores)
    python benchmarks/retrieval_scale.py --sizes 1e5,3e5 --plot /tmp/scale.png   # quick look
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import selectors
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM = 768
OPENIMAGES = ((3_500_000, "float32"), (7_000_000, "float16"))  # ~11 GB of CLIP ViT-L/14 embeddings either way


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        return "unknown"
    names = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX")]
    return ", ".join(label for flag, label in names if flag in flags) or "none of AVX2/AVX-512/AMX"


def generator(seed: int, clusters: int = 1000, intrinsic: int = 16):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, DIM), dtype=np.float32)
    bases = np.linalg.qr(rng.standard_normal((clusters, DIM, intrinsic), dtype=np.float32))[0]
    return centers, bases


def clustered_fast(rng: np.random.Generator, centers: np.ndarray, bases: np.ndarray, n: int, spread: float = 0.5,
                   noise: float = 0.05) -> np.ndarray:
    """The distribution of ``retrieval_recall.clustered`` (a random centre, ``spread`` times a Gaussian in its
    cluster's subspace, ``noise`` times isotropic noise) generated cluster by cluster: no ``[n, D, k]`` gather."""
    which = rng.integers(0, len(centers), n)
    out = centers[which] + noise * rng.standard_normal((n, centers.shape[1]), dtype=np.float32)
    z = rng.standard_normal((n, bases.shape[2]), dtype=np.float32)
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(len(centers) + 1))
    for c in range(len(centers)):
        rows = order[bounds[c]: bounds[c + 1]]
        if len(rows):
            out[rows] += spread * (z[rows] @ bases[c].T)
    return out


def write_database(path: Path, n: int, seed: int = 0, block: int = 100_000) -> None:
    """One uncompressed ``.npz`` (embedding float32, img_id, patch_coords) written block by block."""
    centers, bases = generator(seed)
    rng = np.random.default_rng(seed + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("embedding.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, DIM)})
            for start in range(0, n, block):
                f.write(clustered_fast(rng, centers, bases, min(block, n - start)).tobytes())
        with zf.open("img_id.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.arange(n, dtype=np.int64))
        with zf.open("patch_coords.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.zeros((n, 4), dtype=np.int16))
    os.replace(tmp, path)


@contextlib.contextmanager
def big_memory_lock(path: str | None, wait: float | None = None):
    """Hold ``flock(path)`` (None: no lock); yields the seconds waited, or None when ``wait`` seconds passed first."""
    if path is None:
        yield 0.0
        return
    t = time.perf_counter()
    with open(path, "a+") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (fcntl.LOCK_NB if wait is not None else 0))
                break
            except BlockingIOError:
                if time.perf_counter() - t > wait:
                    yield None
                    return
                time.sleep(5)
        try:
            yield time.perf_counter() - t
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def popen_rusage(cmd: list[str], env: dict) -> tuple[int, str, str, float, float]:
    """(exit code, stdout, stderr, wall seconds, peak RSS in GB) of one child process, reaped with ``wait4`` so that
    ``ru_maxrss`` is this child's own peak (``RUSAGE_CHILDREN`` would be the largest of all children so far)."""
    t = time.perf_counter()
    with open(os.devnull, "rb") as devnull:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.dup2(devnull.fileno(), 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            for fd in (out_r, err_r, out_w, err_w):
                os.close(fd)
            os.execvpe(cmd[0], cmd, env)
        os.close(out_w)
        os.close(err_w)
        chunks = {out_r: [], err_r: []}
        sel = selectors.DefaultSelector()
        for fd in chunks:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            for key, _ in sel.select():
                data = os.read(key.fd, 65536)
                if data:
                    chunks[key.fd].append(data)
                else:
                    sel.unregister(key.fd)
                    os.close(key.fd)
        _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t
    return (os.waitstatus_to_exitcode(status), b"".join(chunks[out_r]).decode(), b"".join(chunks[err_r]).decode(),
            wall, usage.ru_maxrss * 1024 / 1e9)


def query_child(home: str, database: str, n_queries: int) -> None:
    """Load the saved searcher, report its RAM, and measure recall@10 of fresh queries at the stored defaults."""
    from ldmcli import paths
    from ldmcli.retrieval import Retriever, recall_at_k
    from ldmcli.retrieval.database import iter_rows

    def rss() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024 / 1e9

    paths.set_data_dir(home)
    import scann  # noqa: F401  (the library's own memory, not the searcher's)

    before = rss()
    retriever = Retriever.open(database)
    searcher_ram = rss() - before
    centers, bases = generator(0)
    queries = clustered_fast(np.random.default_rng(12345), centers, bases, n_queries)
    t = time.perf_counter()
    found = retriever.search(queries, 10)
    seconds = time.perf_counter() - t
    # exact neighbours by a chunked pass (the rows released after each chunk)
    q = found.queries
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for start, block in iter_rows(retriever.database.embedding, 65536):
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        s = np.concatenate([best_s, q @ block.T], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(block)), (len(q), len(block)))], 1)
        top = np.argpartition(-s, 9, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    print(json.dumps({"searcher_ram_gb": searcher_ram, "fresh_recall": recall_at_k(found.indices, best_i),
                      "queries_per_s": len(q) / seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e5,3e5,1e6,3.5e6")
    parser.add_argument("--workdir", default="/tmp/ldm-bench/scale")
    parser.add_argument("--lock", default="/tmp/ldm-bigmem.lock", help="flock file taken around big builds")
    parser.add_argument("--plot", default=str(REPO / "benchmarks" / "retrieval_scale.png"))
    parser.add_argument("--json", default=None, help="write the results here too")
    parser.add_argument("--queries", type=int, default=500, help="fresh queries for the query-time check")
    parser.add_argument("--build-args", default="", help="more ldm build-index options for every build, e.g. "
                        "'--reorder-type float32' (the default, auto, tries int8 and bfloat16 first)")
    parser.add_argument("--lock-wait", type=float, default=900, help="seconds to wait for the lock before skipping "
                        "the query check of a big searcher")
    parser.add_argument("--keep", action="store_true", help="keep the generated databases and searchers")
    parser.add_argument("--render", nargs="+", metavar="JSON", help="only print the table and plot of earlier runs' "
                        "--json files (runs of different sizes, e.g. done on different days)")
    parser.add_argument("--query-child", nargs=3, metavar=("HOME", "DB", "Q"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.query_child:
        query_child(args.query_child[0], args.query_child[1], int(args.query_child[2]))
        return

    if args.render:
        report([row for path in args.render for row in json.loads(Path(path).read_text())], args.plot)
        return

    from ldmcli.retrieval.searcher import estimate_build_memory

    sizes = [int(float(s)) for s in args.sizes.split(",")]
    ram_gb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9
    print(f"CPU: {os.cpu_count()} cores, {cpu_flags()}; RAM {ram_gb:.1f} GB; load average "
          f"{os.getloadavg()[0]:.1f} at start", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    for n in sizes:
        work = Path(args.workdir) / str(n)
        db = work / "db" / "synthetic.npz"
        home = work / "home"
        shutil.rmtree(home, ignore_errors=True)
        if not db.is_file():
            t = time.perf_counter()
            write_database(db, n)
            print(f"N={n:,}: database written in {time.perf_counter() - t:.0f} s ({db.stat().st_size / 1e9:.2f} GB)",
                  flush=True)
        extra = args.build_args.split()
        shard_rows = int(extra[extra.index("--shard-rows") + 1]) if "--shard-rows" in extra else 1_000_000
        big = estimate_build_memory(n, DIM, shard_rows) > 4e9
        with big_memory_lock(args.lock if big else None) as waited:
            if waited > 1:
                print(f"  (waited {waited:.0f} s for {args.lock})", flush=True)
            code, out, err, wall, peak = popen_rusage(
                [sys.executable, "-m", "ldmcli", "build-index", str(db.parent), "--json", "--quiet",
                 "--max-memory", f"{ram_gb * 0.9:.1f}", *extra],  # the RAM present (others hold the lock)
                {**env, "LDM_HOME": str(home)})
        if code != 0:
            print(f"N={n:,}: build failed (exit {code}): {err.strip()[-2000:]}")
            break
        built = json.loads(out)
        # the query check holds the whole searcher in RAM: under the lock when that is big
        big_query = built["searcher_bytes"] > 3.5e9
        with big_memory_lock(args.lock if big_query else None, wait=args.lock_wait) as waited:
            if waited is None:
                qcode, qout, qerr = 1, "", f"not run: {args.lock} still held after {args.lock_wait:.0f} s"
            else:
                qcode, qout, qerr, _, _ = popen_rusage(
                    [sys.executable, __file__, "--query-child", str(home), str(db.parent), str(args.queries)], env)
        query = json.loads(qout) if qcode == 0 else {}
        if qcode != 0:
            print(f"  query check failed: {qerr.strip()[-1000:]}")
        data_gb = n * DIM * 4 / 1e9
        row = {"n": n, "data_gb": data_gb, "wall_s": wall, "peak_rss_gb": peak, "peak_over_data": peak / data_gb,
               "searcher_gb": built["searcher_bytes"] / 1e9, "searcher_ram_gb": query.get("searcher_ram_gb"),
               "shards": len(built["shards"]), "reorder_dtype": built["reorder_dtype"],
               "reorder": built["pre_reorder_num_neighbors"], "leaves": built["leaves_to_search"],
               "num_leaves": built["plan"]["num_leaves"], "recall": built["recall"],
               "fresh_recall": query.get("fresh_recall"), "queries_per_s": query.get("queries_per_s"),
               "estimate_gb": built["memory_estimate_bytes"] / 1e9, "build_seconds": built["build_seconds"],
               "build_args": args.build_args, "trials": [(t["reorder_dtype"], t["rows"], round(t["recall"], 3)) for t in built["dtype_trials"]]}
        row["load_average"] = os.getloadavg()[0]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")

    report(rows, args.plot)


def report(rows: list[dict], plot_path: str) -> None:
    """The markdown table, the projection to OpenImages' size and the plot."""
    rows = sorted(rows, key=lambda r: r["n"])
    print("\n| N | float32 data | wall | peak RSS (x data) | estimate | searcher on disk | RAM at query time | shards "
          "| reordering | recall@10 held-out / fresh |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        leaves = f", {r['leaves']}/{r['num_leaves']} leaves" if r["leaves"] else ""
        ram = f"{r['searcher_ram_gb']:.2f} GB" if r["searcher_ram_gb"] is not None else "?"
        fresh = f"{r['fresh_recall']:.3f}" if r["fresh_recall"] is not None else "?"
        print(f"| {r['n']:,} | {r['data_gb']:.2f} GB | {r['wall_s']:.0f} s | {r['peak_rss_gb']:.2f} GB "
              f"({r['peak_over_data']:.2f}x) | {r['estimate_gb']:.1f} GB | {r['searcher_gb']:.2f} GB | {ram} | "
              f"{r['shards']} | {r['reorder_dtype']} {r['reorder']}{leaves} | {r['recall']:.3f} / {fresh} |")
    if rows:
        # at a fixed shard size, time grows with the number of shards (linear in N) and the peak stays that of one
        # shard; the searcher held at query time grows linearly
        last = rows[-1]
        for n, kind in OPENIMAGES:
            if n > last["n"]:
                f = n / last["n"]
                print(f"projection to {n:,} ({kind}; linear from N={last['n']:,} at its shard size): wall "
                      f"~{last['wall_s'] * f / 60:.0f} min, peak RSS ~{last['peak_rss_gb']:.1f} GB (one shard), "
                      f"searcher at query time ~{last['searcher_gb'] * f:.1f} GB (float32 reordering)")
    if len(rows) >= 2:
        plot(rows, plot_path)
        print(f"plot: {plot_path}")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = np.array([r["n"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.loglog(ns, [r["wall_s"] for r in rows], "o-", label="build wall time (s)")
    ax.loglog(ns, [r["peak_rss_gb"] for r in rows], "s-", label="build peak RSS (GB)")
    ax.loglog(ns, [r["searcher_ram_gb"] or np.nan for r in rows], "^-", label="searcher RAM at query time (GB)")
    ax.loglog(ns, ns * DIM * 4 / 1e9, "k:", label="float32 database (GB)")
    ax.axvline(3.5e6, color="grey", lw=0.8, ls="--")
    ax.text(3.5e6, ax.get_ylim()[1], " OpenImages", va="top", fontsize=8, color="grey")
    ax.set_xlabel("database size N (768-d)")
    ax.set_title("ldm build-index on 2 cores (shared machine)", fontsize=10)
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
