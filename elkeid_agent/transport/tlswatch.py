"""The TLS files, watched: rotation without a restart.

``CredentialWatcher`` owns the credential set in use. It re-reads the CA,
certificate and key every ``tls_check_seconds`` and on SIGHUP (``check_now``),
compares the contents' sha256 (not mtimes: a cert manager's copy may keep
them, and a touched file is no rotation), validates a changed set with the
sans-I/O core (transport/credentials.py) and hands a good one to
``on_rotate`` (the Transport uses it for the next dial and re-establishes
the stream at a quiet moment). Files are opened by path at every check, so
a symlink swap (a cert manager's ``..data`` link) is followed.

A changed set that fails is never used: the set in use stays in memory,
one line names the file and the problem, ``tls_reload_failures{reason}``
counts it and the agent is abnormal (``tls``) until a good set loads or
the files are back to the set in use. A failing content is reported once,
not at every check. It is first re-checked one interval later: any
writer that is not atomic (``cp`` of the certificate and then the key, an
editor, a manager writing file by file) passes through states that are
invalid for a moment, and a set half-written must be retried, not
reported, let alone half-applied (the three files are only ever used
together).

Expiry: ``tls_cert_expiry_days`` and ``tls_ca_expiry_days`` gauges (the
heartbeat's ``cert_expire_days`` / ``ca_expire_days`` read the same), and a
warning line below ``cert_expiry_warn_days``, at most once a day each.
"""

import asyncio
import json
import logging
import os
import time

from . import credentials

log = logging.getLogger(__name__)

STATE_KEY = "tls"
WARN_EVERY = 86400.0
IN_USE_FILE = "tls-in-use.json"  # <workdir>/tmp/: what elkeidctl status shows


class CredentialWatcher:
    def __init__(self, settings, metrics, state, current, on_rotate=None, clock=time.time):
        """``current``: the CredentialSet the agent started with."""
        self.settings = settings
        self.metrics = metrics
        self.state = state
        self.current = current
        self.on_rotate = on_rotate
        self._clock = clock
        self._paths = credentials.tls_paths(settings)
        self._wake = asyncio.Event()
        self._seen_failing = None  # key of a failure seen once (the grace)
        self._reported = None      # key of the failure logged last
        self._warned = {}          # "cert"/"ca" -> when the expiry warning was logged
        metrics.describe("tls_rotations", "new TLS credential sets taken into use")
        metrics.describe("tls_reload_failures", "changed TLS files refused, by reason")
        metrics.describe("tls_cert_expiry_days", "days until the client certificate in use expires")
        metrics.describe("tls_ca_expiry_days", "days until the CA in use expires")
        metrics.set("tls_cert_expiry_days", lambda: self.days_left("cert"))
        metrics.set("tls_ca_expiry_days", lambda: self.days_left("ca"))
        if current.problem is not None:
            self.state.set_abnormal(STATE_KEY, "TLS files in use: %s" % current.problem)
        self._write_in_use()

    def days_left(self, which):
        info = self.current.cert_info if which == "cert" else self.current.ca_info
        days = info.days_left(self._clock())
        return 0.0 if days is None else days

    def check_now(self):
        """SIGHUP: check at once instead of at the next interval."""
        self._wake.set()

    async def run(self):
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.tls_check_seconds)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            self.check()

    def check(self):
        """One look at the files; returns the new set when one was taken
        into use. Three small files and a ~10 ms in-memory handshake: cheap
        enough for the loop thread."""
        now = self._clock()
        try:
            self._check(now)
        finally:
            self._warn_expiry(now)

    def _check(self, now):
        try:
            data = credentials.read_files(self._paths)
        except credentials.CredentialError as e:
            self._failed(e, str(e))
            return None
        fp = credentials.fingerprint(data["ca"], data["cert"], data["key"])
        if fp == self.current.fingerprint:
            self._back_to_current()
            return None
        try:
            new = credentials.validate(data["ca"], data["cert"], data["key"], now, self._paths)
        except credentials.CredentialError as e:
            self._failed(e, fp)
            return None
        self._apply(new)
        return new

    def _failed(self, e, key):
        if key == self._reported:
            return
        if key != self._seen_failing:
            self._seen_failing = key  # maybe mid-write: look again next time
            return
        self._reported = key
        self.metrics.inc("tls_reload_failures", reason=e.reason)
        self.state.set_abnormal(STATE_KEY, "TLS files refused, the previous set stays in "
                                "use: %s" % e)
        log.error("TLS files not reloaded, keeping the set in use: %s", e,
                  extra={"console": True})

    def _back_to_current(self):
        self._seen_failing = self._reported = None
        if self.current.problem is None:
            self.state.clear(STATE_KEY)

    def _apply(self, new):
        self.current = new
        self._seen_failing = self._reported = None
        self._warned.clear()
        self.state.clear(STATE_KEY)
        self.metrics.inc("tls_rotations")
        info = new.cert_info
        log.info("TLS files rotated: client certificate %s (issuer %s, serial %s) valid until "
                 "%s; used from the next connection", info.subject, info.issuer, info.serial,
                 info.not_after_text, extra={"console": True})
        self._write_in_use()
        if self.on_rotate is not None:
            self.on_rotate(new)

    def _warn_expiry(self, now):
        threshold = self.settings.cert_expiry_warn_days
        for which, info in (("cert", self.current.cert_info), ("ca", self.current.ca_info)):
            days = info.days_left(now)
            if days is None or days >= threshold:
                continue
            last = self._warned.get(which)
            if last is not None and now - last < WARN_EVERY:
                continue
            self._warned[which] = now
            if days < 0:
                log.warning("TLS %s %s in use expired %.1f days ago (%s)", which,
                            self._paths[which], -days, info.not_after_text,
                            extra={"console": True})
            else:
                log.warning("TLS %s %s in use expires in %.1f days (%s): rotate it", which,
                            self._paths[which], days, info.not_after_text,
                            extra={"console": True})

    def _write_in_use(self):
        """Best effort: elkeidctl shows what the agent uses, which may not
        be what the files hold (a refused newer set)."""
        path = os.path.join(self.settings.workdir, "tmp", IN_USE_FILE)
        try:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"pid": os.getpid(), "set": self.current.as_dict(self._clock())}, f)
            os.replace(tmp, path)
        except OSError as e:
            log.debug("cannot write %s: %s", path, e)
