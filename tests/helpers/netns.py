"""Two "hosts" on one machine for multi-node tests: network namespaces joined by a veth pair.

Each namespace has its loopback and one end of the veth, with an address on a private /24.
Commands run inside with `ip netns exec`; processes there see only their own namespace's
interfaces, so a torchrun node in one reaches the other only over the veth (gloo must be told
the interface: GLOO_SOCKET_IFNAME). `cut()` takes a host off the link, as a dead or unplugged
machine would: its peers get no FIN or RST, only silence. Needs root and iproute2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip`), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed: run `make ci-deps` as root"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass(frozen=True)
class Host:
    netns: str
    ifname: str  # its end of the veth
    addr: str

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


class TwoHosts:
    """`with TwoHosts() as net:` two namespaces linked by a veth (`net.hosts`); removed on exit."""

    def __init__(self, tag: str | None = None, subnet: str | None = None):
        tag = tag or str(os.getpid() % 100000)
        # Interface names are at most 15 characters; the subnet is derived from the tag so that
        # concurrent test runs do not share addresses.
        subnet = subnet or f"10.{200 + int(tag) % 50}.{int(tag) % 250}"
        self.hosts = (Host(f"dlA{tag}", f"vA{tag}", f"{subnet}.1"), Host(f"dlB{tag}", f"vB{tag}", f"{subnet}.2"))

    def __enter__(self) -> TwoHosts:
        a, b = self.hosts
        try:
            for host in self.hosts:
                _ip("netns", "add", host.netns)
                _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("link", "add", a.ifname, "netns", a.netns, "type", "veth", "peer", "name", b.ifname, "netns", b.netns)
            for host in self.hosts:
                _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
                _ip("-n", host.netns, "link", "set", host.ifname, "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def cut(self, host: Host) -> None:
        """Take `host` off the link (its veth end down): the other side hears nothing more."""
        _ip("-n", host.netns, "link", "set", host.ifname, "down")

    def restore(self, host: Host) -> None:
        """Put `host` back on the link."""
        _ip("-n", host.netns, "link", "set", host.ifname, "up")

    def __exit__(self, *exc) -> None:
        for host in self.hosts:  # deleting a namespace deletes its veth end, and so the pair
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=30)
