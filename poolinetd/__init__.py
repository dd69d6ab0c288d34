"""poolinetd: an inetd whose master hands accepted connections to pre-forked worker pools.

The package is cut by layer; a module imports only from layers below its own
(tests/test_layers.py enforces it), so this list, read bottom-up, is the
architecture (docs/design.md tells the whole story):

    cli, check, __main__   entry points: command line, config check, exit codes
    pool/, classic/        the two modes (Dispatcher implementations)
    engine/                the master's loop, accept stage, reload, upgrade, status
    ops/                   listeners, activation, upgrade hand-over, pidfile,
                           sd_notify, control socket, metrics endpoint
    admission/ builtins/ launch/
                           who may connect; the built-in services; how a
                           process is started (privileges, environment, spawn)
    config/                inetd.conf -> frozen, resolved specs (pure)
    net/                   address matching and preamble wire formats (pure)
    observe/               logs, metrics, throttles, stage trace
"""

__version__ = "0.1.0"
