"""Receipt: from a path a trigger offered to a file in the cache with its catalog row.

* :mod:`~obsflow.receipt.intake`: the stream of offered paths, received by a pool of
  workers and recorded in batches by one committer;
* :mod:`~obsflow.receipt.receiver`: one file: recognise its name against the registry,
  wait until it is complete, validate it, read its header, map metadata, assign its
  archive ID, checksum it, and place it in the cache (or quarantine it with a reason);
* :mod:`~obsflow.receipt.header`: the FITS header, read once;
* :mod:`~obsflow.receipt.metadata`: header keywords → standard metadata, per instrument.
"""
