"""Who a service runs as: its user, primary group and supplementary groups, and the owner of
its unix socket.

Touches the OS only through ``Lookups``. Problems go to the ``SpecReport``;
a result of None means the entry cannot run (it was reported).
"""

from __future__ import annotations

from dataclasses import dataclass

from poolinetd.config.lookups import Lookups, UserEntry, attempt
from poolinetd.config.report import SpecReport
from poolinetd.config.spec import ServiceSpec, SocketOwner


@dataclass(frozen=True, slots=True)
class Credentials:
    """The ids a service's processes take: ``user``'s entry, the gid and the group list."""

    user: UserEntry
    gid: int  # the entry's group, or the one the config names
    groups: tuple[int, ...]  # supplementary groups (getgrouplist; at least ``gid``)


def _user(lookups: Lookups, name: str) -> UserEntry | None:
    return attempt(lookups.getpwnam, name)


def _group(lookups: Lookups, name: str) -> int | None:
    return attempt(lookups.getgrnam, name)


def credentials(spec: ServiceSpec, lookups: Lookups, out: SpecReport) -> Credentials | None:
    """The ids of ``spec``'s user field (``user``, ``user:group``, or the "user.group" form).

    None after reporting an unknown user or group.
    """
    entry = _user(lookups, spec.user)
    group = spec.group
    gid: int | None = None
    if entry is None and group is None and "." in spec.user:
        # "user.group" (OpenBSD, BusyBox): the whole token was not a user,
        # so try each dot, rightmost first, as the user/group separator.
        cut = len(spec.user)
        while (cut := spec.user.rfind(".", 0, cut)) > 0:
            name, group_name = spec.user[:cut], spec.user[cut + 1 :]
            candidate, group_id = _user(lookups, name), _group(lookups, group_name)
            if candidate is not None and group_id is not None and group_name:
                entry, group, gid = candidate, group_name, group_id
                break
    if entry is None:
        out.report("user", f"unknown user {spec.user!r}", "create the user or fix the name")
        return None
    if group is not None and gid is None:
        gid = _group(lookups, group)
        if gid is None:
            out.report("user", f"unknown group {group!r}", "create the group or fix the name")
            return None
    gid = entry.gid if gid is None else gid
    groups = attempt(lookups.getgrouplist, entry.name, gid)
    return Credentials(entry, gid, groups or (gid,))


def socket_owner(spec: ServiceSpec, lookups: Lookups, out: SpecReport) -> SocketOwner | None:
    """The owner, group and mode a unix socket's ``:owner:group:mode:`` prefix asks for.

    None when the entry has no prefix; -1 for a part not given (or unknown: reported).
    """
    perms = spec.unix_perms
    if perms is None:
        return None
    uid = gid = -1
    if perms.owner is not None:
        entry = _user(lookups, perms.owner)
        if entry is None:
            out.report("service", f"unknown socket owner {perms.owner!r}", "fix the prefix")
        else:
            uid = entry.uid
    if perms.group is not None:
        found = _group(lookups, perms.group)
        if found is None:
            out.report("service", f"unknown socket group {perms.group!r}", "fix the prefix")
        else:
            gid = found
    return SocketOwner(uid, gid, perms.mode)
