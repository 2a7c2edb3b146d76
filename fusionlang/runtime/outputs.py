"""Where outputs may go: the save-path rules, and the leftovers of killed runs.

Torch-free, so `check` and `compile` can use it. The rules (docs/language.md, "Where
outputs go"), all resolved through symlinks (`os.path.realpath`):

- an output is not, does not contain, and is not inside an input model directory (nor
  contains any of an input's weight files);
- an output does not contain the spec or a spec file it imports;
- no two saves write to the same directory, and no output is inside another;
- an output that is a symlink points to an existing directory (the output replaces that
  directory, and the link keeps pointing at it); a dangling link is refused;
- an existing, non-empty output directory is replaced only when fusionlang wrote it (its
  README.md model card carries the `fusionlang` tag): anything else may be the user's.
  An earlier output is replaced whole, with whatever was put into it since (the
  regression case 02's rule: re-running a spec replaces its previous output);
- "the same directory" is decided by path (through symlinks) and by device and inode
  (bind mounts, case-insensitive file systems).

A run claims each output with a lock file `.NAME.fusionlang-lock-TOKEN` (TOKEN: its PID,
or its PID and a random part when another run with the same PID holds that), held with
`flock` until its commit is done; it writes `.NAME.fusionlang-tmp-TOKEN` next to the
output and, while committing, moves the previous output to `.NAME.fusionlang-old-TOKEN`.
`clean_leftovers` removes the folders of runs whose lock is not held (a SIGKILL), and
restores an `-old-` folder whose output is missing (a kill between the two renames of a
commit: it may be the only copy).
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
from dataclasses import dataclass

MARKER_TAG = "fusionlang"
INPUT_HINT = "choose an output directory that contains no input model or spec"


@dataclass
class Problem:
    """A save-path rule broken by output number `index` (E016)."""

    index: int
    message: str
    hint: str


def shown(path: str) -> str:
    """A path as the user sees it: relative to the working directory when that is shorter."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if len(rel) < len(path) else path


def _inside(child: str, parent: str) -> bool:
    """Is the real path `child` equal to or below the real path `parent`? By path, or by
    device and inode when `parent` exists (the same directory reached through a bind
    mount, or spelled in another case on a case-insensitive file system)."""
    if child == parent or child.startswith(parent.rstrip(os.sep) + os.sep):
        return True
    try:
        st = os.stat(parent)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in _ids_up(child)


def _ids_up(path: str) -> set[tuple[int, int]]:
    """(device, inode) of `path` (when it exists) and of each of its existing ancestors."""
    ids = set()
    p = path
    while True:
        try:
            st = os.stat(p)
            ids.add((st.st_dev, st.st_ino))
        except OSError:
            pass
        up = os.path.dirname(p)
        if up == p:
            return ids
        p = up


def is_fusionlang_output(directory: str) -> bool:
    """Was `directory` written by fusionlang? Its README.md starts with a model card
    front matter whose `tags` list `fusionlang` (every output gets one)."""
    try:
        with open(os.path.join(directory, "README.md"), encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return False
    if not head.startswith("---"):
        return False
    front = head[3:].split("\n---", 1)[0]
    return any(line.startswith("tags:") and re.search(rf"\b{MARKER_TAG}\b", line) for line in front.splitlines())


def check_paths(outputs: list[tuple[str, str]], inputs: list[tuple[str, str, list[str]]],
                spec_files: list[str]) -> list[Problem]:
    """The save-path rules broken by `outputs` ([(absolute path, where its save is)]),
    given the `inputs` ([(model name, directory, weight files)]) and the spec files.
    At most one problem per output; the first of two saves that collide is not reported.
    Follows the rules of the module docstring; reads only directory listings."""
    problems: list[Problem] = []
    reals: list[str | None] = []
    real_inputs = [(k, os.path.realpath(d), [os.path.realpath(f) for f in files]) for k, d, files in inputs]
    real_specs = [os.path.realpath(f) for f in spec_files]
    for i, (path, _where) in enumerate(outputs):
        p = path.rstrip(os.sep) or os.sep
        if os.path.islink(p) and not os.path.exists(p):
            reals.append(None)
            problems.append(Problem(i, f"output '{shown(p)}' is a symbolic link to '{os.readlink(p)}', which does not exist",
                                    "remove the link, or create the directory it points to"))
            continue
        real = os.path.realpath(p)
        reals.append(real)
        msg = _input_conflict(p, real, real_inputs) or _spec_conflict(p, real, real_specs)
        if msg:
            problems.append(Problem(i, msg, INPUT_HINT))
            continue
        other = next(((j, r) for j, r in enumerate(reals[:i]) if r is not None and (_inside(real, r) or _inside(r, real))),
                     None)
        if other is not None:
            j, r = other
            what = "the same directory as" if r == real else "inside the output of" if _inside(real, r) else \
                "a directory that holds the output of"
            problems.append(Problem(i, f"output '{shown(p)}' is {what} the save at {outputs[j][1]} ('{shown(outputs[j][0])}')",
                                    "give every save its own directory, none inside another"))
            continue
        if not os.path.isdir(real):
            continue
        try:
            entries = sorted(os.listdir(real))
        except OSError as e:
            problems.append(Problem(i, f"output '{shown(p)}' exists but cannot be listed ({e.strerror or e}): "
                                       "fusionlang cannot tell whether it holds your files", "choose another directory"))
            continue
        if entries and not is_fusionlang_output(real):
            listed = ", ".join(entries[:3]) + (f" (+{len(entries) - 3} more)" if len(entries) > 3 else "")
            problems.append(Problem(
                i, f"output '{shown(p)}' is an existing directory that fusionlang did not write (it holds {listed})",
                "choose a new or empty directory: fusionlang replaces only a directory it wrote itself "
                "(its README.md has the `fusionlang` tag)"))
    return problems


def _input_conflict(p: str, real: str, inputs: list[tuple[str, str, list[str]]]) -> str | None:
    for key, d, files in inputs:
        if real == d:
            return f"output '{shown(p)}' is the directory of the input model '{key}'"
        if _inside(d, real):
            return f"output '{shown(p)}' contains the input model '{key}' ({shown(d)})"
        if _inside(real, d):
            return f"output '{shown(p)}' is inside the directory of the input model '{key}' ({shown(d)})"
        for f in files:
            if _inside(f, real):
                return f"output '{shown(p)}' contains '{shown(f)}', a file of the input model '{key}'"
    return None


def _spec_conflict(p: str, real: str, specs: list[str]) -> str | None:
    for f in specs:
        if _inside(f, real):
            return f"output '{shown(p)}' contains the spec '{shown(f)}'"
    return None


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.fusionlang-(?P<kind>tmp|old|lock)-(?P<token>\d+(?:-[0-9a-f]+)?)$")


class RunLock:
    """A run's claim on the temporary folders next to one output: the file
    `.NAME.fusionlang-lock-TOKEN`, held with an exclusive `flock` from before the first
    temporary folder is made until the commit is done (`release`). Raises OSError."""

    def __init__(self, target: str):
        self.parent, self.name = os.path.split(target.rstrip(os.sep))
        self.fd: int | None = None
        # NOTE: the token is the bare PID when its three names are free (what tools watching
        # for `.NAME.fusionlang-tmp-PID` expect), else the PID and a random part (another
        # run with the same PID, e.g. in a second container on a shared volume, holds them)
        for token in (str(os.getpid()), *(f"{os.getpid()}-{secrets.token_hex(4)}" for _ in range(8))):
            self.token = token
            self.path = os.path.join(self.parent, f".{self.name}.fusionlang-lock-{token}")
            if os.path.lexists(self.sibling("tmp")) or os.path.lexists(self.sibling("old")):
                continue
            try:
                self.fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                continue
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        raise FileExistsError(f"no free name for a temporary output next to '{target}'")

    def sibling(self, kind: str) -> str:
        """The run's `tmp` or `old` folder next to the output."""
        return os.path.join(self.parent, f".{self.name}.fusionlang-{kind}-{self.token}")

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def _token_alive(parent: str, name: str, token: str) -> bool:
    """Does a live run hold `token`? Decided by its lock file (held: alive); without one,
    a random token is dead, and a bare PID (folders of versions before lock files) is
    decided by the process."""
    path = os.path.join(parent, f".{name}.fusionlang-lock-{token}")
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return "-" not in token and pid_alive(int(token))
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def pid_alive(pid: int) -> bool:
    """Is process `pid` running (another user's process counts as running)? Our own pid
    counts as not running: a leftover with it is from an earlier run in this process."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def clean_leftovers(target: str) -> list[str]:
    """Remove the `.NAME.fusionlang-tmp-TOKEN` / `-old-TOKEN` / `-lock-TOKEN` entries next
    to `target` whose run no longer exists; an `-old-` folder whose `target` is missing is
    moved back into place instead (a run killed between its two renames). Entries of live
    runs are left alone. Returns what was done, one line each. Raises OSError when a
    restore fails."""
    parent, name = os.path.split(target.rstrip(os.sep))
    parent = parent or "."
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    done = []
    olds, locks = [], []
    alive: dict[str, bool] = {}
    for e in sorted(entries):
        m = _LEFTOVER.match(e)
        if not m or m["name"] != name:
            continue
        token = m["token"]
        if token not in alive:
            alive[token] = _token_alive(parent, name, token)
        if alive[token]:
            continue
        path = os.path.join(parent, e)
        if m["kind"] == "old":
            olds.append(path)
        elif m["kind"] == "lock":
            locks.append(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed '{shown(path)}', left by a run that no longer exists")
    for path in olds:
        if not os.path.lexists(target):
            os.rename(path, target)
            done.append(f"restored '{shown(target)}' from '{shown(path)}', left by a run killed while committing")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed '{shown(path)}', left by a run that no longer exists")
    for path in locks:
        try:
            os.unlink(path)
        except OSError:
            pass
    return done
