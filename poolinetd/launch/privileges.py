"""Dropping to a service's user: groups, then gid, then uid, then prove it stuck.

Touches the OS: setgroups/setgid/setuid. Called in a child after fork and
before it serves anything.
"""

from __future__ import annotations

import os


class PrivilegeError(Exception):
    """The drop could not be done, or root could be regained afterwards."""


def drop(uid: int, gid: int, groups: tuple[int, ...]) -> None:
    """Become ``uid``/``gid`` with exactly ``groups`` as supplementary groups.

    As root: setgroups -> setgid -> setuid (the order matters: after setuid
    the groups can no longer be changed), then check that setuid(0) fails.
    As any other user: succeeds only if we already are ``uid`` (nothing to
    change); anything else raises PrivilegeError.
    """
    same_ids = os.getresuid() == (uid, uid, uid) and os.getresgid() == (gid, gid, gid)
    if os.geteuid() != 0:
        if same_ids:
            return  # a normal user serving its own services: nothing can or need change
        raise PrivilegeError(f"cannot switch to uid {uid}: not running as root")
    if same_ids and sorted(os.getgroups()) == sorted(set(groups) or {gid}):
        return  # already exactly that identity (a root service under a root master)
    try:
        os.setgroups(list(groups) or [gid])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        raise PrivilegeError(f"dropping to uid {uid} gid {gid}: {exc.strerror}") from exc
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise PrivilegeError(f"root could be regained after dropping to uid {uid}")
