"""Processing: pipelines started when their inputs exist, and their runs executed.

* :mod:`~obsflow.processing.tracker`: observation status; queues one run per
  (pipeline, group, input set) when a group is ready;
* :mod:`~obsflow.processing.profile`: fills a pipeline's profile into the run-time
  profile of one run;
* :mod:`~obsflow.processing.executor`: where runs execute (inline, or a local pool);
* :mod:`~obsflow.processing.controller`: runs one run's steps in dependency order,
  with conditions, timeouts and a log per step; outputs go back through receipt.
"""
