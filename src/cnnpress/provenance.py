"""Where a number came from: the command, the git commit and the machine."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Any

import torch

__all__ = ["git_commit", "machine", "provenance"]


def git_commit() -> str | None:
    """The commit of the working tree (with ``+dirty`` when it has changes), if in git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    """CPU, core count, threads and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def provenance(command: list[str] | None = None) -> dict[str, Any]:
    """The command line, commit and machine, for results files."""
    argv = command if command is not None else sys.argv
    return {
        "command": " ".join(["cnnpress", *argv[1:]]),
        "commit": git_commit(),
        "machine": machine(),
    }
