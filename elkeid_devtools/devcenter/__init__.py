"""Development AgentCenter: the whole Elkeid loop on one machine.

A gRPC server with mutual TLS speaking Elkeid's Transfer and FileExt
services, AgentCenter's HTTP command API on loopback, a SQLite store of every
record, and a live terminal summary. The agent's integration tests and
benchmarks run against it; ``elkeid-devcenter`` (``python -m
elkeid_devtools.devcenter``) runs it by hand. See docs/devcenter.md.
"""

from .server import AgentNotConnected, DevCenter

__all__ = ["DevCenter", "AgentNotConnected"]
