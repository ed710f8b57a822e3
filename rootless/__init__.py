"""rootless: run daemons as root in user, mount and network namespaces, unprivileged.

A drop-in for rootlesskit. The command-line entry point is `rootless.cli.main`.
"""
__version__ = "0.1.0"
