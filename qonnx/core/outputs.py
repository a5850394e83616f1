"""Where outputs go, and how they replace what was there: no file lost, no pair half-written.

- :func:`output_paths`: the .onnx file to write and, for a folder input, the files to mirror beside it
  (:func:`plan_mirror`, checked before any work: a link leading out of the folder, a link to a folder, a
  FIFO or a device is refused). An output folder that is, or lies inside, the input folder is refused.
- :func:`staging` and :func:`commit`: a model and its data file are written in a temporary folder beside the
  output, flushed to disk (fsync), and renamed into place, the data file first. The data file's name is one
  that the output's previous .onnx does not use for other bytes (``q.onnx.data``, else ``q.onnx.1.data``,
  ...), so a crash between the two renames leaves the previous pair as it was. Afterwards the previous .onnx's
  own data file is removed, and nothing else: a ``q.onnx.data`` that the previous ``q.onnx`` does not name
  (another model's, say) is never touched.
- Temporary names carry the writer's process id (``.q.onnx.tmp-<pid>-<random>``): a later write into the
  same folder removes those whose process is gone (after a SIGKILL; SIGTERM and Ctrl-C clean up at once),
  and the data file such a process had moved into place when it died before its .onnx.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path, PurePosixPath

import onnx

from qonnx.core.errors import ModelLoadError, OutputPathError
from qonnx.core.external_data import graph_tensors
from qonnx.core.paths import MODEL_FILENAME

__all__ = [
    "Mirror",
    "commit",
    "make_folder",
    "mirror_folder",
    "output_paths",
    "plan_mirror",
    "remove_folders",
    "remove_stale_temps",
    "staging",
    "temp_prefix",
]

#: A temporary file or folder of a qonnx write: ``.NAME.tmp-PID-RANDOM``.
_TEMP = re.compile(r"\..+\.tmp-(\d+)-[A-Za-z0-9_]+")
_CHUNK = 1 << 20
#: In a staging folder: the output and the data file name :func:`commit` is moving into place.
_COMMITTING = "committing.json"


def temp_prefix(name: str) -> str:
    """The prefix of a temporary file or folder standing for ``name`` (``tempfile``'s ``prefix``)."""
    return f".{name}.tmp-{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # os.kill(pid, 0) is no probe on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or no pid at all: not ours to judge
        return True
    return True


def remove_stale_temps(folder: Path) -> None:
    """Remove the temporary files and folders that killed qonnx processes left in ``folder``.

    A process killed between :func:`commit`'s two renames also left a data file that no .onnx reads: its
    staging folder names it (``_COMMITTING``), and it goes too, unless the output there reads it.
    """
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            found = _TEMP.fullmatch(entry.name)
            if found is None or _alive(int(found.group(1))):
                continue
            if entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    pending = json.loads((Path(entry.path) / _COMMITTING).read_text())
                    out, data = folder / Path(pending["out"]).name, Path(pending["data"]).name
                    if data not in _previous_data(out):
                        (folder / data).unlink(missing_ok=True)
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, outermost first.

    Raises:
        OutputPathError: it cannot be created.
    """
    missing = []
    p = folder
    while not os.path.lexists(p) and p.parent != p:
        missing.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"{folder}: cannot create output folder: {e.strerror}") from None
    return missing[::-1]


def remove_folders(created: Iterable[Path]) -> None:
    """Remove the folders :func:`make_folder` created (innermost first), where they are still empty."""
    for p in reversed(list(created)):
        with contextlib.suppress(OSError):
            p.rmdir()


@contextlib.contextmanager
def staging(parent: Path, name: str) -> Iterator[Path]:
    """A temporary folder in ``parent`` to write the output ``name`` into; removed on the way out."""
    try:
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=temp_prefix(name)))
    except OSError as e:
        raise OutputPathError(f"{parent}: cannot write there: {e.strerror}") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path, *, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not folder:  # some file systems cannot sync a folder; a file must be synced
            raise
    finally:
        os.close(fd)


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                x, y = fa.read(_CHUNK), fb.read(_CHUNK)
                if x != y:
                    return False
                if not x:
                    return True
    except OSError:
        return False


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    return False


def _locations(proto: onnx.ModelProto) -> Iterator[onnx.StringStringEntryProto]:
    for tensor in graph_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield from (e for e in tensor.external_data if e.key == "location")


def _data_name(name: str, k: int) -> str:
    return f"{name}.data" if k == 0 else f"{name}.{k}.data"


def _previous_data(out: Path) -> set[str]:
    """The data files, named as :func:`commit` names them, that the .onnx now at ``out`` reads."""
    pattern = re.compile(re.escape(out.name) + r"(\.[0-9]+)?\.data")
    if out.is_symlink() or not out.is_file():  # a link is replaced, not what it points at (nor that one's data)
        return set()
    try:
        present = {p.name for p in out.parent.iterdir() if pattern.fullmatch(p.name)}
        if not present:
            return set()
        proto = onnx.load(os.fspath(out), load_external_data=False)
    except Exception:  # not a model (any more): it names no data file of ours
        return set()
    return {os.path.normpath(e.value) for e in _locations(proto)} & present


def _choose_data_name(out: Path, tmp_data: Path, previous: set[str], protect: Collection[Path]) -> str:
    """A data file name beside ``out`` for ``tmp_data``'s bytes that replaces no other bytes anything reads.

    The previous output's own data file when it holds these very bytes (a rerun: same name, same .onnx);
    else the first of ``q.onnx.data``, ``q.onnx.1.data``, ... that does not exist.
    """
    for name in sorted(previous, key=lambda n: (len(n), n)):
        path = out.parent / name
        if not any(_same_file(path, p) for p in protect) and _same_bytes(path, tmp_data):
            return name
    k = 0
    while os.path.lexists(out.parent / _data_name(out.name, k)):
        k += 1
    return _data_name(out.name, k)


def _relocate(model_path: Path, old: str, new: str) -> None:
    """Make the .onnx at ``model_path`` read its external data from ``new`` instead of ``old``."""
    proto = onnx.load(os.fspath(model_path), load_external_data=False)
    for entry in _locations(proto):
        if entry.value == old:
            entry.value = new
    onnx.save(proto, os.fspath(model_path))


def commit(tmp_model: Path, tmp_data: Path | None, out: Path, protect: Collection[Path] = ()) -> list[Path]:
    """Move a model written in :func:`staging` (and its data file, named ``out.name + '.data'``) into place.

    Both files are synced to disk first, the data file is renamed first (under a name no previous .onnx
    reads other bytes from), then the .onnx; then the previous output's data file goes, and a line on stderr
    says what was replaced. Returns the files written.
    """
    parent = out.parent
    protect = [Path(p) for p in protect]
    previous = _previous_data(out)
    data_name = None
    if tmp_data is not None:
        data_name = _choose_data_name(out, tmp_data, previous, protect)
        if data_name != tmp_data.name:
            _relocate(tmp_model, tmp_data.name, data_name)
        _fsync(tmp_data)
    _fsync(tmp_model)
    replacing = os.path.lexists(out)
    written = [out]
    if tmp_data is not None and data_name is not None:
        data_path = parent / data_name
        if data_name not in previous:  # a fresh file: if this process dies before the .onnx is in place, it goes
            (tmp_data.parent / _COMMITTING).write_text(json.dumps({"out": out.name, "data": data_name}))
        os.replace(tmp_data, data_path)
        _fsync(parent, folder=True)
        written.append(data_path)
    try:
        os.replace(tmp_model, out)
    except BaseException:
        if data_name is not None and data_name not in previous:
            (parent / data_name).unlink(missing_ok=True)
        raise
    _fsync(parent, folder=True)
    removed = [
        parent / name
        for name in sorted(previous)
        if name != data_name and not any(_same_file(parent / name, p) for p in protect)
    ]
    for p in removed:
        p.unlink(missing_ok=True)
    if replacing:
        also = f" and removed its data file {', '.join(p.name for p in removed)}" if removed else ""
        print(f"qonnx: replaced the previous {out}{also}", file=sys.stderr)
    return written


@dataclasses.dataclass(frozen=True)
class Mirror:
    """The files of a folder input that go beside the output model: (file, path relative to the folder)."""

    folder: Path
    files: tuple[tuple[Path, PurePosixPath], ...]


def plan_mirror(src: Path, skip: Collection[Path] = ()) -> Mirror:
    """The files to copy from the folder ``src``: everything but hidden files, models and ``skip`` at its top.

    A link is copied as the file it points to when that file lies inside ``src``.

    Raises:
        ModelLoadError: a link leads out of ``src`` or nowhere, or to a folder; or an entry is neither a
            regular file nor a folder (a FIFO, a socket, a device). Nothing has been written then.
    """
    root = src.resolve()
    skipped = {Path(p).resolve() for p in skip}
    files: list[tuple[Path, PurePosixPath]] = []

    def walk(folder: Path, rel: PurePosixPath, top: bool) -> None:
        for item in sorted(folder.iterdir()):
            if top and (item.name.startswith(".") or item.suffix in (".onnx", ".data")):
                continue
            if item.resolve() in skipped:
                continue
            mode = item.lstat().st_mode
            if stat.S_ISLNK(mode):
                target = item.resolve()
                if not target.is_relative_to(root):
                    raise ModelLoadError(
                        f"{item}: a link to a file outside the model folder; qonnx copies nothing from outside a "
                        "folder it mirrors (put the file itself there, or remove the link)"
                    )
                if not target.exists():
                    raise ModelLoadError(f"{item}: a link to nothing; remove it or make it point at a file")
                if target.is_dir():
                    raise ModelLoadError(
                        f"{item}: a link to a folder; qonnx mirrors no linked folders (put the folder itself there)"
                    )
                mode = target.stat().st_mode
            if stat.S_ISDIR(mode):
                walk(item, rel / item.name, False)
            elif stat.S_ISREG(mode):
                files.append((item, rel / item.name))
            else:
                raise ModelLoadError(f"{item}: neither a file nor a folder (a FIFO, socket or device); not mirrored")

    walk(src, PurePosixPath(), True)
    return Mirror(src, tuple(files))


def mirror_folder(mirror: Mirror, dst: Path) -> list[Path]:
    """Copy ``mirror``'s files into ``dst``, each through a temporary file; returns the files written.

    A file already there with the same bytes is left alone; one with other bytes is replaced, and a line on
    stderr says so (it is a previous output's). Raises OutputPathError where a folder stands in the way.
    """
    written, replaced = [], []
    for source, rel in mirror.files:
        target = dst.joinpath(*rel.parts)
        if target.is_file() and _same_bytes(source, target):
            continue
        if target.is_dir() and not target.is_symlink():
            raise OutputPathError(f"{target}: is a folder; {source} cannot be copied there")
        if os.path.lexists(target):
            replaced.append(rel)
        make_folder(target.parent)
        fd, name = tempfile.mkstemp(dir=dst, prefix=temp_prefix(target.name))
        try:
            with os.fdopen(fd, "wb") as f, open(source, "rb") as s:
                shutil.copyfileobj(s, f, _CHUNK)
                f.flush()
                os.fsync(f.fileno())
            shutil.copystat(source, name)
            os.replace(name, target)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        written.append(target)
    if written:
        _fsync(dst, folder=True)
    if replaced:
        more = f" and {len(replaced) - 5} more" if len(replaced) > 5 else ""
        shown = ", ".join(str(r) for r in replaced[:5]) + more
        print(f"qonnx: replaced the previous output's {shown} in {dst}", file=sys.stderr)
    return written


def output_paths(
    output: str | os.PathLike, source: Path | None, source_arg: object, skip: Collection[Path] = ()
) -> tuple[Path, Mirror | None]:
    """Where a model read from ``source`` goes: (.onnx path to write, the folder input's files to mirror).

    A folder input (``source_arg``) is mirrored into an output folder (all but ``skip``, its model files);
    an output .onnx path is taken as it is.

    Raises:
        OutputPathError: the output folder is the input folder, or lies inside it (each run would mirror
            the last run's output into itself).
        ModelLoadError: the input folder holds what :func:`plan_mirror` refuses.
    """
    out = Path(output)
    if isinstance(source_arg, (str, os.PathLike)) and Path(source_arg).is_dir():
        if out.suffix == ".onnx":
            return out, None
        src = Path(source_arg)
        if out.resolve() == src.resolve():
            raise OutputPathError(f"{out}: output folder is the input folder")
        if out.resolve().is_relative_to(src.resolve()):
            raise OutputPathError(f"{out}: output folder is inside the input folder {src}; choose one outside it")
        return out / MODEL_FILENAME, plan_mirror(src, skip)
    if out.is_dir() or out.suffix != ".onnx":
        return out / (source.name if source is not None else MODEL_FILENAME), None
    return out, None
