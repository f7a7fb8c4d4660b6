"""Host facts: address classification, netlink parsing, platform detection."""

import os
import socket
import struct

import pytest
from hypothesis import given, strategies as st

from elkeid_agent.host import hostinfo
from elkeid_agent.host.hostinfo import classify

try:
    import psutil
except ImportError:  # the core suite also runs without third-party packages
    psutil = None


# --- classify -----------------------------------------------------------------------

def test_classify_basic_split():
    got = classify([("eth0", "10.1.2.3"), ("eth0", "8.8.8.8"),
                    ("eth0", "fd12::1"), ("eth0", "2001:db8::1")])
    assert got == (["10.1.2.3"], ["8.8.8.8"], ["fd12::1"], ["2001:db8::1"])


@pytest.mark.parametrize("ifname", ["lo", "lo0", "loopback1", "docker0", "docker_gwbridge"])
def test_classify_skips_lo_and_docker_interfaces(ifname):
    assert classify([(ifname, "10.0.0.1"), (ifname, "1.2.3.4"), (ifname, "fd00::1")]) == \
        ([], [], [], [])


def test_classify_keeps_similar_names():
    # Prefix match only: "veth-lo" and "br-docker" are ordinary interfaces.
    got = classify([("veth-lo", "10.0.0.1"), ("br-docker", "10.0.0.2")])
    assert got[0] == ["10.0.0.1", "10.0.0.2"]


@pytest.mark.parametrize("ip", [
    "127.0.0.1", "127.255.0.9", "169.254.1.1", "224.0.0.1", "239.255.255.250",
    "0.0.0.0", "255.255.255.255", "::1", "::", "fe80::1", "febf::1", "ff02::1", "ff0e::1",
    "::ffff:127.0.0.1", "::ffff:169.254.3.4"])
def test_classify_drops_non_global_unicast(ip):
    assert classify([("eth0", ip)]) == ([], [], [], [])


@pytest.mark.parametrize("ip,private", [
    ("10.0.0.0", True), ("10.255.255.255", True), ("11.0.0.1", False), ("9.255.255.255", False),
    ("172.15.255.255", False), ("172.16.0.0", True), ("172.31.255.255", True),
    ("172.32.0.0", False),
    ("172.48.0.1", False),   # outside 172.16/12 (docs/protocol.md section 5)
    ("172.240.0.1", False),
    ("192.168.0.1", True), ("192.169.0.1", False), ("192.167.255.255", False),
    ("100.64.0.1", False), ("240.0.0.1", False), ("192.0.2.2", False)])
def test_classify_ipv4_private_ranges(ip, private):
    priv, pub, _, _ = classify([("eth0", ip)])
    assert (priv, pub) == (([ip], []) if private else ([], [ip]))


@pytest.mark.parametrize("ip,private", [
    ("fd00::1", True), ("fdff:ffff::1", True),
    ("fc00::1", False),      # fc00::/8 is not private per docs/protocol.md section 5
    ("fec0::1", False), ("2001:db8::1", False), ("64:ff9b::1.2.3.4", False)])
def test_classify_ipv6_private_ranges(ip, private):
    _, _, priv, pub = classify([("eth0", ip)])
    norm = str(hostinfo.ip_address(ip))
    assert (priv, pub) == (([norm], []) if private else ([], [norm]))


def test_classify_ipv4_mapped_counts_as_ipv4():
    assert classify([("eth0", "::ffff:10.0.0.1"), ("eth0", "::ffff:8.8.4.4")]) == \
        (["10.0.0.1"], ["8.8.4.4"], [], [])


def test_classify_caps_private_lists_at_five_and_keeps_order():
    addrs = [("eth%d" % i, "10.0.0.%d" % (20 - i)) for i in range(8)]
    addrs += [("eth%d" % i, "fd00::%x" % (20 - i)) for i in range(8)]
    addrs += [("eth%d" % i, "1.1.1.%d" % i) for i in range(8)]
    addrs += [("eth%d" % i, "2001:db8::%x" % i) for i in range(8)]
    priv4, pub4, priv6, pub6 = classify(addrs)
    assert priv4 == ["10.0.0.20", "10.0.0.19", "10.0.0.18", "10.0.0.17", "10.0.0.16"]
    assert priv6 == ["fd00::14", "fd00::13", "fd00::12", "fd00::11", "fd00::10"]
    assert len(pub4) == 8 and len(pub6) == 8  # Go caps only the private lists
    assert pub4[0] == "1.1.1.0" and pub4[-1] == "1.1.1.7"


def test_classify_normalises_text_and_strips_zone():
    got = classify([("eth0", "FD00:0:0:0:0:0:0:0001%eth0"), ("eth0", "2001:DB8:0:0:1:0:0:1")])
    assert got == ([], [], ["fd00::1"], ["2001:db8::1:0:0:1"])


def test_classify_skips_garbage_entries():
    got = classify([("eth0", "not-an-ip"), ("eth0", ""), (None, "10.0.0.1"), ("eth0", "10.0.0.1/24"),
                    ("eth0", "1.2.3"), ("eth0", "10.0.0.2")])
    assert got == (["10.0.0.2"], [], [], [])


@given(st.lists(st.tuples(st.text(max_size=10), st.one_of(
    st.ip_addresses().map(str), st.text(max_size=45)))))
def test_classify_never_raises_and_partitions(addrs):
    priv4, pub4, priv6, pub6 = classify(addrs)
    assert len(priv4) <= 5 and len(priv6) <= 5
    for ip in priv4 + pub4:
        assert socket.inet_pton(socket.AF_INET, ip)
    for ip in priv6 + pub6:
        assert socket.inet_pton(socket.AF_INET6, ip)
    assert not set(priv4) & set(pub4) and not set(priv6) & set(pub6)


# --- netlink message parsing ------------------------------------------------------------

SEQ = 4242


def nlmsg(mtype, body, seq=SEQ, flags=0x2):
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, 0) + body + \
        b"\0" * (-(16 + len(body)) % 4)


def rtattr(atype, value):
    return struct.pack("=HH", 4 + len(value), atype) + value + b"\0" * (-(4 + len(value)) % 4)


def newaddr(family, index, *attrs):
    return nlmsg(hostinfo.RTM_NEWADDR,
                 struct.pack("=BBBBI", family, 24, 0, 0, index) + b"".join(attrs))


def test_parse_addr_dump_ipv4_ipv6_and_done():
    v4 = socket.inet_aton("192.0.2.7")
    v6 = socket.inet_pton(socket.AF_INET6, "fd00::7")
    buf = (newaddr(socket.AF_INET, 2, rtattr(1, v4), rtattr(3, b"eth0\0"))
           + newaddr(socket.AF_INET6, 3, rtattr(1, v6), rtattr(8, b"\0\0\0\0"))
           + nlmsg(hostinfo.NLMSG_DONE, b"\0\0\0\0"))
    entries, done = hostinfo.parse_addr_dump(buf, SEQ)
    assert done
    assert entries == [(2, socket.AF_INET, v4), (3, socket.AF_INET6, v6)]


def test_parse_addr_dump_prefers_ifa_local_for_point_to_point():
    peer = socket.inet_aton("10.9.9.9")
    local = socket.inet_aton("10.1.1.1")
    buf = newaddr(socket.AF_INET, 5, rtattr(1, peer), rtattr(2, local))
    assert hostinfo.parse_addr_dump(buf, SEQ) == ([(5, socket.AF_INET, local)], False)


def test_parse_addr_dump_ignores_other_sequences_and_bad_attrs():
    v4 = socket.inet_aton("192.0.2.7")
    buf = (newaddr(socket.AF_INET, 2, rtattr(1, v4))[:8] + struct.pack("=II", SEQ + 1, 0)
           + newaddr(socket.AF_INET, 2, rtattr(1, v4))[16:]
           + newaddr(socket.AF_INET, 3, rtattr(1, b"\1\2"))          # wrong length
           + newaddr(socket.AF_PACKET, 4, rtattr(1, b"\1" * 6))        # wrong family
           + newaddr(socket.AF_INET, 6, struct.pack("=HH", 200, 1)))   # attr overruns
    assert hostinfo.parse_addr_dump(buf, SEQ) == ([], False)


def test_parse_addr_dump_stops_at_truncated_message():
    v4 = socket.inet_aton("192.0.2.7")
    good = newaddr(socket.AF_INET, 2, rtattr(1, v4))
    entries, done = hostinfo.parse_addr_dump(good + good[:-3], SEQ)
    assert entries == [(2, socket.AF_INET, v4)] and not done


def test_parse_addr_dump_raises_on_kernel_error():
    buf = nlmsg(hostinfo.NLMSG_ERROR, struct.pack("=i", -1) + b"\0" * 16)
    with pytest.raises(hostinfo.NetlinkError) as info:
        hostinfo.parse_addr_dump(buf, SEQ)
    assert info.value.errno == 1


def test_parse_addr_dump_ack_is_not_an_error():
    buf = nlmsg(hostinfo.NLMSG_ERROR, struct.pack("=i", 0) + b"\0" * 16)
    assert hostinfo.parse_addr_dump(buf, SEQ) == ([], False)


@given(st.binary(max_size=300))
def test_parse_addr_dump_survives_garbage(buf):
    try:
        entries, _done = hostinfo.parse_addr_dump(buf, SEQ)
    except hostinfo.NetlinkError:
        return
    for _index, family, packed in entries:
        assert len(packed) == {socket.AF_INET: 4, socket.AF_INET6: 16}[family]


# --- fallback parsers -----------------------------------------------------------------------

def ifreq(name, family, addr=b"", size=40):
    sockaddr = struct.pack("=HH", family, 0) + addr
    return (name.encode().ljust(16, b"\0") + sockaddr).ljust(size, b"\0")


def test_parse_ifconf():
    data = (ifreq("lo", socket.AF_INET, socket.inet_aton("127.0.0.1"))
            + ifreq("eth0:1", socket.AF_INET, socket.inet_aton("10.0.0.5"))
            + ifreq("weird", socket.AF_INET6, b"\0" * 12)
            + ifreq("", socket.AF_INET, socket.inet_aton("1.2.3.4")))
    assert hostinfo.parse_ifconf(data + b"\1\2\3", 40) == \
        [("lo", "127.0.0.1"), ("eth0:1", "10.0.0.5")]
    assert hostinfo.parse_ifconf(ifreq("a", socket.AF_INET, b"\1\2\3\4", 32), 32) == \
        [("a", "1.2.3.4")]


def test_parse_if_inet6():
    text = ("00000000000000000000000000000001 01 80 10 80       lo\n"
            "fd000000000000000000000000000002 02 40 00 80     eth0\n"
            "zz000000000000000000000000000002 02 40 00 80     eth0\n"
            "fd00 02 40 00 80 eth0\n"
            "fd000000000000000000000000000003 xx 40 00 80 eth0\n"
            "short line\n")
    assert hostinfo.parse_if_inet6(text) == [(1, "lo", "::1"), (2, "eth0", "fd00::2")]


@given(st.text(max_size=200))
def test_parse_if_inet6_never_raises(text):
    hostinfo.parse_if_inet6(text)


# --- live enumeration -------------------------------------------------------------------------

def test_netlink_enumeration_runs_on_this_host():
    addrs = hostinfo.interface_addresses()
    assert isinstance(addrs, list)
    assert all(isinstance(n, str) and isinstance(ip, str) for n, ip in addrs)
    loopback = [ip for n, ip in addrs if n.startswith("lo")]
    if loopback:
        assert "127.0.0.1" in loopback


def psutil_addresses():
    out = []
    for name, entries in psutil.net_if_addrs().items():
        for a in entries:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                out.append((name, a.address.split("%", 1)[0]))
    return out


@pytest.mark.skipif(psutil is None, reason="psutil not installed")
def test_netlink_matches_psutil_classification():
    assert classify(hostinfo.interface_addresses()) == classify(psutil_addresses())


def test_fallback_enumeration_matches_netlink():
    via_netlink = hostinfo.interface_addresses()
    via_fallback = hostinfo.interface_addresses(use_netlink=False)
    assert sorted(via_fallback) == sorted(via_netlink)
    assert [sorted(x) for x in classify(via_fallback)] == [sorted(x) for x in classify(via_netlink)]


def test_netlink_failure_falls_back(monkeypatch):
    def broken():
        raise PermissionError(1, "netlink forbidden")
    monkeypatch.setattr(hostinfo, "_netlink_addresses", broken)
    assert sorted(hostinfo.interface_addresses()) == \
        sorted(hostinfo.interface_addresses(use_netlink=False))


def test_fallback_with_missing_proc_has_no_ipv6(tmp_path):
    addrs = hostinfo._fallback_addresses(str(tmp_path))
    assert all(":" not in ip for _n, ip in addrs)


# --- platform ---------------------------------------------------------------------------------

def make_root(tmp_path, files):
    for rel, data in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(tmp_path)


UBUNTU_LSB = ("DISTRIB_ID=Ubuntu\nDISTRIB_RELEASE=22.04\nDISTRIB_CODENAME=jammy\n"
              'DISTRIB_DESCRIPTION="Ubuntu 22.04.3 LTS"\n')


@pytest.mark.parametrize("files,expected", [
    ({"etc/debian_version": "bookworm/sid\n", "etc/lsb-release": UBUNTU_LSB,
      "etc/os-release": 'ID=ubuntu\nVERSION="22.04.3 LTS (Jammy Jellyfish)"\n'},
     ("ubuntu", "debian", "22.04")),
    ({"etc/debian_version": "12.5\n", "etc/os-release": 'ID=debian\nVERSION="12 (bookworm)"\n'},
     ("debian", "debian", "12.5")),
    ({"etc/debian_version": "11.8\n", "usr/bin/raspi-config": "#!/bin/sh\n"},
     ("raspbian", "debian", "11.8")),
    ({"etc/debian_version": "21.1\n", "etc/lsb-release": "DISTRIB_ID=LinuxMint\nDISTRIB_RELEASE=21.1\n"},
     ("linuxmint", "debian", "21.1")),
    ({"etc/debian_version": "\n"}, ("debian", "debian", "")),
    ({"etc/redhat-release": "CentOS Linux release 7.9.2009 (Core)\n",
      "etc/system-release": "CentOS Linux release 7.9.2009 (Core)\n"},
     ("centos", "rhel", "7.9.2009")),
    ({"etc/redhat-release": "Red Hat Enterprise Linux Server release 7.9 (Maipo)\n"},
     ("redhat", "rhel", "7.9")),
    ({"etc/redhat-release": "Rocky Linux release 8.9 (Green Obsidian)\n"},
     ("rocky", "rhel", "8.9")),
    ({"etc/redhat-release": "AlmaLinux release 9.3 (Shamrock Pampas Cat)\n"},
     ("almalinux", "rhel", "9.3")),
    ({"etc/redhat-release": "Fedora release 40 (Forty)\n"}, ("fedora", "fedora", "40")),
    ({"etc/redhat-release": "Fedora release 41 (Rawhide)\n"}, ("fedora", "fedora", "rawhide")),
    ({"etc/system-release": "Amazon Linux release 2 (Karoo)\n",
      "etc/os-release": 'ID="amzn"\nVERSION="2"\n'}, ("amazon", "rhel", "2")),
    ({"etc/oracle-release": "Oracle Linux Server release 8.8\n",
      "etc/redhat-release": "Red Hat Enterprise Linux release 8.8 (Ootpa)\n"},
     ("oracle", "rhel", "8.8")),
    ({"etc/alpine-release": "3.19.1\n", "etc/os-release": "ID=alpine\n"},
     ("alpine", "alpine", "3.19.1")),
    ({"etc/os-release": 'NAME="openSUSE Leap"\nVERSION="15.5"\nID="opensuse-leap"\n'},
     ("opensuse-leap", "suse", "15.5")),
    ({"etc/os-release": 'ID=amzn\nVERSION="2023"\n'}, ("amazon", "rhel", "2023")),
    ({"etc/os-release": "ID=nixos\nVERSION=24.05 (Uakari)\n"}, ("nixos", "", "24.05 (Uakari)")),
    ({"etc/SuSE-release": "SUSE Linux Enterprise Server 12 (x86_64)\nVERSION = 12\nPATCHLEVEL = 5\n"},
     ("suse", "suse", "12.5")),
    ({"etc/SuSE-release": "openSUSE 13.2 (x86_64)\nVERSION = 13.2\n"},
     ("opensuse", "suse", "13.2")),
    ({"etc/arch-release": "", "etc/lsb-release": "DISTRIB_ID=Arch\nDISTRIB_RELEASE=rolling\n"},
     ("arch", "arch", "rolling")),
    ({"etc/gentoo-release": "Gentoo Base System release 2.14\n"}, ("gentoo", "gentoo", "2.14")),
    ({"etc/slackware-version": "Slackware 15.0\n"}, ("slackware", "slackware", "15.0")),
    ({"etc/lsb-release": "DISTRIB_ID=RedHat\nDISTRIB_RELEASE=6\n"}, ("redhat", "rhel", "6")),
    ({"etc/lsb-release": "DISTRIB_ID=SomeOS\nDISTRIB_RELEASE=1.0\n"}, ("someos", "", "1.0")),
    ({"etc/lsb-release": 'DISTRIB_ID="Quoted"\n'}, ("quoted", "", "")),
    ({}, ("", "", "")),
])
def test_platform_information(tmp_path, files, expected):
    assert hostinfo.platform_information(make_root(tmp_path, files)) == expected


def test_platform_empty_oracle_release_is_skipped(tmp_path):
    root = make_root(tmp_path, {"etc/oracle-release": "",
                                "etc/redhat-release": "CentOS Stream release 9\n"})
    assert hostinfo.platform_information(root) == ("centos", "rhel", "9")


def test_platform_garbage_files_never_raise(tmp_path):
    junk = bytes(range(256)) * 3
    root = make_root(tmp_path, {"etc/lsb-release": junk, "etc/redhat-release": junk,
                                "etc/os-release": junk})
    platform, family, version = hostinfo.platform_information(root)
    assert isinstance(platform, str) and isinstance(version, str) and family in ("", "rhel")


def test_platform_unreadable_release_file(tmp_path):
    (tmp_path / "etc" / "redhat-release").mkdir(parents=True)  # exists but cannot be read
    assert hostinfo.platform_information(str(tmp_path)) == ("", "", "")


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_platform_fuzz(lsb, osr):
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        os.mkdir(os.path.join(d, "etc"))
        for name, data in (("lsb-release", lsb), ("os-release", osr)):
            with open(os.path.join(d, "etc", name), "wb") as f:
                f.write(data)
        hostinfo.platform_information(d)


# --- collect ----------------------------------------------------------------------------------

def test_collect_with_given_addresses(tmp_path):
    root = make_root(tmp_path, {"etc/debian_version": "12.5\n"})
    info = hostinfo.collect(root, addresses=[("eth0", "10.0.0.1"), ("eth0", "fd00::1"),
                                             ("eth1", "203.0.113.9"), ("docker0", "172.17.0.1")])
    assert info.intranet_ipv4 == ["10.0.0.1"] and info.extranet_ipv4 == ["203.0.113.9"]
    assert info.intranet_ipv6 == ["fd00::1"] and info.extranet_ipv6 == []
    assert (info.platform, info.platform_family, info.platform_version) == \
        ("debian", "debian", "12.5")
    assert info.kernel_version == os.uname().release and info.arch == os.uname().machine
    assert info.hostname == socket.gethostname()


def test_collect_live_host():
    info = hostinfo.collect()
    assert info == hostinfo.collect()  # stable between calls: the header is not re-encoded
    assert info.kernel_version and info.arch
    assert info.intranet_ipv4 + info.extranet_ipv4 == \
        classify(hostinfo.interface_addresses())[0] + classify(hostinfo.interface_addresses())[1]
