"""Builds the optional C hot path (accel/) as elkeid_agent._accel.

Everything else is in pyproject.toml. The extension uses the stable ABI of
CPython 3.9, so one binary (``_accel.abi3.so``, wheel tag ``cp39-abi3``)
serves every CPython 3.9-3.13. Without a compiler or Python's headers, or
when compilation fails, the build says so in one line and the package
installs without it: the pure-Python path is used (elkeid_agent/native.py).
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ACCEL = Extension(
    "elkeid_agent._accel",
    sources=["accel/elkeid_accel.c"],
    py_limited_api=True,
    define_macros=[("Py_LIMITED_API", "0x03090000")],
    extra_compile_args=["-O2", "-std=c99"],
)


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install because of accel/."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler at all (distutils' CCompilerError/PlatformError)
            self._skip(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # compiler or headers missing, or the source fails to compile
            self._skip(exc)

    @staticmethod
    def _skip(exc):
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if len(reason) > 160:  # a failed compiler's message is its whole command line
            reason = reason[:157] + "..."
        sys.stderr.write("elkeid-agent: accel/ not built (%s); the pure-Python path will be used\n"
                         % reason)


setup(
    ext_modules=[ACCEL],
    cmdclass={"build_ext": OptionalBuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
