"""Where records leave and commands arrive: service discovery and endpoint
order (``endpoints``), the mutual-TLS channel (``channel``), the TLS
credentials and their rotation (``credentials``, ``tlswatch``) and the
Transfer stream shell with FileExt uploads (``stream``).

``Transport`` is imported on first use: elkeidctl reads certificates
through ``credentials`` without loading grpc.
"""


def __getattr__(name):
    if name == "Transport":
        from .stream import Transport
        return Transport
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
