"""edgeloop's device agent: numpy + onnxruntime (or LiteRT) + paho-mqtt + cryptography, never torch.

The front door is :class:`edge_agent.agent.Agent` (``edgeloop agent run`` runs it).
Where each decision is made:

    updates.py        every update and rollback decision: the boot counter (crashes only),
                      the load fallback, install / health check / switch, rollback, confirm
    deploy.py         fleet commands (deploy, rollback) on a job thread: download, then updates.py
    updater.py        the mechanics of an install: download, verify, unpack, health check
    slots.py          slots on disk, the atomic ``current`` pointer, the boot-counter files
    link*.py          the MQTT link: birth/Will, outbox draining, commands, receipts
    outbox*.py        the disk-backed outgoing queue (send_window.py: a sender's view of it)
    inference.py      loading a model and predicting; select.py picks the variant
    reports.py        drift reports and captured samples; telemetry.py the counters
    http.py           the local HTTP endpoint (limits: backlog, timeouts, body and pixel budgets)
"""

from core.errors import EdgeloopError

__all__ = ["EdgeloopError"]
