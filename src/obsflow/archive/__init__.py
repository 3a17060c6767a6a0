"""The archive: where a received file goes and stays.

* :mod:`~obsflow.archive.cache`: fast local storage between receipt and the archive,
  which pipelines read and write;
* :mod:`~obsflow.archive.storage`: permanent storage behind a small interface
  (:class:`~obsflow.archive.storage.Storage`, local disk as its implementation);
* :mod:`~obsflow.archive.ingest`: the ingestor, a consumer of the durable ingest queue
  that copies cached files into storage, verifies them and marks them archived;
* :mod:`~obsflow.archive.retrieval`: getting files back (virtual files restored from
  storage), eviction of the cache to its budget, pins and tags.
"""
