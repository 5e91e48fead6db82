"""gcmd: a line-command server on gevent."""

__version__ = "1.0.0"
