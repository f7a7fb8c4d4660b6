"""Where records wait between their producers and the stream: the bounded
in-memory ``RecordQueue`` (the agent's own records with a reserved share,
then plugin fd 5, then fd 4; counted drops; requeue), the disk ``Spool``
behind it (spool.py) and the drop log lines (drops.py).
"""

from .queue import AGENT, HIGH, NORMAL, Batch, RecordQueue  # noqa: F401
