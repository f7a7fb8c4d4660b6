#!/bin/sh
# elkeid-agent post-install (deb postinst / rpm %post), as Elkeid's
# postinstall.sh does it:
#   install: enable the service (systemd, or sysvinit with cron), apply
#            SPECIFIED_IDC / SPECIFIED_AGENT_ID / SPECIFIED_REGION (and
#            ELKEID_SERVER / ELKEID_SERVICE_DISCOVERY / ELKEID_PUBLIC_SERVER)
#            from the installer's environment, reload, clean up, start;
#   upgrade: enable, reload, clean up (the running agent is not restarted:
#            after a self-update it exits and its supervisor starts the new
#            version; after a manual upgrade run "elkeidctl restart").
# The service type is $ELKEID_SERVICE_TYPE, else the one already in
# specified_env, else systemd when systemd is running, else sysvinit.
# Quiet on success (warnings excepted); on failure the command's output, one
# line naming what failed, and a non-zero exit. An agent that does not start
# is a warning, not a failure: the package is in place and enabled.
root=/etc/elkeid
ctl=$root/elkeidctl

fail() {
    echo "elkeid-agent: post-install failed: $*" >&2
    exit 1
}

quiet() {
    out=$("$@" 2>&1)
    rc=$?
    if [ "$rc" -ne 0 ]; then
        [ -n "$out" ] && printf '%s\n' "$out" >&2
        fail "'$*' exited with status $rc"
    fi
    printf '%s\n' "$out" | grep 'warning:' >&2
    return 0
}

case "${1:-}" in
    configure) if [ -z "${2:-}" ]; then action=install; else action=upgrade; fi ;;
    1) action=install ;;
    [2-9]|[1-9][0-9]*) action=upgrade ;;
    *) exit 0 ;;  # abort-upgrade, abort-remove, ...: nothing to undo
esac

current=$(sed -n 's/^[[:space:]]*service_type[[:space:]]*=[[:space:]]*//p' \
    "$root/specified_env" 2>/dev/null | tail -n 1 | tr -d "\"' \r")
type=${ELKEID_SERVICE_TYPE:-$current}
if [ -z "$type" ]; then
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        type=systemd
    elif command -v update-rc.d >/dev/null 2>&1 || command -v chkconfig >/dev/null 2>&1; then
        type=sysvinit
    else
        fail "systemd is not running and neither update-rc.d nor chkconfig is installed"
    fi
fi

enable_service() {
    if [ "$type" = sysvinit ]; then
        mkdir -p /etc/init.d /etc/cron.d || fail "cannot create /etc/init.d or /etc/cron.d"
        cp "$root/elkeid-agent.sysvinit" /etc/init.d/elkeid-agent &&
            chmod 0755 /etc/init.d/elkeid-agent || fail "cannot install /etc/init.d/elkeid-agent"
    fi
    [ "$type" = "$current" ] || quiet "$ctl" set --service_type="$type"
    quiet "$ctl" enable
}

set_env() {
    set --
    [ -n "${SPECIFIED_IDC:-}" ] && set -- "$@" --idc="$SPECIFIED_IDC"
    [ -n "${SPECIFIED_AGENT_ID:-}" ] && set -- "$@" --id="$SPECIFIED_AGENT_ID"
    [ -n "${SPECIFIED_REGION:-}" ] && set -- "$@" --region="$SPECIFIED_REGION"
    [ -n "${ELKEID_SERVER:-}" ] && set -- "$@" --server="$ELKEID_SERVER"
    [ -n "${ELKEID_SERVICE_DISCOVERY:-}" ] &&
        set -- "$@" --service_discovery="$ELKEID_SERVICE_DISCOVERY"
    [ -n "${ELKEID_PUBLIC_SERVER:-}" ] && set -- "$@" --public_server="$ELKEID_PUBLIC_SERVER"
    [ $# -eq 0 ] || quiet "$ctl" set "$@"
}

enable_service
if [ "$action" = install ]; then
    set_env
fi
quiet "$ctl" service-reload
quiet "$ctl" cleanup
if [ "$action" = install ]; then
    # The package is installed and enabled whatever happens here. An agent
    # that refuses to start says why in one line (no endpoint, missing TLS
    # files: configuration often arrives after the package); that is shown,
    # and the service manager (systemd's Restart=, sysvinit's cron check)
    # starts it once the configuration is fixed.
    if out=$("$ctl" start 2>&1); then
        printf '%s\n' "$out" | grep 'warning:' >&2
    else
        [ -n "$out" ] && printf '%s\n' "$out" >&2
        echo "elkeid-agent: post-install: warning: installed and enabled, but the agent did" \
            "not start (above); it starts once that is fixed (or: $ctl start)" >&2
    fi
fi
exit 0
