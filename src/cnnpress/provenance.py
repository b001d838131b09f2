"""Where a number came from: the command, the git commit and the machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from cnnpress.errors import CnnpressError

__all__ = [
    "ALLOW_DIRTY_HELP",
    "git_commit",
    "machine",
    "provenance",
    "require_clean",
    "require_clean_or_exit",
    "result_provenance",
    "script_provenance",
    "write_result",
]

#: The help text of every ``--allow-dirty`` flag (``cnnpress compare`` and the benchmarks).
ALLOW_DIRTY_HELP = (
    "write the result even if the git working tree has uncommitted changes "
    '(recorded as "dirty": true)'
)


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


def require_clean(allow_dirty: bool = False) -> str | None:
    """The commit of the working tree, refusing one with uncommitted changes.

    A result (``cnnpress compare``'s report, a benchmark's JSON) must come from a committed
    tree, so that its commit says what code made it. Outside git the commit is unknown
    (``None``) and nothing is refused.

    Raises:
        CnnpressError: The tree has uncommitted changes to tracked files and ``allow_dirty``
            is false.
    """
    commit = git_commit()
    if commit is not None and commit.endswith("+dirty") and not allow_dirty:
        raise CnnpressError(
            f"the git working tree has uncommitted changes ({commit}), so the result would not "
            "match any commit; commit them or measure from a clean checkout (git worktree add), "
            "or pass --allow-dirty to write it marked as dirty"
        )
    return commit


def require_clean_or_exit(allow_dirty: bool = False) -> None:
    """:func:`require_clean` for scripts: one ``error:`` line on stderr and exit code 2."""
    try:
        require_clean(allow_dirty)
    except CnnpressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def result_provenance(
    command: list[str] | None = None, allow_dirty: bool = False
) -> dict[str, Any]:
    """:func:`provenance` for a results file: refuses a dirty tree (see :func:`require_clean`)
    unless ``allow_dirty``, and records ``"dirty"`` (``None`` outside git)."""
    commit = require_clean(allow_dirty)
    return {
        **provenance(command),
        "commit": commit,
        "dirty": None if commit is None else commit.endswith("+dirty"),
    }


def script_provenance(out: object, allow_dirty: bool, argv: list[str] | None = None) -> dict:
    """:func:`result_provenance` for a benchmark script run as ``python SCRIPT ARGS``.

    The tree must be clean only when the result goes to a file (``out`` is set); the command
    is recorded as it was typed.
    """
    argv = sys.argv if argv is None else argv
    return {
        **result_provenance(argv, allow_dirty=allow_dirty or not out),
        "command": "python " + " ".join(argv),
    }


def write_result(path: str | Path | None, result: dict[str, Any]) -> None:
    """Write a results file as indented JSON; nothing when ``path`` is ``None``."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
