"""What travels to the GPU machine with the check, and whether it fits the 64 MiB a ``run`` call may send.

A ``run`` call sends the working tree (tracked files and untracked files git does not ignore) plus the ignored
folders named in ``carry``: ``.whl`` (the wheels, ``fetch_wheels.sh``) and ``.gpu-data`` (the la2018 copy,
``make_data.py``).

    python benchmarks/gpu/travel.py     # sizes of tree, wheels and data, and the total against 64 MiB

Standard library and git only.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIMIT_BYTES = 64 * 2**20
CARRY = (".whl", ".gpu-data")


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of the files a ``run`` call sends without ``carry``: tracked, and untracked but not ignored.

    Raises:
        RuntimeError: ``repo`` is not a git checkout (or git is missing).
    """
    try:
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"cannot list the files of {repo} with git ({exc}); run this in a git checkout") from exc
    total = 0
    for name in set(out.decode("utf-8", "replace").split("\0")):
        path = repo / name
        if name and path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def folder_bytes(folder: Path) -> int:
    """Total size of the regular files under ``folder`` (0 if it does not exist)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def travelling_set(repo: Path = REPO) -> dict[str, int]:
    """Bytes per part: ``tree``, each carried folder, and ``total``."""
    sizes = {"tree": tree_bytes(repo)}
    for name in CARRY:
        sizes[name] = folder_bytes(repo / name)
    sizes["total"] = sum(sizes.values())
    return sizes


def main() -> int:
    sizes = travelling_set()
    for name, value in sizes.items():
        print(f"{name:10s} {value / 2**20:7.2f} MiB")
    ok = sizes["total"] < LIMIT_BYTES
    print(f"{'fits' if ok else 'TOO LARGE for'} the {LIMIT_BYTES // 2**20} MiB a run call may send")
    for name in CARRY:
        if not sizes[name]:
            print(f"note: {name} is empty or absent (fetch_wheels.sh / make_data.py make it)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
