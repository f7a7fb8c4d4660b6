"""A stand-in agent for the no-orphans test: runs a PluginSupervisor with
the grandchild fixture in WORKDIR (argv[1]), prints the plugin's pids as one
JSON line, then waits to be killed."""

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plugins_fixtures.harness import Rig, config, install  # noqa: E402


async def main(workdir):
    rig = Rig(workdir)
    sha = install(workdir, "gc", "grandchild.py")
    failures = await rig.sup.sync([config("gc", sha=sha)])
    assert failures == [], failures
    fields = await rig.wait_record(lambda f: "grandchild" in f, data_type=7000)
    print(json.dumps(fields), flush=True)
    await asyncio.sleep(3600)


asyncio.run(main(sys.argv[1]))
