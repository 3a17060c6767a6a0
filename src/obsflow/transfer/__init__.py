"""Two sites: the observatory agent sends each frame to the archive server exactly once.

:mod:`~obsflow.transfer.agent` is the agent's side (the
:class:`~obsflow.transfer.agent.Transferer` that empties its outbox);
:mod:`~obsflow.transfer.client` is the client of the protocol and its errors; the
server's side is the API's :mod:`~obsflow.api.transfer`. The outbox's state (``obsflow
status`` at an agent) is read with the site's status, :mod:`obsflow.catalog.status`.
"""
