"""Misbehaving plugin scripts and the harness the plugin tests share."""
