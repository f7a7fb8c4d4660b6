#!/bin/sh
# elkeid-agent pre-remove (deb prerm / rpm %preun), as Elkeid's
# preremove.sh does it, on removal only (not on upgrade): disable the
# service, stop the agent (and its plugins) and its local services, unlink
# the systemd unit, remove its cgroups, logs, plugins, services' state and
# work dirs (services.yaml, the operator's, stays), the disk spool in its
# default place (records not yet delivered go with the agent), machine-id,
# specified_env, cron file, pid files and the zipapp's extraction cache,
# so that removing the package leaves nothing behind.
# Quiet on success; if disabling the service fails: its output, one line
# and a non-zero exit (the package stays installed: fix the cause and remove
# it again).
root=/etc/elkeid
ctl=$root/elkeidctl

fail() {
    echo "elkeid-agent: pre-remove failed: $*" >&2
    exit 1
}

quiet() {
    out=$("$@" 2>&1)
    rc=$?
    if [ "$rc" -ne 0 ]; then
        [ -n "$out" ] && printf '%s\n' "$out" >&2
        fail "'$*' exited with status $rc"
    fi
    return 0
}

case "${1:-}" in
    remove|0) ;;
    *) exit 0 ;;  # upgrade, deconfigure, failed-upgrade: keep everything
esac

# A missing or corrupt specified_env must not make the package impossible
# to remove: recreate it with the service type this host evidently uses.
"$ctl" status >/dev/null 2>&1
if [ $? -eq 6 ]; then
    if [ -f /etc/init.d/elkeid-agent ] && [ ! -d /run/systemd/system ]; then
        type=sysvinit
    else
        type=systemd
    fi
    echo "elkeid-agent: pre-remove: warning: $root/specified_env is missing or corrupt;" \
        "assuming service_type=$type" >&2
    rm -f "$root/specified_env"
    quiet "$ctl" set --service_type="$type"
fi

quiet "$ctl" disable
rm -f /etc/init.d/elkeid-agent
# As in Elkeid, a failed stop does not block the removal (systemctl cannot
# stop anything where systemd is not running); it is reported, though.
if ! out=$("$ctl" stop 2>&1); then
    printf '%s\n' "$out" >&2
    echo "elkeid-agent: pre-remove: warning: stopping the agent failed; removing anyway" >&2
fi
# Local services outlive the agent (each its own transient unit, or its own
# session): a removed agent must not leave them running unsupervised.
if ! out=$("$ctl" services stop-all 2>&1); then
    printf '%s\n' "$out" >&2
    echo "elkeid-agent: pre-remove: warning: stopping the local services failed;" \
        "removing anyway" >&2
fi
# elkeidctl disable leaves the unit linked (known to systemd, not started
# at boot); unlink it now that it is stopped, if the link is ours.
unit_link=/etc/systemd/system/elkeid-agent.service
if [ -L "$unit_link" ] && [ "$(readlink "$unit_link")" = "$root/elkeid-agent.service" ]; then
    rm -f "$unit_link"
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload >/dev/null 2>&1
fi

for m in "$root"/cgroup/*; do
    [ -d "$m" ] && umount "$m" >/dev/null 2>&1
done
rm -rf "$root/cgroup" "$root/log" "$root/plugin" "$root/tmp" "$root/services" "$root/spool"
rm -f "$root/machine-id" "$root/specified_env" "$root/plugin.sock" "$root/stderr" \
    "$root/stdout"
rm -f /etc/cron.d/elkeid-agent /var/run/elkeid-agent.pid /var/run/elkeidctl.pid
rm -rf /var/cache/elkeid-agent
rm -f /bin/elkeidctl /usr/bin/elkeidctl /usr/local/bin/elkeidctl
exit 0
