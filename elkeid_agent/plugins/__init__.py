"""Elkeid plugins: supervision, IPC, verified installation.

- ``supervisor.PluginSupervisor``: what the agent app drives.
- ``syncplan``: declarative sync as a pure function.
- ``ingest``: frame splitting and record validation (sans-I/O).
- ``policy``: restart/backoff, CPU/RSS limits, rate meters (sans-I/O).
- ``fetch``: local reuse, download, verification, safe unpacking, swap.
- ``runner``: one plugin process and its pipes.
- ``bench``: records/s from sample plugins into a RecordQueue.

See docs/plugins.md.
"""

from .policy import Policy
from .supervisor import PluginSupervisor
from .syncplan import PluginSpec, check_name, plan_sync

__all__ = ["PluginSupervisor", "Policy", "PluginSpec", "check_name", "plan_sync"]
