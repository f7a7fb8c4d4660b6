"""Build the sample plugin as an Elkeid plugin executable.

An Elkeid plugin is one executable file at ``<workdir>/plugin/<name>/<name>``.
This builds a zipapp (stdlib ``zipfile``: a ``#!`` line followed by a zip)
holding only what the plugin needs - ``elkeid_agent/{errors,wire,native}.py``,
``elkeid_agent/sdk/``, the sample plugin and minimal package ``__init__``
files - so the host needs a Python >= 3.9 and nothing else. The archive is
byte-for-byte reproducible (fixed timestamps and order), so its sha256 is
stable across builds.

    python -m elkeid_devtools.sample_plugin.build exe OUT [--python INTERP]
    python -m elkeid_devtools.sample_plugin.build service-exe OUT [--python INTERP]
    python -m elkeid_devtools.sample_plugin.build install WORKDIR [--name NAME] [--config FILE]
    python -m elkeid_devtools.sample_plugin.build tar-gz OUT [--name NAME] [--config FILE]
        [--version V] [--url URL ...]

``--python`` is the interpreter in the ``#!`` line (default
``/usr/bin/env python3``; the agent starts plugins with a PATH of the usual
system directories). ``tar-gz`` prints the plugin config for AgentCenter's
``POST /command/`` (sha256 of the archive, signature = sha256 of the
executable). ``service-exe`` builds the same agent in its standalone service
mode (``service.py``: run as ``OUT --config FILE``, what a services file
names as ``binary_path``); it adds only ``service.py`` to the archive.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import pkgutil
import sys
import tarfile
import tempfile
import zipfile

import elkeid_agent

DEFAULT_INTERPRETER = "/usr/bin/env python3"
_EPOCH = (1980, 1, 1, 0, 0, 0)
# (package, file inside it) of everything the plugin imports.
# native.py: wire.py asks it for the C twins; in a zip they never load, so
# the plugin runs the pure path.
_MODULES = (("elkeid_agent", "errors.py"), ("elkeid_agent", "wire.py"),
            ("elkeid_agent", "native.py"), ("elkeid_agent", "sdk/__init__.py"),
            ("elkeid_devtools", "sample_plugin/__init__.py"))
_SERVICE_MODULES = _MODULES + (("elkeid_devtools", "sample_plugin/service.py"),)
_MAIN = b"from elkeid_devtools.sample_plugin import main\nraise SystemExit(main())\n"
_SERVICE_MAIN = (b"from elkeid_devtools.sample_plugin.service import main\n"
                 b"raise SystemExit(main())\n")


def zipapp_bytes(interpreter=DEFAULT_INTERPRETER, service=False):
    """The executable's bytes (the plugin, or with ``service`` the standalone service)."""
    files = [("__main__.py", _SERVICE_MAIN if service else _MAIN),
             ("elkeid_agent/__init__.py",
              ('"""Subset of elkeid_agent for the sample plugin."""\n__version__ = %r\n'
               % elkeid_agent.__version__).encode()),
             ("elkeid_devtools/__init__.py", b'"""The sample plugin only."""\n')]
    for package, rel in (_SERVICE_MODULES if service else _MODULES):
        data = pkgutil.get_data(package, rel)
        if data is None:
            raise RuntimeError("cannot read %s/%s" % (package, rel))
        files.append((package + "/" + rel, data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in sorted(files):
            info = zipfile.ZipInfo(name, _EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return b"#!" + interpreter.encode() + b"\n" + buf.getvalue()


def build_exe(out, interpreter=DEFAULT_INTERPRETER, service=False):
    """Write the executable (mode 0700) atomically; returns its sha256."""
    data = zipapp_bytes(interpreter, service)
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".build-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o700)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return hashlib.sha256(data).hexdigest()


def install(workdir, name="sample", interpreter=DEFAULT_INTERPRETER, config=None):
    """Put the plugin at ``<workdir>/plugin/<name>/<name>`` (plus
    ``config.json`` when ``config`` is a dict). Returns the sha256 to put in
    the plugin config's ``signature``/``sha256``."""
    directory = os.path.join(workdir, "plugin", name)
    digest = build_exe(os.path.join(directory, name), interpreter)
    if config is not None:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return digest


def tar_gz_bytes(name, interpreter=DEFAULT_INTERPRETER, config=None):
    """(archive bytes, sha256 of the executable inside)."""
    exe = zipapp_bytes(interpreter)
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            members = [(name, exe, 0o700)]
            if config is not None:
                members.append(("config.json", json.dumps(config, indent=2).encode(), 0o600))
            for member, data, mode in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                info.mode = mode
                info.mtime = 0
                tf.addfile(info, io.BytesIO(data))
    return raw.getvalue(), hashlib.sha256(exe).hexdigest()


def plugin_config(name, version, archive, signature, urls, detail=""):
    """The config entry for AgentCenter's command API (docs/protocol.md section 8)."""
    return {"name": name, "type": "tar.gz", "version": version,
            "sha256": hashlib.sha256(archive).hexdigest(), "signature": signature,
            "download_url": list(urls), "detail": detail}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m elkeid_devtools.sample_plugin.build",
                                description="Build the sample plugin executable.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd in ("exe", "service-exe", "install", "tar-gz"):
        s = sub.add_parser(cmd)
        s.add_argument("out", help="output file (exe, tar-gz) or agent workdir (install)")
        s.add_argument("--python", default=DEFAULT_INTERPRETER,
                       help="interpreter for the #! line (default: %(default)s)")
        if cmd not in ("exe", "service-exe"):
            s.add_argument("--name", default="sample")
            s.add_argument("--config", help="JSON config file to ship as config.json")
        if cmd == "tar-gz":
            s.add_argument("--version", default="1.0.0")
            s.add_argument("--url", action="append", default=[],
                           help="download URL to put in the printed config")
    args = p.parse_args(argv)
    config = None
    if getattr(args, "config", None):
        with open(args.config) as f:
            config = json.load(f)
    if args.cmd in ("exe", "service-exe"):
        print(build_exe(args.out, args.python, service=args.cmd == "service-exe"))
    elif args.cmd == "install":
        digest = install(args.out, args.name, args.python, config)
        print(json.dumps({"name": args.name, "type": "exe", "sha256": digest,
                          "signature": digest}))
    else:
        data, signature = tar_gz_bytes(args.name, args.python, config)
        with open(args.out, "wb") as f:
            f.write(data)
        print(json.dumps(plugin_config(args.name, args.version, data, signature, args.url)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
