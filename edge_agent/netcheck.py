"""Can mDNS work from here? A cheap look at the interfaces (psutil), for the one line a user
gets when no peer answers. It cannot see a switch or access point that drops multicast
(docs/troubleshooting.md covers that); it does see a machine with no interface to send it on.
"""

from __future__ import annotations

import ipaddress


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def multicast_unavailable(interfaces: list[str] | None = None) -> str | None:
    """Why mDNS cannot reach any other machine from ``interfaces`` (addresses; None: all), or None.

    Loopback counts as usable: Linux delivers multicast on it without the MULTICAST flag (a
    swarm on one machine runs over it). Unknown flags (some platforms) count as usable too."""
    import psutil

    if interfaces and any(_is_loopback(a) for a in interfaces):
        return None
    stats = psutil.net_if_stats()
    names = set(stats)
    if interfaces:
        wanted = set(interfaces)
        names = {name for name, addrs in psutil.net_if_addrs().items() if any(a.address in wanted for a in addrs)}
        if not names:
            return f"no interface of this machine has the address {', '.join(interfaces)}"
    for name in names:
        st = stats.get(name)
        flags = set((getattr(st, "flags", "") or "").split(",")) if st else set()
        if st and st.isup and ("loopback" not in flags) and ("multicast" in flags or flags == {""}):
            return None
    where = "the chosen interface" if interfaces else "any network interface"
    return f"multicast is off on {where} here, so mDNS reaches no other machine"
