"""Where records leave and commands arrive: service discovery and endpoint
order (``endpoints``), the mutual-TLS channel (``channel``) and the Transfer
stream shell with FileExt uploads (``stream``).
"""

from .stream import Transport  # noqa: F401
