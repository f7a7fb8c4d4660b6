"""Test-side names for the shared process launchers."""

from elkeid_devtools.launchers import AgentProc, DevCenterProc, unwrap, wait_until  # noqa: F401
