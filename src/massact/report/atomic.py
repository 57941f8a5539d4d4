"""Write a set of files (a report, a comparison) so that a reader never pairs files of two runs.

The whole set is written into a fresh hidden directory next to the output directory, which is then exchanged with
it in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``): a reader, or a kill at any moment, sees either the
complete previous directory or the complete new one. Files already in the output directory that are not
massact's (a user's notes) are carried over as hard links, so they stay; massact's own files that this run does not
write (a figure of a format not chosen, an old report.html under ``--format json``) belong to the previous run and
go with it. Where the exchange cannot be done (the directory holds a subdirectory or the working directory, its
parent is not writable, or the filesystem or platform has no exchange) each file is still replaced whole, all of
them written before the first is renamed, report.json last.

Write errors (a full disk, a read-only place) become one ``UsageError`` line, and nothing half-written is left.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from ..errors import UsageError
from ..writes import replace_whole

_STAGING = re.compile(r"^\.(?P<name>.+)\.massact-(?P<pid>\d+)$")  # a staging directory: .<out name>.massact-<pid>
# Files massact writes in an output directory (with their hidden partials): replaced by a new set, never carried.
_PARTIAL = re.compile(r"^\..*\.partial(-\d+)?$")
_OWN = re.compile(r"^(report\.(txt|json|html)|protect\.json|profile\.json|quantization\.(json|txt)|compare\.html|compare_profiles\.png|"
                  r"track\.(json|txt|html)|track_\w+\.png|atlas\.(json|csv|html)|atlas_\w+\.png|scan-state\.pt.*)$")


def _own(name: str) -> bool:
    from .plots import FIGURES

    return bool(_OWN.match(name) or _PARTIAL.match(name)) or name in FIGURES


def check_writable(out: Path) -> None:
    """Fail now, before any slow work, when ``out`` cannot be created and written: one line naming why. Creates no
    lasting directory: what it made to try is removed again."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"cannot write the report to {out}: it is a file, not a directory")
    missing = []
    parent = out
    while not parent.exists():
        missing.append(parent)
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"cannot write the report to {out}: {parent} is a file, not a directory")
    # Several processes of one launch check the same --out at once: a directory one of them makes (and removes) can
    # appear or vanish under another, which then tries again.
    for attempt in range(5):
        created: list[Path] = []
        try:
            for directory in reversed(missing):
                directory.mkdir(exist_ok=True)
                created.append(directory)
            handle, probe = tempfile.mkstemp(dir=out, prefix=".massact-probe-")
            os.close(handle)
            os.unlink(probe)
            return
        except FileNotFoundError:
            if attempt == 4:
                raise UsageError(f"cannot write the report to {out}: its directory keeps vanishing") from None
        except OSError as error:
            raise UsageError(f"cannot write the report to {out}: {error.strerror or error}") from None
        finally:
            for directory in reversed(created):
                try:
                    directory.rmdir()
                except OSError:
                    pass


def write_set(out: Path, contents: dict[str, str | bytes], keep: bool = False) -> list[Path]:
    """Write ``contents`` (file name -> text or bytes) as ``out``'s set of files, atomically as a whole where the
    filesystem allows it (see the module's docstring). ``keep``: massact's other files stay too (the quantization
    files written next to a report). Returns the paths written, under ``out`` as given."""
    real = Path(os.path.realpath(out))  # a symlinked directory: replace what it points to, not the link
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(real)
        if not _write_swapped(real, contents, keep):
            _write_in_place(real, contents, keep)
    except OSError as error:
        raise UsageError(f"cannot write the report to {out}: {error.strerror or error}") from None
    return [Path(out) / name for name in contents]


def _write_swapped(out: Path, contents: dict[str, str | bytes], keep: bool) -> bool:
    """Stage the set next to ``out`` and exchange; False (nothing changed) where that cannot be done."""
    if out.exists() and (not out.is_dir() or not _flat(out) or _holds_cwd(out)):
        return False
    staging = out.with_name(f".{out.name}.massact-{os.getpid()}")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # the parent is not ours to write: in place
            return False
        raise
    try:
        for name, content in contents.items():
            _write(staging / name, content)
        if not out.exists():
            os.rename(staging, out)  # a new directory appears whole
            return True
        os.chmod(staging, stat.S_IMODE(out.stat().st_mode))
        for entry in os.scandir(out):  # the user's own files stay: the same inodes under the new directory
            if entry.name not in contents and not _PARTIAL.match(entry.name) and (keep or not _own(entry.name)):
                os.link(entry.path, staging / entry.name, follow_symlinks=False)
        return _exchange(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # unfinished, or after the exchange the previous set


def _write_in_place(out: Path, contents: dict[str, str | bytes], keep: bool) -> None:
    """Each file whole: every partial written first, then renamed, report.json last; partials removed on error. Then,
    unless ``keep``, massact's own files of the previous set that this one does not write are removed, as the
    exchange would have taken them away (a track's old track.html beside a new --format json track)."""
    out.mkdir(parents=True, exist_ok=True)
    partials = {name: out / f".{name}.partial-{os.getpid()}" for name in contents}
    try:
        for name, content in contents.items():
            _write(partials[name], content)
        for name in sorted(contents, key=lambda n: n == "report.json"):
            os.replace(partials[name], out / name)
    finally:
        for partial in partials.values():
            partial.unlink(missing_ok=True)
    if not keep:
        for entry in os.scandir(out):
            if entry.name not in contents and _own(entry.name) and not _PARTIAL.match(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)


def write_file(path: Path, content: str) -> None:
    """One file written whole or not at all (a temporary file beside it, renamed over it); a folder that is missing
    or not writable is one UsageError line."""
    if not path.parent.is_dir():
        raise UsageError(f"{path}: its folder {path.parent} does not exist")
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not a file")
    try:
        replace_whole(path, lambda partial: _write(partial, content))
    except OSError as error:  # not ours to write, a full disk, a place that takes no files (/proc)
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None


def _write(path: Path, content: str | bytes) -> None:
    try:
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    except BaseException:  # a full disk: do not leave it full of a partial file
        path.unlink(missing_ok=True)
        raise


def _flat(directory: Path) -> bool:
    """True when every entry is a regular file or a link to one (so it can be carried over as a hard link)."""
    return all(entry.is_file(follow_symlinks=False) or entry.is_symlink() and not entry.is_dir() for entry in os.scandir(directory))


def _holds_cwd(directory: Path) -> bool:
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return False
    return cwd == directory or directory in cwd.parents


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the platform or filesystem has none."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EXDEV, errno.EBUSY, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _remove_stale(out: Path) -> None:
    """Staging directories of ``out`` left by a killed run (its process is gone) are removed. They hold nothing of
    the user's that ``out`` does not: a set never swapped in, or the previous set after the swap (carried-over files
    are hard links, also in ``out``)."""
    for entry in out.parent.iterdir():
        match = _STAGING.match(entry.name)
        if match and match["name"] == out.name and not _alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
