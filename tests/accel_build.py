"""Compile accel/ for the tests and load the result.

The differential tests compare the C functions of *this checkout's* source
with the pure-Python ones, so they build ``accel/elkeid_accel.c`` themselves
(into a temporary directory, optionally with sanitizers) rather than rely
on whatever binary an install left behind. Without gcc or Python's headers
they skip, except under CI=true where they fail (debroot.unavailable).
"""

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sysconfig

from debroot import unavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "accel", "elkeid_accel.c")
LIMITED_API = "0x03090000"
SANITIZE = ("-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all")


def compile_accel(out_dir, extra=(), cc="gcc", include=None):
    """Path of a freshly built ``_accel.abi3.so`` in ``out_dir``."""
    if shutil.which(cc) is None:
        unavailable("%s is not installed (needed to build accel/)" % cc)
    include = include or sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        unavailable("Python.h is not in %s (needed to build accel/)" % include)
    out = os.path.join(out_dir, "_accel.abi3.so")
    cmd = [cc, "-shared", "-fPIC", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-std=c99",
           "-DPy_LIMITED_API=" + LIMITED_API, "-I" + include, *extra, SOURCE, "-o", out]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert r.returncode == 0, "%s failed:\n%s" % (" ".join(cmd), r.stdout.decode("utf-8", "replace"))
    return out


def load(path):
    """Import a built ``_accel`` from ``path`` (a module of its own, not
    elkeid_agent._accel, so the agent's choice is untouched)."""
    loader = importlib.machinery.ExtensionFileLoader("_accel", path)
    spec = importlib.util.spec_from_file_location("_accel", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
