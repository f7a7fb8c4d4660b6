"""Declarative plugin sync (docs/protocol.md section 2) as a pure function.

``plan_sync(desired, running)`` turns the server's complete list of plugin
configs and what the supervisor currently has into actions; the supervisor
only executes them. Rules:
- a name must match ``^[0-9A-Za-z_-]+$`` (so no ``/``, ``.`` or ``..``), be
  at most 128 characters and not be the agent's own product name;
- same version present -> keep (revive it if it was given up as fatal);
- other version present -> replace; absent -> start;
- present but not listed -> remove (stop, forget, delete its directory);
- a name listed twice: the last entry wins (Elkeid keys configs by name),
  the earlier one is reported.
"""

import re
from dataclasses import dataclass
from typing import Optional, Tuple

NAME_RE = re.compile(r"^[0-9A-Za-z_-]+$")
# Room for "<name>.stderr" and ".<name>.stage-xxxxxxxx" in a 255-byte name.
MAX_NAME_LEN = 128
RESERVED_NAMES = frozenset({"elkeid-agent"})

START, KEEP, REPLACE, REVIVE, REMOVE, REJECT = (
    "start", "keep", "replace", "revive", "remove", "reject")


@dataclass(frozen=True)
class PluginSpec:
    """One plugin config, detached from protobuf."""
    name: str
    version: str = ""
    type: str = ""
    sha256: str = ""
    signature: str = ""
    urls: Tuple[str, ...] = ()
    detail: str = ""

    @classmethod
    def from_config(cls, cfg):
        return cls(name=cfg.name, version=cfg.version, type=cfg.type,
                   sha256=cfg.sha256, signature=cfg.signature,
                   urls=tuple(cfg.download_urls), detail=cfg.detail)

    @property
    def local_hash(self):
        """What the executable on disk must hash to for reuse (Elkeid:
        ``signature``, falling back to ``sha256``)."""
        return (self.signature or self.sha256).lower()

    @property
    def is_archive(self):
        return self.type == "tar.gz"


def check_name(name) -> Optional[str]:
    """None if ``name`` may be a plugin name, else why not."""
    if not isinstance(name, str) or name == "":
        return "empty plugin name"
    if len(name) > MAX_NAME_LEN:
        return "plugin name longer than %d characters" % MAX_NAME_LEN
    if not NAME_RE.match(name):
        return "plugin name %r has characters outside [0-9A-Za-z_-]" % name
    if name in RESERVED_NAMES:
        return "plugin name %r is reserved for the agent" % name
    return None


@dataclass(frozen=True)
class Action:
    kind: str
    name: str
    spec: Optional[PluginSpec] = None
    reason: str = ""


def plan_sync(desired, running):
    """``desired``: list of PluginSpec in server order. ``running``: {name:
    (version, fatal)} for every plugin the supervisor holds (running, in
    backoff or fatal). Returns a list of Actions: rejects first, then
    removals, then starts/replaces/revives/keeps in server order."""
    rejects = []
    wanted = {}
    order = []
    for spec in desired:
        problem = check_name(spec.name)
        if problem:
            rejects.append(Action(REJECT, spec.name, spec, problem))
            continue
        if spec.name in wanted:
            rejects.append(Action(REJECT, spec.name, wanted[spec.name],
                                  "listed more than once; the last entry is used"))
            order.remove(spec.name)
        wanted[spec.name] = spec
        order.append(spec.name)
    removes = [Action(REMOVE, name, reason="no longer listed")
               for name in sorted(running) if name not in wanted]
    loads = []
    for name in order:
        spec = wanted[name]
        if name not in running:
            loads.append(Action(START, name, spec))
            continue
        version, fatal = running[name]
        if version != spec.version:
            loads.append(Action(REPLACE, name, spec, "version %r -> %r" % (version, spec.version)))
        elif fatal:
            loads.append(Action(REVIVE, name, spec, "listed again after it was given up"))
        else:
            loads.append(Action(KEEP, name, spec))
    return rejects + removes + loads
