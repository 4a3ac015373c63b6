"""Retrieval for the Retrieval-Augmented Diffusion Models (Blattmann et al. 2022): CLIP-embedding databases in
upstream's ``.npz`` format, ScaNN searchers over them (built in bounded memory, sharded when large), and building both
from a folder of images."""

from ldmcli.retrieval.database import (KNOWN_DATABASES, Database, DatabaseError, ShardedRows, load_database,
                                       normalize_to_file, normalized, resolve_database)
from ldmcli.retrieval.searcher import (BuildReport, Neighbours, Retriever, SearcherError, SearcherOptions,
                                       SearcherPlan, ShardedSearcher, build_index, check_memory, estimate_build_memory,
                                       exact_search, has_searcher, merge_top_k, plan_searcher, recall_at_k,
                                       searcher_dir)

__all__ = [
    "KNOWN_DATABASES", "Database", "DatabaseError", "ShardedRows", "load_database", "normalize_to_file", "normalized",
    "resolve_database", "BuildReport", "Neighbours", "Retriever", "SearcherError", "SearcherOptions", "SearcherPlan",
    "ShardedSearcher", "build_index", "check_memory", "estimate_build_memory", "exact_search", "has_searcher",
    "merge_top_k", "plan_searcher", "recall_at_k", "searcher_dir",
]
