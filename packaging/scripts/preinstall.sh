#!/bin/sh
# elkeid-agent pre-install (deb preinst / rpm %pre).
# Refuses to install where the agent could not run: it needs a service
# manager (systemd, or update-rc.d/chkconfig plus cron as Elkeid requires)
# and a CPython 3.9-3.13 for the zipapp. Quiet on success; on failure one
# clear line on stderr and a non-zero exit, so the package manager stops.
fail() {
    echo "elkeid-agent: pre-install failed: $*" >&2
    exit 1
}

if [ -n "${ELKEID_SERVICE_TYPE:-}" ] && [ "$ELKEID_SERVICE_TYPE" != systemd ] &&
        [ "$ELKEID_SERVICE_TYPE" != sysvinit ]; then
    fail "ELKEID_SERVICE_TYPE must be systemd or sysvinit, got '$ELKEID_SERVICE_TYPE'"
fi

if command -v systemctl >/dev/null 2>&1 && [ "${ELKEID_SERVICE_TYPE:-}" != sysvinit ]; then
    :
elif command -v update-rc.d >/dev/null 2>&1 || command -v chkconfig >/dev/null 2>&1; then
    command -v crontab >/dev/null 2>&1 ||
        fail "with update-rc.d or chkconfig (no systemd), cron must be installed (no crontab found)"
else
    fail "the system must have one of systemctl, update-rc.d, chkconfig"
fi

check='import sys; sys.exit(not (sys.implementation.name == "cpython" and (3, 9) <= sys.version_info[:2] <= (3, 13)))'
for p in ${ELKEID_PYTHON:-} python3 python3.13 python3.12 python3.11 python3.10 python3.9; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -sE -c "$check" >/dev/null 2>&1; then
        exit 0
    fi
done
have=$(python3 -V 2>&1) || have="no python3"
fail "no CPython 3.9 to 3.13 in PATH ($have); install one (e.g. python3.11) first"
