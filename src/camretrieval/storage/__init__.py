"""An index folder on disk: a SQLite catalog, immutable shards of descriptors and maps, the whitening, an approximate
FAISS index, and the one writer that changes them.

- :mod:`~camretrieval.storage.catalog`: :class:`IndexStore`, the catalog (the source of truth) and the writer lock;
- :mod:`~camretrieval.storage.shards`: what one commit adds, written once (:class:`ShardWriter`), and read back;
- :mod:`~camretrieval.storage.maps`: every image's feature maps (float16 values, compressed losslessly), for query-time refinement;
- :mod:`~camretrieval.storage.ann`: approximate FAISS indexes (HNSW, IVF-PQ) and float16 search;
- :mod:`~camretrieval.storage.writer`: :func:`update_index`, :func:`remove_images`, :func:`write_index`;
- :mod:`~camretrieval.storage.ray`: describing images on a Ray cluster into the same shards.
"""

from camretrieval.storage.catalog import FileState, IndexFileError, IndexStore
from camretrieval.storage.maps import MapsNotStoredError, MapStore
from camretrieval.storage.writer import UpdateReport, remove_images, update_index, write_index

__all__ = [
    "FileState",
    "IndexFileError",
    "IndexStore",
    "MapStore",
    "MapsNotStoredError",
    "UpdateReport",
    "remove_images",
    "update_index",
    "write_index",
]
