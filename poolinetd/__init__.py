"""poolinetd: an inetd whose master hands accepted connections to pre-forked worker pools."""

__version__ = "0.1.0"
