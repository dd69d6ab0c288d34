"""Configuration types: raw entries, resolved services, diagnostics, reload identity.

Pure: no I/O. Everything here is frozen, so a parsed configuration can be
compared, hashed and diffed on reload.

    ServiceSpec  the raw fields of one inetd.conf entry (strings and ints only)
    Service      a ServiceSpec resolved to numbers: endpoints, uid/gid, handler
    ServiceKey   what identifies a service across a reload (its endpoints)
    Diagnostic   one error or warning, located at FILE:LINE: field N 'TOKEN'
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field

from poolinetd.net.netmatch import AddressList


class SocketType(enum.Enum):
    """Field 2 of an entry."""

    STREAM = "stream"
    DGRAM = "dgram"
    SEQPACKET = "seqpacket"
    RAW = "raw"  # parsed, then refused: "not supported"
    RDM = "rdm"  # parsed, then refused: "not supported"


class Protocol(enum.Enum):
    """Field 3 of an entry. ``tcp``/``udp`` without a digit mean IPv4, as in every BSD."""

    TCP = "tcp"
    TCP4 = "tcp4"
    TCP6 = "tcp6"
    TCP46 = "tcp46"
    UDP = "udp"
    UDP4 = "udp4"
    UDP6 = "udp6"
    UDP46 = "udp46"
    UNIX = "unix"

    @property
    def is_unix(self) -> bool:
        return self is Protocol.UNIX

    @property
    def is_udp(self) -> bool:
        return self.value.startswith("udp")


class Severity(enum.Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem in a config file, with where it is and what to write instead.

    ``field`` is the 1-based index of the whitespace-separated field on the
    entry (0 when the problem is the whole line); ``token`` is the offending
    text as written.
    """

    source: str
    lineno: int
    field: int
    token: str
    message: str
    hint: str = ""
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        where = f"{self.source}:{self.lineno}:"
        if self.field:
            where += f" field {self.field} {self.token!r}:"
        elif self.token:
            where += f" {self.token!r}:"
        kind = "" if self.severity is Severity.ERROR else " warning:"
        text = f"{where}{kind} {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text


@dataclass(frozen=True, slots=True)
class Limits:
    """Connection limits of one service. Each number: None = no limit, 0 = nothing
    allowed, N = at most N (``max_child`` is never 0: 0 means "no limit" there).

    ``max_child``: concurrent instances of the service. ``max_cpm_per_ip``:
    connections (program starts) per minute from one source. ``max_child_per_ip``:
    concurrent instances per source. ``max_spawn_per_min``: instances started per
    minute by the whole service. Nothing converts one into another.

    How each notation's 0 reads (docs/configuration.md, "Limits"): FreeBSD
    ``nowait/A/B/C`` and GNU/BusyBox ``nowait.N``: 0 = no limit (None, recorded in
    ``unlimited``); NetBSD ``nowait:N``, ``service_max=``, ``ip_max=`` and poolinetd's
    own keys: 0 = nothing allowed (0). ``KEY=unlimited`` = no limit, written.

    ``unlimited`` names the limits written as "no limit" explicitly. In a raw
    ServiceSpec and in ``defaults`` it tells "lifted" from "not written", so a
    lifted limit is not filled in from ``defaults`` or by the safe default
    (``max_child_per_ip``, see config/settings.py); in a resolved Service it is kept
    for display. Its value is never None where its name is in ``unlimited``.
    """

    max_child: int | None = None
    max_cpm_per_ip: int | None = None
    max_child_per_ip: int | None = None
    max_spawn_per_min: int | None = None
    unlimited: frozenset[str] = frozenset()
    # max_child_per_ip is the safe default (a share of the capacity), not written:
    # a mode may lower it (classic: Dispatcher.source_share_cap).
    safe_default: bool = False

    def given(self, name: str) -> bool:
        """Whether limit ``name`` is written here (as a number or as "no limit")."""
        value: int | None = getattr(self, name)
        return value is not None or name in self.unlimited


LIMIT_NAMES = ("max_child", "max_cpm_per_ip", "max_child_per_ip", "max_spawn_per_min")


class StderrRoute(enum.Enum):
    """Where a launched program's fd 2 goes."""

    SOCKET = "socket"  # inetd's contract: fd 0, 1 and 2 are the connection
    LOG = "log"  # poolinetd's own stderr (its log)


class PreloadKind(enum.Enum):
    """``preload=``: how a service's program is started in pool mode."""

    NO = "no"  # exec'd per connection (posix_spawn)
    PYTHON = "python"  # a Python script, forked per connection from a preloaded interpreter


@dataclass(frozen=True, slots=True)
class PythonPreload:
    """A ``preload=python`` service's script, resolved (launch/preload.py runs it).

    ``interpreter`` is the program when ``exec=`` names a Python interpreter
    (``options`` are the interpreter options written before the script); None
    when the program is the script itself, whose ``#!`` line names the
    interpreter (read by the worker, as the service's user, as the kernel would).
    ``argv`` is the script's ``sys.argv``: the script's path, then its arguments.
    ``stamp`` is the script's (device, inode, mtime ns, size) when the config was
    loaded (None: not there): a reload that sees another stamp restarts the
    service's workers, so a changed script is picked up.
    """

    script: str
    interpreter: str | None
    options: tuple[str, ...]
    argv: tuple[str, ...]
    modules: tuple[str, ...] = ()  # preload_modules: imported besides the script's own
    stamp: tuple[int, int, int, int] | None = None


@dataclass(frozen=True, slots=True)
class Options:
    """poolinetd's extension keys for one service (or the file's ``defaults``).

    None means "not set here": resolution falls back to the file's
    ``defaults`` definition, then to the command line, then to the built-in
    defaults below. Exceptions: ``max_connections``/``max_programs`` are
    global caps (``defaults`` and command line only; the command line wins),
    and ``limits`` is only set for ``defaults`` and the command line (an
    entry's own limits are ``ServiceSpec.limits``).
    """

    pool_min: int | None = None  # workers kept booted even when idle
    pool_max: int | None = None  # workers at most
    worker_connections: int | None = None  # connections one worker serves at once
    max_requests: int | None = None  # recycle a worker after this many (0 = never)
    idle_timeout: float | None = None  # seconds a surplus idle worker lives
    conn_timeout: float | None = None  # seconds a built-in connection may stay silent
    stderr: StderrRoute | None = None
    env: tuple[tuple[str, str], ...] = ()  # extra environment for launched programs
    preload: PreloadKind | None = None  # preload=python: fork a preloaded interpreter
    preload_modules: tuple[str, ...] | None = None  # imported by the preloader too
    only_from: AddressList | None = None  # xinetd: only these sources may connect
    no_access: AddressList | None = None  # xinetd: these sources may not (wins)
    source_v4_prefix: int | None = None  # per-source limits count IPv4 sources by /N
    source_v6_prefix: int | None = None  # ... and IPv6 sources by /N
    block_time: float | None = None  # seconds a source over max_cpm_per_ip is refused
    reuseport: bool | None = None  # SO_REUSEPORT on the listeners
    proxy_protocol: bool | None = None  # PROXY v1/v2 header first (entries only)
    proxy_from: AddressList | None = None  # the proxies trusted to send it
    tcp_wrappers: bool | None = None  # hosts.allow/hosts.deny judge it (--tcp-wrappers)
    max_connections: int | None = None  # global cap (0 = explicitly none: lifts the file's)
    max_programs: int | None = None  # global cap on running programs (0 as above)
    # xinetd's process controls for launched programs (RLIM_UNLIMITED = "unlimited").
    rlimit_as: int | None = None  # bytes of address space
    rlimit_cpu: int | None = None  # seconds of CPU
    rlimit_data: int | None = None  # bytes of data segment
    rlimit_rss: int | None = None  # bytes resident (Linux ignores it; kept for xinetd files)
    rlimit_stack: int | None = None  # bytes of stack
    rlimit_files: int | None = None  # open files (RLIMIT_NOFILE)
    rlimit_nproc: int | None = None  # processes of the service's user
    rlimit_core: int | None = None  # bytes of core file (0 = none)
    nice: int | None = None  # -20..19
    umask: int | None = None  # 0..0o777
    # Socket controls for the service's listeners (and the connections they accept).
    rcvbuf: int | None = None  # SO_RCVBUF bytes
    sndbuf: int | None = None  # SO_SNDBUF bytes
    keepalive: bool | None = None  # SO_KEEPALIVE (stream tcp)
    nodelay: bool | None = None  # TCP_NODELAY (stream tcp)
    backlog: int | None = None  # listen(2) backlog (connection types)
    defer_accept: int | None = None  # TCP_DEFER_ACCEPT seconds (stream tcp; 0 = off)
    limits: Limits = field(default_factory=Limits)  # defaults/command line only


# An rlimit_* written as "unlimited" (the value of resource.RLIM_INFINITY on Linux).
RLIM_UNLIMITED = -1
# The rlimit_* keys and the resource.RLIMIT_* they set, in the order docs list them.
RLIMIT_KEYS: tuple[tuple[str, str], ...] = (
    ("rlimit_as", "RLIMIT_AS"),
    ("rlimit_cpu", "RLIMIT_CPU"),
    ("rlimit_data", "RLIMIT_DATA"),
    ("rlimit_rss", "RLIMIT_RSS"),
    ("rlimit_stack", "RLIMIT_STACK"),
    ("rlimit_files", "RLIMIT_NOFILE"),
    ("rlimit_nproc", "RLIMIT_NPROC"),
    ("rlimit_core", "RLIMIT_CORE"),
)


@dataclass(frozen=True, slots=True)
class ProcessControls:
    """What a launched program starts with besides the launch contract (resolved).

    ``rlimits`` holds (key, value) for each rlimit_* set anywhere along the
    chain, in RLIMIT_KEYS order (value RLIM_UNLIMITED = no limit); None for
    ``nice``/``umask`` = inherited from poolinetd (nice 0, umask 022 under
    systemd). How each is applied in both modes: launch/program.py.
    """

    rlimits: tuple[tuple[str, int], ...] = ()
    nice: int | None = None
    umask: int | None = None

    @property
    def empty(self) -> bool:
        return not self.rlimits and self.nice is None and self.umask is None


@dataclass(frozen=True, slots=True)
class SocketControls:
    """Socket options for a service's listeners (resolved; None/False = kernel default).

    ``backlog`` is always set (DEFAULT_BACKLOG when no key says otherwise).
    keepalive and nodelay are set on the listener: Linux copies them to every
    socket accept() returns (ops/listeners.py says how that is verified).
    """

    backlog: int
    rcvbuf: int | None = None
    sndbuf: int | None = None
    keepalive: bool = False
    nodelay: bool = False
    defer_accept: int = 0


# Built-in defaults (documented in docs/configuration.md). Command-line flags override them.
DEFAULT_POOL_MIN = 1
# Launching a program blocks its worker for the exec (posix_spawn is vfork-like),
# so a program service keeps two workers ready and spreads launches over them.
DEFAULT_POOL_MIN_PROGRAM = 2
DEFAULT_POOL_MAX = 16
DEFAULT_WORKER_CONNECTIONS_INTERNAL = 256
DEFAULT_WORKER_CONNECTIONS_PROGRAM = 64
# Connections a program service's worker may have queued but not yet launched
# (see PoolSettings.launch_depth). 3: one being launched, one launched whose
# SPAWNED goes up with the turn's other reports, and the next already there, so
# the worker does not wait a round trip to the master between two launches; more
# queue behind one slow posix_spawn (benchmarks/README.md, "History of the launch tail").
PROGRAM_LAUNCH_DEPTH = 3
# A worker is blocked in each posix_spawn until its child has exec'd, and that child
# needs a core: so a program service whose every worker is busy launching grows,
# up to one worker more than this machine has cores (more only queue for the
# same cores; benchmarks/README.md, "Launched programs").
PROGRAM_LAUNCH_WORKERS = len(os.sched_getaffinity(0)) + 1
DEFAULT_MAX_REQUESTS = 0
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_CONN_TIMEOUT = 300.0
DEFAULT_BACKLOG = 1024  # listen(2) backlog (SOMAXCONN caps it in the kernel)
DEFAULT_SOURCE_V4_PREFIX = 32  # per-source limits count each IPv4 address ...
# ... and IPv6 sources by their /64: one host usually holds a whole /64 (SLAAC,
# privacy addresses), so counted per address one host would be many sources and
# could take a whole service (issue 21). systemd and others group by /64 too.
DEFAULT_SOURCE_V6_PREFIX = 64
# Safe default: without a per-source concurrency limit written anywhere, one source
# may hold at most 1/SAFE_SHARE of a connection service's capacity (config/settings.py).
SAFE_SHARE = 4


@dataclass(frozen=True, slots=True)
class UnixPerms:
    """FreeBSD's ``:user:group:mode:/path`` prefix for a unix socket."""

    owner: str | None
    group: str | None
    mode: int | None


# ONC RPC (rpcbind) bounds: programs and versions are XDR unsigned ints, read here up to
# 2**31-1 (every assigned and transient program number is below it). An entry registers
# every version of its range, so the range is bounded (one SET and one UNSET each).
RPC_NUMBER_MAX = 0x7FFF_FFFF
RPC_VERSIONS_MAX = 32


@dataclass(frozen=True, slots=True)
class RpcSpec:
    """An ONC RPC entry's versions as written: ``rstatd/1-5`` is low 1, high 5.

    The program (a name from /etc/rpc, or a number) is ``ServiceSpec.service``;
    ``ServiceSpec.protocol`` is the transport behind ``rpc/``: ``rpc/udp`` is
    ``udp``, ``rpc/udp6`` ``udp6``, ``rpc/*`` ``udp46`` (or ``tcp46`` for stream).
    """

    low: int
    high: int


@dataclass(frozen=True, slots=True)
class RpcProgram:
    """A resolved RPC service: what is registered with rpcbind for its one socket.

    ``netids`` are rpcbind's transport names (``udp``, ``udp6``, ``tcp``, ``tcp6``):
    one for a v4 or v6 socket, both for a dual-stack ``rpc/*`` socket.
    """

    number: int
    low: int
    high: int
    netids: tuple[str, ...]

    @property
    def versions(self) -> range:
        return range(self.low, self.high + 1)


class AtLimit(enum.Enum):
    """What a connection meets while its service runs ``limits.max_child`` instances."""

    BACKLOG = "backlog"  # inetd's max_child: it waits in the listen queue, not accepted
    REFUSE = "refuse"  # xinetd's instances: accepted and refused at once ("instances")


@dataclass(frozen=True, slots=True)
class FieldLoc:
    """Where one part of an entry was written: line, 1-based field index, token as written.

    For key-values definitions the field index counts the service (1),
    ``on``/``off`` (2), then each ``key=value`` option in order (3, 4, ...).
    """

    lineno: int
    field: int
    token: str


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """The raw fields of one entry, as written (names not yet looked up).

    ``source``/``lineno`` locate the entry; they do not take part in
    equality, so moving an entry in the file does not make it "changed".
    """

    service: str  # a name from /etc/services, a port number, or a unix path
    socket_type: SocketType
    protocol: Protocol
    wait: bool
    user: str
    server: str  # "internal" or an absolute path
    argv: tuple[str, ...] = ()  # argv[0] first; for internal: optional built-in name
    addresses: tuple[str, ...] = ()  # host prefix; () = the wildcard address
    group: str | None = None
    login_class: str | None = None
    limits: Limits = field(default_factory=Limits)
    tcpmux: str | None = None  # NAME of a ``tcpmux/NAME`` entry
    tcpmux_plus: bool = False  # ``tcpmux/+NAME``: inetd sends the "+" reply
    rpc: RpcSpec | None = None  # an ONC RPC entry (``rpc/...``): ``service`` is the program
    unix_perms: UnixPerms | None = None
    options: Options = field(default_factory=Options)
    enabled: bool = True  # key-values ``off``
    # xinetd's ``cps N M``: limits.max_spawn_per_min = N counts the starts of the last
    # spawn_window (1.0) seconds, and over it the service rests spawn_pause (M) seconds.
    # None: the inetd rule (per minute, then admission.policy.LOOPING_PAUSE).
    spawn_window: float | None = None
    spawn_pause: float | None = None
    # xinetd's banner_fail: the file's bytes, read when the config is loaded, sent to a
    # refused client with one non-blocking send before the close (engine/accept.py).
    banner_fail: bytes | None = field(default=None, repr=False)
    # xinetd's banner (sent to every client as soon as it is accepted, before anything
    # else) and banner_success (to a client about to be served, before its server runs).
    banner: bytes | None = field(default=None, repr=False)
    banner_success: bytes | None = field(default=None, repr=False)
    at_limit: AtLimit = AtLimit.BACKLOG
    source: str = field(default="<string>", compare=False)
    lineno: int = field(default=0, compare=False)
    # Where each part was written, keyed by role ("service", "socket_type",
    # "protocol", "wait", "user", "server", "argv", or a key-values key such
    # as "pool_min"), so resolution errors can name the exact field.
    locs: tuple[tuple[str, FieldLoc], ...] = field(default=(), compare=False, repr=False)

    @property
    def is_internal(self) -> bool:
        return self.server == "internal"

    def loc(self, role: str) -> FieldLoc:
        """The location of ``role``; falls back to the service field, then the entry's line."""
        for name, where in self.locs:
            if name == role:
                return where
        for name, where in self.locs:
            if name == "service":
                return where
        return FieldLoc(self.lineno, 0, self.service)


@dataclass(frozen=True, slots=True)
class Include:
    """A NetBSD ``.include PATTERN`` line; expanded by ``resolve.load_file``, not by ``parse``.

    ``position`` is the number of specs of the including file that precede it,
    so included entries keep their place in file order.
    """

    pattern: str
    source: str
    lineno: int
    position: int


@dataclass(frozen=True, slots=True)
class ParsedConfig:
    """What ``parse`` returns: every entry it could read and every diagnostic."""

    specs: tuple[ServiceSpec, ...]
    defaults: Options
    diagnostics: tuple[Diagnostic, ...]
    includes: tuple[Include, ...] = ()

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity is Severity.ERROR)

    @property
    def warnings(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity is Severity.WARNING)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One socket to listen on.

    ``family`` is ``socket.AF_INET``, ``AF_INET6`` or ``AF_UNIX`` (as an int
    so this module stays free of the socket module); ``address`` is a
    numeric host (``0.0.0.0``, ``::``) or, for unix, the path; ``port`` is 0
    for unix (and may be 0 for "any free port": the listener reports it).
    ``v6only`` is False only for ``tcp46``/``udp46``.
    """

    family: int
    address: str
    port: int
    v6only: bool = True


@dataclass(frozen=True, slots=True)
class ServiceKey:
    """Identity across a reload: same endpoints and socket type = same service.

    ``label`` is the display name for services that ask for port 0 ("any free
    port"): their endpoints alone do not tell them apart. Empty otherwise.
    """

    socket_type: SocketType
    is_udp: bool
    endpoints: tuple[Endpoint, ...]
    label: str = ""


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Resolved pool sizing for one service (all defaults applied)."""

    pool_min: int
    pool_max: int
    worker_connections: int
    max_requests: int
    idle_timeout: float
    # False: the most recently used worker below its cap takes the next connection
    # (built-ins: one warm process serves many). True: the least loaded one does
    # (programs: launches run in parallel on several cores).
    spread: bool = False
    # Programs: how many connections a worker may hold that it has not launched yet
    # (handed, no SPAWNED or DONE back). 0 = no limit (built-ins). Past it the
    # connection waits in the kernel's FIFO backlog, not in one busy worker's channel.
    launch_depth: int = 0
    # Programs: while every READY worker is at launch_depth, the pool grows up to this
    # many workers (within pool_max). 0 = never for that reason (built-ins).
    launch_workers: int = 0


@dataclass(frozen=True, slots=True)
class SocketOwner:
    """A unix socket's resolved ``:owner:group:mode:`` prefix; -1 = leave as created."""

    uid: int
    gid: int
    mode: int | None  # None = the listener's default mode


@dataclass(frozen=True, slots=True)
class Service:
    """A spec resolved to what the runtime needs.

    Exactly one of ``internal`` (a built-in's name, e.g. "echo") and
    ``program`` (an absolute path, launched with ``argv``) is set. The built-in
    ``"tcpmux"`` is the RFC 1078 listener: the engine reads the request line and
    hands the connection to the sub-service of that name. A sub-service
    (``tcpmux_name`` set) has no endpoints (``key.endpoints == ()``) and is
    reached only through a tcpmux listener.
    """

    spec: ServiceSpec
    name: str  # display name, e.g. "echo/tcp", "7007/tcp", "/run/echo.sock/unix"
    key: ServiceKey
    uid: int
    gid: int
    groups: tuple[int, ...]
    user_name: str
    home: str
    internal: str | None
    program: str | None
    argv: tuple[str, ...]
    pool: PoolSettings
    conn_timeout: float
    stderr: StderrRoute
    env: tuple[tuple[str, str], ...]
    limits: Limits  # resolved: defaults and the safe default applied (see Limits)
    socket_owner: SocketOwner | None = None  # unix sockets with a FreeBSD perms prefix
    only_from: AddressList = field(default_factory=AddressList)  # empty = no list (everyone)
    no_access: AddressList = field(default_factory=AddressList)  # empty = none; wins
    source_v4_prefix: int = DEFAULT_SOURCE_V4_PREFIX  # 0-32
    source_v6_prefix: int = DEFAULT_SOURCE_V6_PREFIX  # 0-128
    block_time: float = 0.0  # seconds; 0 = refuse only what is over the rate
    reuseport: bool = False  # listeners get SO_REUSEPORT
    proxy_protocol: bool = False  # a PROXY v1/v2 header comes first
    proxy_from: AddressList = field(default_factory=AddressList)  # who may send it (not unix)
    # tcp_wrappers: the daemon name hosts.allow/hosts.deny judge it under; None = not judged
    tcp_wrappers: str | None = None
    tcpmux_name: str | None = None  # a tcpmux sub-service: its name, lower-cased
    tcpmux_plus: bool = False  # tcpmux/+NAME: poolinetd sends "+Go" before handing over
    rpc: RpcProgram | None = None  # an ONC RPC service: registered with rpcbind while open
    process: ProcessControls = field(default_factory=ProcessControls)  # programs only
    preload: PythonPreload | None = None  # preload=python (pool mode forks it per connection)
    sockopts: SocketControls = field(
        default_factory=lambda: SocketControls(backlog=DEFAULT_BACKLOG))

    @property
    def socket_type(self) -> SocketType:
        return self.spec.socket_type

    @property
    def wait(self) -> bool:
        return self.spec.wait


# The RFC 1078 multiplexer: a built-in the engine answers in its preamble stage, so it
# has no row (no handler) in internal.TABLE; resolve.py accepts it on stream tcp only.
TCPMUX = "tcpmux"
# What ``internal NAME`` may name besides tcpmux: the config language's vocabulary.
# builtins/internal.py implements exactly these (tests/test_builtins_table.py checks).
BUILTIN_NAMES: tuple[str, ...] = ("echo", "discard", "chargen", "daytime", "time")
