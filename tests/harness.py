"""Test-side names for the shared process launchers."""

from elkeid_devtools.launchers import (AgentProc, DevCenterProc, unwrap, wait_for,  # noqa: F401
                                       wait_until)
