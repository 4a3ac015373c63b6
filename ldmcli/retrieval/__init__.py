"""Retrieval for the Retrieval-Augmented Diffusion Models (Blattmann et al. 2022): CLIP-embedding databases in
upstream's ``.npz`` format, ScaNN searchers over them, and building both from a folder of images."""

from ldmcli.retrieval.database import (KNOWN_DATABASES, Database, DatabaseError, load_database, normalized,
                                       resolve_database)
from ldmcli.retrieval.searcher import (BuildReport, Neighbours, Retriever, SearcherError, SearcherOptions,
                                       SearcherPlan, build_index, exact_search, plan_searcher, recall_at_k,
                                       searcher_dir)

__all__ = [
    "KNOWN_DATABASES", "Database", "DatabaseError", "load_database", "normalized", "resolve_database",
    "BuildReport", "Neighbours", "Retriever", "SearcherError", "SearcherOptions", "SearcherPlan", "build_index",
    "exact_search", "plan_searcher", "recall_at_k", "searcher_dir",
]
