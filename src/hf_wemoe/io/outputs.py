"""Output folders that appear whole or not at all: the one implementation every writer of a folder uses.

`atomic_output_dir` hands out a hidden staging folder beside the target (`.<name>.tmp-<host>-<pid>-XXXX`) and
renames it into place only when the block finishes:

- a failed or interrupted run leaves nothing at the target, and removes the parent folders it created;
- the folder and its files get the permissions of any new folder and file (the umask), not the private ones
  of temporary files;
- an existing target is refused unless `overwrite`, a target that is not a folder always; with `overwrite` it
  is replaced only once the new folder is complete, in one atomic exchange where the system has one, and put
  back if the rename fails;
- an output that another run installed while this one was writing is never replaced silently: without
  `overwrite` the run fails with `OutputExistsError` and the other output stays;
- staging folders of runs that were killed (`kill -9`, power loss) are removed by the next run for the same
  target; their names carry the host and the process id, so the folder of a live run is never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from hf_wemoe.errors import WEMoEError

# Identifies this machine in staging names: a process id only says something about processes of one host.
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class OutputExistsError(WEMoEError):
    """The output folder exists (it may have appeared while this run was writing it) and may not be replaced."""


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """The absolute output path, after refusing what no run could write, before any expensive work starts.

    Refuses an existing output (unless `overwrite`), a target that is not a folder, and a place where no
    folder can be created (a parent that is a file, or not writable). Cleans up after killed runs that wrote
    the same output first (see `recover_stale_outputs`).
    """
    path = Path(path).expanduser().absolute()
    recover_stale_outputs(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise WEMoEError(f"output '{path}' exists and is not a folder; choose another output folder")
        if not overwrite:
            raise OutputExistsError(
                f"output folder '{path}' already exists; pass --overwrite to replace it or choose another folder"
            )
    _check_writable(path)
    return path


def _check_writable(path: Path) -> None:
    """Create and remove a folder where the output's staging folder will go (or its first missing parent)."""
    anchor = path.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise WEMoEError(f"cannot create the output folder '{path}': '{anchor}' is not a folder")
    try:
        make_staging_dir(anchor, f".{path.name}.tmp").rmdir()
    except OSError as err:
        raise WEMoEError(
            f"cannot write the output folder '{path}': no folder can be created in '{anchor}' "
            f"({err.strerror or err}); choose another output folder"
        ) from err


def check_output_file(path: str | Path, flag: str) -> Path:
    """Refuse an output file that cannot be written (a folder, under a file, in a read-only folder) before any
    expensive work starts."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise WEMoEError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'eval_results.json'}")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise WEMoEError(f"{flag} {path} cannot be written: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise WEMoEError(f"{flag} {path} cannot be written (no permission); choose another path")
    return path


@contextlib.contextmanager
def atomic_output_dir(
    path: str | os.PathLike,
    overwrite: bool = False,
    *,
    replaceable: Callable[[Path], None] | None = None,
) -> Iterator[Path]:
    """Yield an empty hidden staging folder beside `path`; on success it becomes `path`, on any error it is deleted.

    Args:
        path: the output folder.
        overwrite: replace an existing folder (once the new one is complete).
        replaceable: called with the existing folder before it is replaced; raises to refuse (e.g. a folder that
            is not what this writer writes).

    Raises:
        OutputExistsError: the output exists, or appeared while the block ran, and `overwrite` is false.
        WEMoEError: the output is not a folder, or no folder can be created beside it.
    """
    path = check_output_dir(path, overwrite)
    if path.exists() and replaceable is not None:
        replaceable(path)
    parent = path.parent
    created = [folder for folder in [parent, *parent.parents] if not folder.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = make_staging_dir(parent, f".{path.name}.tmp")
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary folder
    except OSError as err:
        _remove_created(created)
        raise WEMoEError(f"cannot create a folder beside '{path}': {err.strerror or err}") from err
    try:
        yield staging
        _normalise_permissions(staging)
        _install(staging, path, overwrite, replaceable)
    except BaseException:
        _remove(staging)
        _remove_created(created)
        raise


def _install(staging: Path, path: Path, overwrite: bool, replaceable: Callable[[Path], None] | None) -> None:
    """Rename the finished staging folder to `path`, never over an output that is not ours to replace."""
    if not (path.exists() or path.is_symlink()):
        try:
            _rename_noreplace(staging, path)
            return
        except FileExistsError:
            pass  # another run installed the same output meanwhile
    if not path.is_dir():
        raise WEMoEError(f"output '{path}' exists and is not a folder; choose another output folder")
    if not overwrite:
        raise OutputExistsError(
            f"output folder '{path}' appeared while this run was writing it (another run with the same output?); "
            "it was left as it is; pass --overwrite to replace it or choose another folder"
        )
    if replaceable is not None:
        replaceable(path)
    _replace(staging, path)


def _replace(staging: Path, path: Path) -> None:
    """Put the complete `staging` folder at `path` and delete the folder that was there."""
    if _renameat2(staging, path, _RENAME_EXCHANGE):
        _remove(staging)  # the exchange left the previous output here
        return
    old = make_staging_dir(path.parent, f".{path.name}.old")
    os.rename(path, old / path.name)
    try:
        _rename_noreplace(staging, path)
    except BaseException:
        os.rename(old / path.name, path)
        old.rmdir()
        raise
    _remove(old)


def _rename_noreplace(source: Path, target: Path) -> None:
    """Rename `source` to `target`, raising FileExistsError if `target` exists (whatever it is)."""
    if _renameat2(source, target, _RENAME_NOREPLACE):
        return
    # No atomic no-replace rename here: claim the name with mkdir (which fails if it exists), then rename over
    # the empty folder we own.
    os.mkdir(target)
    try:
        os.rename(source, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(target)
        raise


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux `renameat2`: True when done, False where the system or file system lacks it; OSError otherwise."""
    function = _renameat2_function()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    if code == errno.EEXIST:
        raise FileExistsError(code, os.strerror(code), str(source), None, str(target))
    raise OSError(code, os.strerror(code), str(source), None, str(target))


_renameat2_cache: list = []


def _renameat2_function():
    if not _renameat2_cache:
        function = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                function = ctypes.CDLL(None, use_errno=True).renameat2
                function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                function.restype = ctypes.c_int
        _renameat2_cache.append(function)
    return _renameat2_cache[0]


# ----------------------------------------------------------------------------------------------------------------
# Staging folders and what killed runs leave behind


def make_staging_dir(parent: str | os.PathLike, stem: str) -> Path:
    """A fresh private folder `parent/<stem>-<host>-<pid>-XXXX` (the name says whose it is, see
    `remove_stale_staging`)."""
    return Path(tempfile.mkdtemp(prefix=f"{stem}-{_HOST}-{os.getpid()}-", dir=parent))


def remove_stale_staging(parent: str | os.PathLike, stem: str) -> list[Path]:
    """Delete the folders `make_staging_dir(parent, stem)` made for processes of this host that have ended.

    Folders of live processes, of other hosts, and anything not named like a staging folder are left alone.
    Returns the folders removed.
    """
    removed = []
    for folder in _stale(Path(parent), stem):
        _remove(folder)
        removed.append(folder)
    return removed


def recover_stale_outputs(path: str | os.PathLike) -> None:
    """Clean up after killed runs writing `path`: delete their staging folders, and put back a previous output
    that a killed replacement had moved aside (when nothing took its place), else delete it."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    remove_stale_staging(path.parent, f".{path.name}.tmp")
    for old in _stale(path.parent, f".{path.name}.old"):
        if (old / path.name).is_dir() and not (path.exists() or path.is_symlink()):
            with contextlib.suppress(OSError):
                _rename_noreplace(old / path.name, path)
        _remove(old)


def _stale(parent: Path, stem: str) -> list[Path]:
    prefix = f"{stem}-{_HOST}-"
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    stale = []
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix) :].partition("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)) and entry.is_dir() and not entry.is_symlink():
            stale.append(entry)
    return stale


def _process_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs (unknown counts as alive: nothing is deleted on a guess)."""
    if pid == os.getpid() or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _remove_created(created: list[Path]) -> None:
    """Remove the (empty) parent folders a run created, innermost first."""
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _normalise_permissions(folder: Path) -> None:
    """Give the folder's contents the permissions of new files and folders; writers that go through private
    temporary files (0600) would otherwise leave files only their owner can read."""
    umask = _umask()
    for entry in folder.rglob("*"):
        if entry.is_symlink():
            continue
        if entry.is_dir():
            os.chmod(entry, 0o777 & ~umask)
        elif entry.is_file():
            executable = entry.stat().st_mode & 0o111
            os.chmod(entry, (0o777 if executable else 0o666) & ~umask)


def _umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it races with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


__all__ = [
    "OutputExistsError",
    "atomic_output_dir",
    "check_output_dir",
    "make_staging_dir",
    "recover_stale_outputs",
    "remove_stale_staging",
]
