"""edgeloop fleet: the fleet manager.  The front door is :class:`fleet.app.FleetApp`.

Where each decision is made:

    app.py            builds, starts and stops everything below (``edgeloop fleet serve`` runs it)
    policy.py         whether to retrain now: ``decide(policy, snapshot)``  (worker.py asks it on a period)
    retrain.py        the retraining job and its gate (accept or reject the candidate)
    rollout.py        the rollout state machine: next wave, halt, roll back (rollout_driver.py does its I/O)
    canary*.py        whether a wave is healthy (canary vs control group)
    ingest*.py        what devices send: decode, check, batch, write, receipt
    registry.py       the database facade; one repository per aggregate in repos/
    api.py, dashboard/  HTTP: JSON API, bundles, the operator dashboard
"""
