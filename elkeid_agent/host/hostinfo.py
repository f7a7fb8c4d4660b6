"""Host facts for the PackagedData header and the heartbeat.

This module owns what the Go agent keeps in ``agent/host``: hostname, the
private/public IPv4/IPv6 lists (docs/protocol.md section 5) and the platform triple and
kernel facts (gopsutil v3 ``host.PlatformInformation`` / ``KernelVersion`` /
``KernelArch``, which Elkeid reports in every heartbeat).

Address classification is the pure function ``classify``; the enumeration is
a thin shell over one netlink RTM_GETADDR dump (the same source Go's
``net.Interfaces``/``Addrs`` reads), with an ioctl + /proc fallback for
sandboxes that forbid netlink. psutil is not used here at run time: a
netlink dump is already one system call, and psutil's getifaddrs names IPv4
alias addresses by label (``eth0:1``) where Go uses the link name, so it
could not give identical results on every host. Tests use it as an oracle.
"""

import array
import errno
import logging
import os
import re
import socket
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

# docs/protocol.md section 5: at most five private addresses of each family are sent.
MAX_PRIVATE = 5
SKIP_PREFIXES = ("lo", "docker")


@dataclass
class HostInfo:
    hostname: str = ""
    intranet_ipv4: List[str] = field(default_factory=list)
    extranet_ipv4: List[str] = field(default_factory=list)
    intranet_ipv6: List[str] = field(default_factory=list)
    extranet_ipv6: List[str] = field(default_factory=list)
    platform: str = ""
    platform_family: str = ""
    platform_version: str = ""
    kernel_version: str = ""
    arch: str = ""


# --- address classification (pure) -------------------------------------------------

def _is_private_v4(packed: bytes) -> bool:
    # docs/protocol.md section 5: exactly 172.16/12.
    a, b = packed[0], packed[1]
    return a == 10 or (a == 172 and 16 <= b <= 31) or (a == 192 and b == 168)


def _go_global_unicast_v4(packed: bytes) -> bool:
    """Go's net.IP.IsGlobalUnicast for an IPv4 address."""
    if packed == b"\xff\xff\xff\xff" or packed == b"\x00\x00\x00\x00":
        return False
    a, b = packed[0], packed[1]
    if a == 127 or (224 <= a <= 239) or (a == 169 and b == 254):
        return False
    return True


def _go_global_unicast_v6(packed: bytes) -> bool:
    if packed == bytes(16) or packed == bytes(15) + b"\x01":
        return False
    if packed[0] == 0xFF:
        return False
    if packed[0] == 0xFE and packed[1] & 0xC0 == 0x80:  # fe80::/10
        return False
    return True


def classify(addresses: Iterable[Tuple[str, str]]
             ) -> Tuple[List[str], List[str], List[str], List[str]]:
    """(intranet_ipv4, extranet_ipv4, intranet_ipv6, extranet_ipv6) of (ifname, ip) pairs.

    As the Go agent's host.RefreshHost: interfaces named lo*/docker* are
    skipped, and so is every address that is not global unicast (loopback,
    link-local, multicast, unspecified, broadcast). Order is kept; only the
    private lists are capped. IPv4-mapped IPv6 addresses count as IPv4, as
    Go's To4() makes them. Unparseable entries are skipped.
    """
    priv4, pub4, priv6, pub6 = [], [], [], []
    for ifname, text in addresses:
        if not isinstance(ifname, str) or ifname.startswith(SKIP_PREFIXES):
            continue
        try:
            ip = ip_address(str(text).split("%", 1)[0])
        except ValueError:
            log.debug("not an IP address on %s: %r", ifname, text)
            continue
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        packed = ip.packed
        if isinstance(ip, IPv4Address):
            if not _go_global_unicast_v4(packed):
                continue
            (priv4 if _is_private_v4(packed) else pub4).append(str(ip))
        else:
            if not _go_global_unicast_v6(packed):
                continue
            (priv6 if packed[0] == 0xFD else pub6).append(str(ip))
    return priv4[:MAX_PRIVATE], pub4, priv6[:MAX_PRIVATE], pub6


# --- netlink RTM_GETADDR ---------------------------------------------------------------

NETLINK_ROUTE = 0
RTM_GETADDR = 22
RTM_NEWADDR = 20
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
IFA_ADDRESS = 1
IFA_LOCAL = 2

_NLMSGHDR = struct.Struct("=IHHII")   # len type flags seq pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family prefixlen flags scope index
_RTATTR = struct.Struct("=HH")        # len type
_ADDR_LEN = {socket.AF_INET: 4, socket.AF_INET6: 16}

# A host has a handful of addresses; these bound a misbehaving dump.
MAX_DUMP_BYTES = 16 << 20
MAX_ADDRESSES = 65536
NETLINK_TIMEOUT = 2.0


class NetlinkError(OSError):
    """The kernel answered the dump with an error, or the dump broke off."""


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _pick_address(family: int, attrs: bytes) -> Optional[bytes]:
    """Go's newAddr: IFA_LOCAL when present (point-to-point), else IFA_ADDRESS."""
    want = _ADDR_LEN.get(family)
    if want is None:
        return None
    local = address = None
    pos = 0
    while pos + _RTATTR.size <= len(attrs):
        alen, atype = _RTATTR.unpack_from(attrs, pos)
        if alen < _RTATTR.size or pos + alen > len(attrs):
            break
        value = attrs[pos + _RTATTR.size:pos + alen]
        if atype == IFA_LOCAL and local is None:
            local = value
        elif atype == IFA_ADDRESS and address is None:
            address = value
        pos += _align4(alen)
    chosen = local if local is not None else address
    if chosen is None or len(chosen) != want:
        return None
    return chosen


def parse_addr_dump(buf: bytes, seq: int) -> Tuple[List[Tuple[int, int, bytes]], bool]:
    """Parse one recv() worth of an RTM_GETADDR dump.

    Returns ([(ifindex, family, packed address)], done). Messages of another
    sequence number are ignored; a truncated message ends the buffer. An
    interrupted dump (NLM_F_DUMP_INTR) is used as is, as Go does. Raises
    NetlinkError when the kernel reports an error.
    """
    out = []
    done = False
    pos = 0
    while pos + _NLMSGHDR.size <= len(buf):
        mlen, mtype, mflags, mseq, _mpid = _NLMSGHDR.unpack_from(buf, pos)
        if mlen < _NLMSGHDR.size or pos + mlen > len(buf):
            break
        body = buf[pos + _NLMSGHDR.size:pos + mlen]
        pos += _align4(mlen)
        if mseq != seq:
            continue
        if mtype == NLMSG_DONE:
            done = True
            break
        if mtype == NLMSG_ERROR:
            code = struct.unpack_from("=i", body)[0] if len(body) >= 4 else -errno.EIO
            if code != 0:
                raise NetlinkError(-code, "RTM_GETADDR: %s" % os.strerror(-code))
            continue
        if mtype != RTM_NEWADDR or len(body) < _IFADDRMSG.size:
            continue
        family, _plen, _flags, _scope, index = _IFADDRMSG.unpack_from(body)
        packed = _pick_address(family, body[_IFADDRMSG.size:])
        if packed is not None:
            out.append((index, family, packed))
    return out, done


def _netlink_dump() -> List[Tuple[int, int, bytes]]:
    seq = int.from_bytes(os.urandom(4), "little") or 1
    req = _NLMSGHDR.pack(_NLMSGHDR.size + _IFADDRMSG.size, RTM_GETADDR,
                         NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    req += _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_ROUTE) as s:
        s.settimeout(NETLINK_TIMEOUT)
        s.bind((0, 0))
        s.sendto(req, (0, 0))
        entries = []
        received = 0
        while True:
            chunk = s.recv(65536)
            if not chunk:
                raise NetlinkError(errno.EIO, "netlink socket closed mid-dump")
            received += len(chunk)
            got, done = parse_addr_dump(chunk, seq)
            entries.extend(got)
            if done:
                return entries
            if received > MAX_DUMP_BYTES or len(entries) > MAX_ADDRESSES:
                raise NetlinkError(errno.E2BIG, "address dump too large")


def _netlink_addresses() -> List[Tuple[str, str]]:
    entries = _netlink_dump()
    # if_nameindex lists links in the kernel's link-dump order, which is the
    # order Go's net.Interfaces() walks them in; addresses follow per link.
    links = socket.if_nameindex()
    order = {index: pos for pos, (index, _name) in enumerate(links)}
    names = dict(links)
    ranked = []
    for seqno, (index, family, packed) in enumerate(entries):
        if index not in names:
            continue  # the link vanished between the two dumps
        ranked.append((order[index], seqno, names[index], socket.inet_ntop(family, packed)))
    ranked.sort()
    return [(name, ip) for _o, _s, name, ip in ranked]


# --- fallback: SIOCGIFCONF (IPv4) and /proc/net/if_inet6 (IPv6) ---------------------------

SIOCGIFCONF = 0x8912
_IFREQ_SIZE = 40 if struct.calcsize("P") == 8 else 32
_IFCONF = struct.Struct("iP")
MAX_IFCONF_BYTES = 1 << 20


def parse_ifconf(data: bytes, ifreq_size: int = _IFREQ_SIZE) -> List[Tuple[str, str]]:
    """(label, IPv4) pairs from the ifreq array SIOCGIFCONF fills in."""
    out = []
    for pos in range(0, len(data) - ifreq_size + 1, ifreq_size):
        name = data[pos:pos + 16].split(b"\0", 1)[0].decode("utf-8", "replace")
        fam = struct.unpack_from("=H", data, pos + 16)[0]
        if fam == socket.AF_INET and name:
            out.append((name, socket.inet_ntoa(data[pos + 20:pos + 24])))
    return out


def _ioctl_ipv4() -> List[Tuple[str, str]]:
    import fcntl

    size = 64 * _IFREQ_SIZE
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        while True:
            buf = array.array("B", bytes(size))
            req = _IFCONF.pack(size, buf.buffer_info()[0])
            used = _IFCONF.unpack(fcntl.ioctl(s.fileno(), SIOCGIFCONF, req))[0]
            # A full buffer may mean it was cut short: retry larger.
            if used < size or size >= MAX_IFCONF_BYTES:
                return parse_ifconf(buf.tobytes()[:used])
            size *= 2


def parse_if_inet6(text: str) -> List[Tuple[int, str, str]]:
    """(ifindex, ifname, IPv6) triples from /proc/net/if_inet6."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6 or len(parts[0]) != 32:
            continue
        try:
            packed = bytes.fromhex(parts[0])
            index = int(parts[1], 16)
        except ValueError:
            continue
        out.append((index, parts[5], socket.inet_ntop(socket.AF_INET6, packed)))
    return out


def _fallback_addresses(root: str = "/") -> List[Tuple[str, str]]:
    ranked = []
    try:
        for seqno, (label, ip) in enumerate(_ioctl_ipv4()):
            name = label.split(":", 1)[0]
            try:
                index = socket.if_nametoindex(name)
            except OSError:
                index = 1 << 31
            ranked.append((index, 0, seqno, name, ip))
    except OSError as e:
        log.debug("SIOCGIFCONF failed: %s", e)
    try:
        with open(os.path.join(root, "proc/net/if_inet6"), encoding="ascii",
                  errors="replace") as f:
            text = f.read(MAX_IFCONF_BYTES)
        for seqno, (index, name, ip) in enumerate(parse_if_inet6(text)):
            ranked.append((index, 1, seqno, name, ip))
    except OSError as e:
        log.debug("/proc/net/if_inet6 unreadable: %s", e)
    ranked.sort()
    return [(name, ip) for _i, _f, _s, name, ip in ranked]


def interface_addresses(root: str = "/", use_netlink: bool = True) -> List[Tuple[str, str]]:
    """Every (interface name, address) on the host, in Go's net.Interfaces order."""
    if use_netlink:
        try:
            return _netlink_addresses()
        except (OSError, ValueError) as e:
            log.debug("netlink address dump failed, using ioctl and /proc: %s", e)
    return _fallback_addresses(root)


# --- platform (gopsutil v3 host.PlatformInformation) -------------------------------------

FAMILIES = {}
for _family, _platforms in (
        ("debian", ("debian", "ubuntu", "linuxmint", "raspbian", "Kylin", "cumuluslinux")),
        ("fedora", ("fedora",)),
        ("rhel", ("oracle", "centos", "redhat", "scientific", "enterpriseenterprise", "amazon",
                  "xenserver", "cloudlinux", "ibm_powerkvm", "rocky", "almalinux")),
        ("suse", ("suse", "opensuse", "opensuse-leap", "opensuse-tumbleweed",
                  "opensuse-tumbleweed-kubic", "sles", "sled", "caasp")),
        ("gentoo", ("gentoo",)), ("slackware", ("slackware",)), ("arch", ("arch",)),
        ("exherbo", ("exherbo",)), ("alpine", ("alpine",)), ("coreos", ("coreos",)),
        ("solus", ("solus",)), ("neokylin", ("neokylin",))):
    for _p in _platforms:
        FAMILIES[_p] = _family

MAX_RELEASE_FILE = 1 << 20
_RH_VERSION = re.compile(r"release (\d[\d.]*)", re.ASCII)
_SUSE_VERSION = re.compile(r"VERSION = ([\d.]+)", re.ASCII)
_SUSE_PATCH = re.compile(r"PATCHLEVEL = ([\d]+)", re.ASCII)


def _read_lines(path: str) -> Optional[List[str]]:
    """gopsutil common.ReadLines: lines without their newline; None if unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RELEASE_FILE)
    except OSError as e:
        log.debug("%s unreadable: %s", path, e)
        return None
    text = data.decode("utf-8", "replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _exists(path: str) -> bool:
    try:
        os.stat(path)
        return True
    except (OSError, ValueError):
        return False


def _exists_with_contents(path: str) -> bool:
    try:
        return os.stat(path).st_size > 0
    except (OSError, ValueError):
        return False


def _key_values(lines: Optional[Sequence[str]], sep: str) -> Dict[str, str]:
    """Go's strings.Split(line, sep) and field[1]: the text up to a second sep."""
    out = {}
    for line in lines or ():
        fields = line.split(sep)
        if len(fields) >= 2:
            out[fields[0]] = fields[1]
    return out


def _trim_quotes(s: str) -> str:
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        return s[1:-1]
    return s


def _redhatish_version(lines: Sequence[str]) -> str:
    c = "".join(lines).lower()
    if "rawhide" in c:
        return "rawhide"
    m = _RH_VERSION.search(c)
    return m.group(1) if m else ""


def _redhatish_platform(lines: Sequence[str]) -> str:
    c = "".join(lines).lower()
    if "red hat" in c:
        return "redhat"
    return c.split(" ")[0]


def _suse_version(lines: Sequence[str]) -> str:
    version = ""
    for line in lines:
        m = _SUSE_VERSION.search(line)
        if m:
            version = m.group(1)
            continue
        m = _SUSE_PATCH.search(line)
        if m:
            version = version + "." + m.group(1)
    return version


def _first_line(lines: Optional[Sequence[str]]) -> str:
    return lines[0] if lines else ""


def platform_information(root: str = "/") -> Tuple[str, str, str]:
    """(platform, family, version) as gopsutil v3 derives them from /etc.

    gopsutil runs /usr/bin/lsb_release when /etc/lsb-release is missing; this
    never starts a process, so that source counts as empty here.
    """
    def etc(name):
        return os.path.join(root, "etc", name)

    lsb = _key_values(_read_lines(etc("lsb-release")), "=") if _exists(etc("lsb-release")) else {}
    lsb_id, lsb_release = lsb.get("DISTRIB_ID", ""), lsb.get("DISTRIB_RELEASE", "")
    platform = version = ""
    redhatish = next((n for n in ("neokylin-release", "redhat-release", "system-release")
                      if _exists(etc(n))), None)

    if _exists_with_contents(etc("oracle-release")):
        platform = "oracle"
        lines = _read_lines(etc("oracle-release"))
        version = _redhatish_version(lines) if lines is not None else ""
    elif _exists_with_contents(etc("enterprise-release")):
        platform = "oracle"
        lines = _read_lines(etc("enterprise-release"))
        version = _redhatish_version(lines) if lines is not None else ""
    elif _exists_with_contents(etc("slackware-version")):
        platform = "slackware"
        lines = _read_lines(etc("slackware-version"))
        if lines is not None:
            version = "".join(lines).lower().replace("slackware ", "", 1)
    elif _exists_with_contents(etc("debian_version")):
        by_lsb = {"Ubuntu": "ubuntu", "LinuxMint": "linuxmint", "Kylin": "Kylin",
                  '"Cumulus Linux"': "cumuluslinux"}
        if lsb_id in by_lsb:
            platform, version = by_lsb[lsb_id], lsb_release
        else:
            raspi = _exists_with_contents(os.path.join(root, "usr/bin/raspi-config"))
            platform = "raspbian" if raspi else "debian"
            version = _first_line(_read_lines(etc("debian_version")))
    elif redhatish is not None:
        lines = _read_lines(etc(redhatish))
        if lines is not None:
            version, platform = _redhatish_version(lines), _redhatish_platform(lines)
    elif _exists(etc("gentoo-release")):
        platform = "gentoo"
        lines = _read_lines(etc("gentoo-release"))
        version = _redhatish_version(lines) if lines is not None else ""
    elif _exists(etc("SuSE-release")):
        lines = _read_lines(etc("SuSE-release"))
        if lines is not None:
            version = _suse_version(lines)
            platform = "opensuse" if "opensuse" in "".join(lines).lower() else "suse"
    elif _exists(etc("arch-release")):
        platform, version = "arch", lsb_release
    elif _exists(etc("alpine-release")):
        platform = "alpine"
        version = _first_line(_read_lines(etc("alpine-release")))
    elif _exists(etc("os-release")):
        osr = _key_values(_read_lines(etc("os-release")), "=")
        platform = _trim_quotes(osr.get("ID", ""))
        version = _trim_quotes(osr.get("VERSION", ""))
        if platform == "amzn":
            platform = "amazon"
    elif lsb_id in ("RedHat", "Amazon", "ScientificSL", "XenServer"):
        platform = {"RedHat": "redhat", "Amazon": "amazon", "ScientificSL": "scientific",
                    "XenServer": "xenserver"}[lsb_id]
        version = lsb_release
    elif lsb_id:
        platform, version = lsb_id.lower(), lsb_release

    platform = platform.strip('"')
    return platform, FAMILIES.get(platform, ""), version


# --- collection -------------------------------------------------------------------------------

def collect(root: str = "/", addresses: Optional[Iterable[Tuple[str, str]]] = None) -> HostInfo:
    """All host facts. ``addresses`` replaces the live enumeration (tests)."""
    if addresses is None:
        addresses = interface_addresses(root)
    priv4, pub4, priv6, pub6 = classify(addresses)
    try:
        platform, family, version = platform_information(root)
    except (OSError, ValueError, UnicodeError) as e:  # never let /etc break start-up
        log.debug("platform detection failed: %s", e)
        platform = family = version = ""
    uname = os.uname()
    return HostInfo(
        hostname=socket.gethostname(),
        intranet_ipv4=priv4, extranet_ipv4=pub4, intranet_ipv6=priv6, extranet_ipv6=pub6,
        platform=platform, platform_family=family, platform_version=version,
        kernel_version=uname.release, arch=uname.machine,
    )
