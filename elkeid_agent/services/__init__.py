"""Local services: third-party agents (filebeat, telegraf, node_exporter,
custom) this host keeps alive, declared in a local file rather than by the
server (``config``).
"""
