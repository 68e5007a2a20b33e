"""Searching an index: :class:`Index` (open a folder, describe queries, exact or approximate FAISS search) and the
query-time refinement of METHOD.md sections 3 and 5 (:mod:`~camretrieval.search.refinement`: online aggregation,
re-ranking with CAM regions, query expansion), chosen with :class:`SearchOptions`.
"""

from camretrieval.search.index import Index, SearchHit
from camretrieval.search.refinement import QueryDescription, Ranking, Refinement, SearchOptions

__all__ = ["Index", "QueryDescription", "Ranking", "Refinement", "SearchHit", "SearchOptions"]
