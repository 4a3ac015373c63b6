"""Acceptance benchmark for ``ldm build-index``: recall@10 of the saved ScaNN searcher against exact search.

Generates ``--n`` (default 2e5, above upstream's tree threshold of 1e5) synthetic clustered vectors of dimension 768,
writes them as a database ``.npz``, builds the searcher through the library exactly as ``ldm build-index`` does (tuned
to recall 0.95 on leave-one-out queries), reloads the saved searcher and queries it, with its stored defaults, with
*fresh* held-out queries drawn from the same clusters. Prints build time, query throughput (and its ratio to exact
search by matrix product), and recall@10 with upstream's own query settings (reordering 2k) for comparison.

    python benchmarks/retrieval_recall.py            # the acceptance run (a few minutes on 2 cores)
    python benchmarks/retrieval_recall.py --n 30000  # quick look
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def clustered(rng: np.random.Generator, centers: np.ndarray, bases: np.ndarray | None, n: int, spread: float,
              noise: float) -> np.ndarray:
    """Points around random centres: ``spread`` times a Gaussian in the cluster's own low-dimensional subspace
    (``bases``, as embeddings have a low intrinsic dimension; isotropic when None) plus ``noise`` times isotropic
    Gaussian noise, float32, generated in blocks to bound memory."""
    out = np.empty((n, centers.shape[1]), dtype=np.float32)
    for start in range(0, n, 20000):
        m = min(20000, n - start)
        which = rng.integers(0, len(centers), m)
        block = centers[which] + noise * rng.standard_normal((m, centers.shape[1]), dtype=np.float32)
        if bases is None:
            block += spread * rng.standard_normal((m, centers.shape[1]), dtype=np.float32)
        else:
            z = rng.standard_normal((m, bases.shape[2]), dtype=np.float32)
            block += spread * np.einsum("mk,mdk->md", z, bases[which])
        out[start:start + m] = block
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=0.5, help="scale of the within-cluster variation")
    parser.add_argument("--intrinsic-dim", type=int, default=16,
                        help="dimension of each cluster's subspace (0: isotropic clusters)")
    parser.add_argument("--noise", type=float, default=0.05, help="scale of the isotropic noise")
    parser.add_argument("--queries", type=int, default=1000, help="fresh held-out queries for the acceptance check")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-spherical", action="store_true", help="upstream's plain k-means tree")
    args = parser.parse_args()

    from ldmcli import paths
    from ldmcli.retrieval import Retriever, SearcherOptions, build_index, exact_search, load_database, recall_at_k
    from ldmcli.retrieval.database import write_shard

    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    bases = None
    if args.intrinsic_dim > 0:
        bases = np.linalg.qr(rng.standard_normal((args.clusters, args.dim, args.intrinsic_dim), dtype=np.float32))[0]
    with tempfile.TemporaryDirectory(prefix="ldm-bench-") as home:
        paths.set_data_dir(home)
        folder = paths.databases_dir() / "synthetic"
        folder.mkdir(parents=True)
        t = time.perf_counter()
        x = clustered(rng, centers, bases, args.n, args.spread, args.noise)
        write_shard(folder / "synthetic.npz", x, np.arange(args.n), np.zeros((args.n, 4), dtype=np.int64))
        del x
        print(f"database: {args.n} x {args.dim} clustered vectors ({args.clusters} clusters, intrinsic dimension "
              f"{args.intrinsic_dim or args.dim}, spread {args.spread}, noise {args.noise}), "
              f"written in {time.perf_counter() - t:.1f} s")

        db = load_database(folder)
        t = time.perf_counter()
        report = build_index(db, options=SearcherOptions(target_recall=args.target_recall, seed=args.seed,
                                                                 spherical=not args.no_spherical))
        build_s = time.perf_counter() - t
        plan = report.plan
        print(f"searcher: {plan['kind']}, {plan['num_leaves']} leaves ({'spherical' if plan['spherical'] else 'plain'} "
              f"k-means), training sample {plan['training_sample_size']}, "
              f"upstream query settings: reordering {plan['reorder']}, {plan['leaves_to_search']} leaves")
        print(f"build (train + exact + tune + save): {build_s:.1f} s; tuned defaults: reordering "
              f"{report.pre_reorder_num_neighbors}, {report.leaves_to_search} leaves; leave-one-out recall@10 "
              f"{report.recall:.4f} (met: {report.met})")
        for step in report.tune_steps:
            print(f"  tune: reordering {step['pre_reorder']!s:>5}, leaves {step['leaves']!s:>4}: recall@10 {step['recall']:.4f}")

        del db
        retriever = Retriever.open("synthetic")  # the saved searcher and its stored defaults
        queries = clustered(rng, centers, bases, args.queries, args.spread, args.noise)
        q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        data = np.asarray(retriever.database.embedding)
        data = data / np.linalg.norm(data, axis=1, keepdims=True)
        t = time.perf_counter()
        exact = exact_search(data, q, 10)
        exact_s = time.perf_counter() - t

        t = time.perf_counter()
        found = retriever.search(queries, 10)
        ann_s = time.perf_counter() - t
        recall = recall_at_k(found.indices, exact)
        idx, _ = retriever.searcher.search_batched(q, final_num_neighbors=10,
                                                   pre_reorder_num_neighbors=plan["reorder"],
                                                   leaves_to_search=plan["leaves_to_search"])
        upstream_recall = recall_at_k(np.asarray(idx), exact)
        print(f"fresh held-out queries: {args.queries}")
        print(f"recall@10, stored defaults:            {recall:.4f}  (acceptance: >= {args.target_recall})")
        print(f"recall@10, upstream settings (2k):     {upstream_recall:.4f}")
        print(f"query throughput, saved searcher:      {args.queries / ann_s:,.0f} queries/s "
              f"(incl. normalisation and embedding lookup; threads: {os.cpu_count()} CPUs)")
        print(f"query throughput, exact (matmul):      {args.queries / exact_s:,.0f} queries/s")
        print(f"speed-up over exact search:            {exact_s / ann_s:.1f}x")
        print("PASS" if recall >= args.target_recall else "FAIL")
        paths.set_data_dir(None)


if __name__ == "__main__":
    main()
