"""The archive: where a received file goes and stays.

* :mod:`~obsflow.archive.cache`: fast local storage between receipt and the archive,
  which pipelines read and write;
* :mod:`~obsflow.archive.storage`: permanent storage behind a small interface
  (:class:`~obsflow.archive.storage.Storage`, local disk as its implementation);
* :mod:`~obsflow.archive.ingest`: the ingestor, a consumer of the durable ingest queue
  that copies cached files into storage, verifies them and marks them archived;
* :mod:`~obsflow.archive.fetch`: getting a file's bytes back (a virtual file restored
  from storage into the cache, its checksum checked);
* :mod:`~obsflow.archive.eviction`: the cache kept within its budget (evicted files
  become virtual);
* :mod:`~obsflow.archive.pins`: files kept in the cache for a run or an operator;
* :mod:`~obsflow.archive.retrieval`: :class:`~obsflow.archive.retrieval.Retriever`, the
  one place callers reach fetch, eviction, pins and tags (:mod:`obsflow.catalog.tags`).

Their SQL is in :mod:`obsflow.catalog.cachestate`.
"""
