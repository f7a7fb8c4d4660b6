"""Where records wait between their producers and the stream: the bounded
in-memory ``RecordQueue`` (two priorities, counted drops, requeue).
"""

from .queue import HIGH, NORMAL, RecordQueue  # noqa: F401
