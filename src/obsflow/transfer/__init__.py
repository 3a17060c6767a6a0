"""Two sites: the observatory agent sends each frame to the archive server exactly once.

:mod:`~obsflow.transfer.agent` is the agent's side (its outbox, the client of the
protocol); the server's side is the API's :mod:`~obsflow.api.transfer`.
"""
