"""A network lab on this machine: the fleet in one network namespace, each device in its own,
joined by point-to-point links whose loss, delay, jitter and partitions we control.

Why TUN links and not ``veth`` + ``tc netem``: netem is the usual tool, but kernels built
without ``CONFIG_NET_SCH_NETEM`` (this project's CI VMs among them: ``tc qdisc add ...
netem`` answers "Specified qdisc kind is unknown") cannot run it, and neither nft nor
iptables may be installed.  So each link is a pair of TUN interfaces -- one in the fleet's
namespace, one in the device's -- and :class:`LinkEmulator` (a child process holding both
ends) forwards every IP packet between them the way netem would: dropped with probability
``loss``, else delivered after ``delay_ms`` ± ``jitter_ms`` (uniform, as netem's default;
packets may overtake each other, as with netem's jitter), in both directions.  A partition
is ``loss = 1`` (netem's ``loss 100%``).  The kernels' TCP stacks see real loss, latency
and reordering; only the wire is emulated.

Addresses: the fleet answers on :data:`SERVICE_IP` (on its loopback); link ``i`` is
``10.213.i.1`` (fleet side) <-> ``10.213.i.2`` (device side), and the device routes
:data:`SERVICE_IP` over it.  Every address lives inside namespaces this lab created.

Cleanup whatever happens: the TUN interfaces vanish with the emulator process (they are
not persistent), which dies with its parent (``PR_SET_PDEATHSIG``); :meth:`Lab.close`
kills what still runs in the lab's namespaces and deletes them; :func:`remove_stale`
removes the namespaces of an earlier run whose process is gone (``kill -9``).
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import multiprocessing
import os
import random
import re
import select
import signal
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SERVICE_IP", "Impairment", "Lab", "available", "remove_stale", "enter_netns", "die_with_parent"]

SERVICE_IP = "10.213.255.1"
MAX_LINKS = 250
_PREFIX = "eln"  # namespaces are named eln<pid>-fleet / eln<pid>-d<i>
_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Impairment:
    """One direction of a link: netem's ``loss``, ``delay`` and ``jitter``."""

    loss: float = 0.0  # 0..1 (1: partitioned)
    delay_ms: float = 0.0
    jitter_ms: float = 0.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def available() -> str | None:
    """None when this machine can run the lab, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    try:
        out = _ip("netns", "list", check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns` unavailable: {exc}"
    if out.returncode != 0:
        return f"`ip netns` unavailable: {out.stderr.strip()[:200]}"
    return None


def die_with_parent() -> None:
    """``preexec_fn``/child start: SIGKILL this process when its parent thread dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def enter_netns(name: str) -> None:
    """Move the calling thread (and the threads and processes it starts later) into ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _kill_netns_processes(ns: str) -> None:
    out = _ip("netns", "pids", ns, check=False)
    for pid in out.stdout.split():
        if pid == str(os.getpid()):
            continue  # this process, when it entered the namespace itself
        try:
            os.kill(int(pid), signal.SIGKILL)  # processes this lab started inside its own namespace
        except (ProcessLookupError, ValueError):
            pass


def remove_stale() -> list[str]:
    """Delete the namespaces of earlier labs whose process is gone; returns their names."""
    gone = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{_PREFIX}(\d+)-(fleet|d\d+)", name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its lab is still running
        except ProcessLookupError:
            pass
        _kill_netns_processes(name)
        _ip("netns", "del", name, check=False)
        gone.append(name)
    return gone


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


# --------------------------------------------------------------------------- the emulator
def _emulate(fds: list[tuple[int, int]], conn: Any, seed: int) -> None:
    """Child process: forward packets between each link's two TUN ends, impaired."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rng = random.Random(seed)
    imp = [(Impairment(), Impairment()) for _ in fds]  # (fleet -> device, device -> fleet)
    route: dict[int, tuple[int, int, int]] = {}  # fd -> (link, direction, the other end's fd)
    for i, (f, d) in enumerate(fds):
        route[f] = (i, 0, d)
        route[d] = (i, 1, f)
    stats = [[0, 0, 0, 0] for _ in fds]  # forwarded f->d, dropped f->d, forwarded d->f, dropped d->f
    heap: list[tuple[float, int, int, bytes]] = []
    n = 0
    watch = [*route, conn.fileno()]
    while True:
        now = time.monotonic()
        wait = max(0.0, heap[0][0] - now) if heap else 0.5
        ready, _, _ = select.select(watch, [], [], min(wait, 0.5))
        for fd in ready:
            if fd == conn.fileno():
                cmd = conn.recv()
                if cmd[0] == "stop":
                    return
                if cmd[0] == "set":
                    for link in cmd[1]:
                        imp[link] = (cmd[2], cmd[3])
                    conn.send(True)
                elif cmd[0] == "stats":
                    conn.send([list(s) for s in stats])
                continue
            link, direction, out = route[fd]
            for _ in range(64):  # what is queued now, bounded so the other links are served too
                try:
                    pkt = os.read(fd, 65535)
                except BlockingIOError:
                    break
                p = imp[link][direction]
                if p.loss and rng.random() < p.loss:
                    stats[link][2 * direction + 1] += 1
                    continue
                stats[link][2 * direction] += 1
                delay = max(0.0, p.delay_ms + (rng.uniform(-p.jitter_ms, p.jitter_ms) if p.jitter_ms else 0.0))
                n += 1
                heapq.heappush(heap, (time.monotonic() + delay / 1000.0, n, out, pkt))
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, out, pkt = heapq.heappop(heap)
            try:
                os.write(out, pkt)
            except OSError:
                pass  # the interface is going away (shutdown), or its queue is full: a lost packet


# --------------------------------------------------------------------------- the lab
class Lab:
    """The fleet's namespace and ``n`` device namespaces, one emulated link each.

    Build it before the process starts any thread (the emulator is forked), then
    :func:`enter_netns` ``lab.fleet_ns`` to run the fleet there.  Always :meth:`close`.
    """

    def __init__(self, n_devices: int, *, seed: int = 0) -> None:
        if not 0 < n_devices <= MAX_LINKS:
            raise ValueError(f"1..{MAX_LINKS} devices")
        tag = f"{_PREFIX}{os.getpid()}"
        self.fleet_ns = f"{tag}-fleet"
        self.device_ns = [f"{tag}-d{i}" for i in range(n_devices)]
        self._created: list[str] = []
        self._conn: Any = None
        self._proc: Any = None
        try:
            self._build(tag, n_devices, seed)
        except BaseException:
            self.close()
            raise

    def _build(self, tag: str, n: int, seed: int) -> None:
        for ns in (self.fleet_ns, *self.device_ns):
            _ip("netns", "add", ns)
            self._created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.fleet_ns, "addr", "add", f"{SERVICE_IP}/32", "dev", "lo")
        fds: list[tuple[int, int]] = []
        try:
            for i, ns in enumerate(self.device_ns):
                fleet_end, dev_end = f"{tag}f{i}", f"{tag}d{i}"
                fds.append((_open_tun(fleet_end), _open_tun(dev_end)))
                _ip("link", "set", fleet_end, "netns", self.fleet_ns)
                _ip("link", "set", dev_end, "netns", ns)
                a, b = f"10.213.{i}.1", f"10.213.{i}.2"
                _ip("-n", self.fleet_ns, "addr", "add", a, "peer", b, "dev", fleet_end)
                _ip("-n", ns, "addr", "add", b, "peer", a, "dev", dev_end)
                _ip("-n", self.fleet_ns, "link", "set", fleet_end, "up")
                _ip("-n", ns, "link", "set", dev_end, "up")
                _ip("-n", ns, "route", "add", SERVICE_IP, "dev", dev_end)
            ctx = multiprocessing.get_context("fork")  # the TUN file descriptors go with it
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(target=_emulate, args=(fds, child, seed), name="link-emulator", daemon=True)
            self._proc.start()
            child.close()
        finally:
            for pair in fds:  # the emulator holds them now: the links die with it
                for fd in pair:
                    os.close(fd)

    def _call(self, *cmd: Any) -> Any:
        self._conn.send(cmd)
        if not self._conn.poll(10):
            raise RuntimeError("the link emulator did not answer")
        return self._conn.recv()

    def impair(self, links: Sequence[int], imp: Impairment, upstream: Impairment | None = None) -> None:
        """Set links' impairment (``upstream``: device -> fleet, default the same)."""
        self._call("set", list(links), imp, upstream or imp)

    def link_stats(self) -> list[dict[str, int]]:
        """Packets forwarded and dropped per link and direction since the start."""
        return [{"down_forwarded": s[0], "down_dropped": s[1], "up_forwarded": s[2], "up_dropped": s[3]}
                for s in self._call("stats")]

    def exec_argv(self, device: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside device ``device``'s namespace."""
        return ["ip", "netns", "exec", self.device_ns[device], *argv]

    def close(self) -> None:
        """Stop the emulator (its links go), kill what runs in the namespaces, delete them."""
        if self._proc is not None:
            try:
                self._conn.send(("stop",))
            except OSError:
                pass
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
            self._proc = None
        for ns in reversed(self._created):
            _kill_netns_processes(ns)
            _ip("netns", "del", ns, check=False)
        self._created = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
