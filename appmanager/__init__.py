"""appmanager: a multi-language application server and process manager."""

__version__ = "0.1.0"
