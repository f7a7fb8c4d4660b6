"""Print how long the zipapp takes to start: first start (extracts into an
empty cache) and second start (reuses it), for each CPython found, plus
elkeidctl (runs straight from the archive). Numbers only; nothing asserts.

    python3 packaging/measure_start.py dist/elkeid-agent.pyz [python ...]

"Start" is the time until the agent has imported everything it runs on
(grpc included) and read its settings: the command is ``run`` with a bad
setting, so it stops right there instead of connecting anywhere.
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

AGENT = ["run", "--workdir", "/nonexistent-elkeid", "--heartbeat-interval", "bogus"]


class Failed(Exception):
    pass


def timed(argv, env, expect):
    """Seconds ``argv`` took; Failed if its stderr lacks ``expect``."""
    t = time.monotonic()
    p = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    elapsed = time.monotonic() - t
    if expect not in p.stdout + p.stderr:
        raise Failed("%s: %s" % (" ".join(argv), (p.stdout + p.stderr).decode()[-500:]))
    return elapsed


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def main(argv):
    if not argv:
        print(__doc__.strip().splitlines()[2].strip())
        return 2
    pyz = os.path.abspath(argv[0])
    pythons = argv[1:] or sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python")) or \
        [shutil.which("python3")]
    print("zipapp %s: %.1f MiB" % (pyz, os.path.getsize(pyz) / 1048576.0))
    print("%-50s %10s %11s %14s %10s" % ("python", "first (s)", "second (s)", "elkeidctl (s)",
                                         "cache MiB"))
    for py in pythons:
        version = subprocess.run([py, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 stdout=subprocess.PIPE).stdout.decode().strip()
        if not (3, 9) <= tuple(int(x) for x in version.split(".")) <= (3, 13):
            continue
        cache = tempfile.mkdtemp(prefix="elkeid-measure-")
        env = {"PATH": "/usr/bin:/bin", "ELKEID_AGENT_CACHE": cache}
        try:
            firsts, seconds = [], []
            ok = b"heartbeat interval must be a number"
            for _ in range(3):
                shutil.rmtree(cache)
                os.mkdir(cache, 0o700)
                firsts.append(timed([py, pyz] + AGENT, env, ok))
                seconds.append(median([timed([py, pyz] + AGENT, env, ok) for _ in range(3)]))
            ctl = median([timed([py, pyz, "ctl", "--version"], env, b"elkeidctl")
                          for _ in range(5)])
            size = sum(os.path.getsize(os.path.join(b, f))
                       for b, _d, fs in os.walk(cache) for f in fs) / 1048576.0
        except Failed as e:
            print("%s: did not start as expected: %s" % (py, e))
            continue
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        print("%-50s %10.2f %11.2f %14.2f %10.1f" % ("%s (%s)" % (py, version), median(firsts),
                                                     median(seconds), ctl, size))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
