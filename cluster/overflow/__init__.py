"""Overflow batches: a saturated worker's frames processed by its NVLink peer against borrowed reference caches.

When a camera's frame queue on the home worker is full, the oldest frame goes to the ``OverflowSender`` (the
queues' overflow sink, daemon.framequeue) instead of being dropped. The sender batches such frames (up to
``workers.overflow.max_batch`` frames or ``max_wait_ms``), lends each camera's current delta state with the batch
(daemon.guest.borrow: DYCS bytes, or CUDA IPC handles of the reference arrays that the peer reads over NVLink) and
sends it to its peer's ``guest_process`` (one batch in flight per home). The peer runs the frames as a guest and
returns their results; the home publishes them itself.

Order: the ``OrderGate`` sits between the runtime and the sequence numbering (cluster.sequence). A frame handed to
the peer is *pending*; results of the same camera with a later frame seq are held until every earlier pending
frame is settled (its result came back, or it was given up). A result that comes back waits in turn for the
home's own frames taken before it was handed over (``FrameQueues.last_taken`` when it was offered; the pipeline
finishes a camera's frames in order). Everything goes out in frame order and is numbered, so the camera's messages
stay in capture order with contiguous numbers: no reordering, no duplicate, no gap. A frame whose result does
not come back within ``timeout_ms`` (peer absent, slow or failing) is given up: counted as dropped, exactly like a
frame the queue dropped, and the held results go on; a result arriving later is discarded and counted (``late``).
Nothing of this blocks the home's pipeline: the sink only appends to a bounded list (``max_pending``; beyond it
the frame is dropped), and the gate only holds results.

Overflow comes first; group spill-over (cluster.spill) judges only the frames overflow could not place (the
queues' ``dropped`` counts), so a group moves only when its GPU keeps dropping with overflow on.
"""

from cluster.overflow.gate import OrderGate
from cluster.overflow.guest import GuestHost
from cluster.overflow.sender import OverflowMetrics, OverflowSender, PeerLink

__all__ = ["GuestHost", "OrderGate", "OverflowMetrics", "OverflowSender", "PeerLink"]
