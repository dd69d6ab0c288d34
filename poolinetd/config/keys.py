"""The key tables of key-values definitions: which keys exist, where, and how each option reads.

Pure data. ``ENTRY_KEYS`` and ``DEFAULTS_KEYS`` are what docs/configuration.md
and the man page list (tests/test_keys_docs.py keeps them in step);
``OPTION_PARSERS`` says how each poolinetd option's value is read and how a
bad one is explained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from poolinetd.config import values
from poolinetd.config.spec import LIMIT_NAMES, Options

LIMIT_KEYS = LIMIT_NAMES
# Options fields in the order docs list them; ``limits`` is written as the limit keys.
OPTION_KEYS = tuple(f.name for f in fields(Options) if f.name != "limits")
LIST_KEYS = ("only_from", "no_access", "proxy_from")
WORDS_KEYS = ("preload_modules",)  # several words, each checked (values.module_name)
GLOBAL_KEYS = ("max_connections", "max_programs")  # defaults only: one cap for all services
_ENTRY_ONLY_KEYS = ("proxy_protocol",)  # a per-listener decision, never a default
# Every key a service definition accepts, in the order docs list them.
ENTRY_KEYS: tuple[str, ...] = (
    "bind",
    "socktype",
    "protocol",
    "wait",
    "user",
    "group",
    "login_class",
    "exec",
    "args",
    "service_max",
    "ip_max",
    *LIMIT_KEYS,
    *OPTION_KEYS,
    "acceptfilter",
    "recvbuf",
    "ipsec",
)
# What a ``defaults`` definition accepts: poolinetd's options and limits, the global caps.
DEFAULTS_KEYS: tuple[str, ...] = (
    *LIMIT_KEYS,
    *(k for k in OPTION_KEYS if k not in _ENTRY_ONLY_KEYS),
)
# NetBSD names for the limits, mapped onto poolinetd's own.
KEY_ALIASES = {"service_max": "max_spawn_per_min", "ip_max": "max_cpm_per_ip",
               "recvbuf": "rcvbuf"}
# Keys other inetds act on and poolinetd reads but ignores: why, for the warning.
IGNORED_KEYS = {
    "acceptfilter": "accept filters are a BSD kernel feature",
    "ipsec": "poolinetd applies no IPsec policy; the service accepts connections without it",
}


@dataclass(frozen=True, slots=True)
class OptionParser:
    """How one option's single value reads: the converter, and words for a bad value."""

    parse: Callable[[str], object | None]  # None = not a valid value
    what: str  # "must be WHAT"
    example: str  # "write e.g. key=EXAMPLE"


# The options with one value each (env and the address lists have their own readers).
OPTION_PARSERS: dict[str, OptionParser] = {
    "pool_min": OptionParser(values.uint, "an integer >= 0", "2"),
    "pool_max": OptionParser(values.positive, "an integer >= 1", "32"),
    "worker_connections": OptionParser(values.positive, "an integer >= 1", "256"),
    "max_requests": OptionParser(values.uint, "an integer >= 0 (0 = never recycle)", "10000"),
    "idle_timeout": OptionParser(values.ufloat, "a number of seconds >= 0", "60"),
    "conn_timeout": OptionParser(values.positive_float, "a number of seconds > 0", "300"),
    "stderr": OptionParser(values.stderr_route, "socket or log", "log"),
    "preload": OptionParser(values.preload_kind, "python or no", "python"),
    "source_v4_prefix": OptionParser(values.prefix_length(32), "a prefix length from 0 to 32",
                                     "24"),
    "source_v6_prefix": OptionParser(values.prefix_length(128), "a prefix length from 0 to 128",
                                     "64"),
    "block_time": OptionParser(values.ufloat, "a number of seconds >= 0", "60"),
    "reuseport": OptionParser(values.yes_no, "yes or no", "yes"),
    "proxy_protocol": OptionParser(values.yes_no, "yes or no", "yes"),
    "tcp_wrappers": OptionParser(values.yes_no, "yes or no", "no"),
    "max_connections": OptionParser(values.cap, "an integer >= 1 or unlimited", "10000"),
    "max_programs": OptionParser(values.cap, "an integer >= 1 or unlimited", "512"),
    **{
        key: OptionParser(values.rlimit, "N, NK, NM or NG, or unlimited", example)
        for key, example in (
            ("rlimit_as", "512M"), ("rlimit_cpu", "60"), ("rlimit_data", "256M"),
            ("rlimit_rss", "256M"), ("rlimit_stack", "8M"), ("rlimit_files", "1024"),
            ("rlimit_nproc", "64"), ("rlimit_core", "0"),
        )
    },
    "nice": OptionParser(values.nice, "an integer from -20 to 19", "10"),
    "umask": OptionParser(values.umask, "an octal umask from 000 to 777", "027"),
    "rcvbuf": OptionParser(values.buffer_size, "a size from 1 to 2G-1 (N, NK, NM)", "256K"),
    "sndbuf": OptionParser(values.buffer_size, "a size from 1 to 2G-1 (N, NK, NM)", "256K"),
    "keepalive": OptionParser(values.yes_no, "yes or no", "yes"),
    "nodelay": OptionParser(values.yes_no, "yes or no", "yes"),
    "backlog": OptionParser(values.backlog, "an integer from 1 to 65535", "4096"),
    "defer_accept": OptionParser(values.seconds, "a number of whole seconds >= 0", "5"),
}
