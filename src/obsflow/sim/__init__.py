"""Simulated observatory, for the demo and the tests: frames of a night
(:mod:`~obsflow.sim.simulate`), an EPICS IOC announcing them (:mod:`~obsflow.sim.ioc`),
the live view of a night (:mod:`~obsflow.sim.live`) and ``obsflow demo``
(:mod:`~obsflow.sim.demo`)."""
