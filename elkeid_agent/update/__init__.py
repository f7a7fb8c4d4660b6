"""Safe updates of the agent itself and of local services' binaries.

Where an update goes (README "Updates"; docs/update.md has the details):

- ``offer.py``: what the server asked for (the ``elkeid-agent`` entry of a
  configs list, or a service UpdateRequest task) and whether this host can
  apply it: versions, package kinds, the downgrade rule. No I/O.
- ``verify.py``: size, sha256 and detached-signature checks of the exact
  downloaded bytes (``cryptography`` for signatures; fails closed).
- ``journal.py``: the update journal (SQLite in ``<workdir>/update/``): one
  row per attempt with its state machine, the versions refused after a
  failed trial, and the trial's health marks. Every process that takes part
  (the old agent, the guard, the new agent, elkeidctl) reads and writes it.
- ``updater.py``: the agent side: download, verify, back up, hand over to
  the guard; reports results the journal records.
- ``guard.py``: the process that outlives the switch: installs, restarts
  through the service manager (or waits for the re-exec), watches the
  trial, rolls back. It runs from the backup copy of the old version.
- ``trial.py``: the new version's side of the trial (marks itself healthy
  once connected and heartbeating) and reporting of finished updates.
- ``services.py``: the same pipeline for a local service's binary.

Host effects (dpkg, rpm, systemctl, systemd-run, renames, spawning the
guard) are in ``elkeid_agent/osfx/install.py``.
"""
