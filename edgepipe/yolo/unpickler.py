"""Read checkpoints written by the reference YOLOv5 trainer without running anything they name.

A reference checkpoint is a ``torch.save`` zip archive whose ``data.pkl`` pickles whole module
objects (``models.yolo.Model``, ``models.common.Conv``, ``torch.nn.modules.conv.Conv2d``, ...)
next to plain training data (numpy arrays and scalars, option dicts, sets, strings). Python's
pickle would import those modules and call whatever the stream names; this unpickler instead
resolves every global through an allowlist:

- tensors and storages are rebuilt by our own functions from the archive's raw storage records;
- numpy arrays, scalars and dtypes, ``OrderedDict``, ``set``, ``frozenset`` and latin-1 bytes are
  rebuilt by small wrappers that check their arguments;
- classes under ``models.*`` and ``torch.nn.modules.*`` become inert :class:`ModulePlaceholder`
  subclasses made on the spot: instantiable only the way pickle builds objects (``NEWOBJ``, then
  ``BUILD`` storing the attribute dict), never callable through ``REDUCE``;
- anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) raises
  :class:`UnsafePickleError` from ``find_class``, i.e. before the stream can call it.

No module is imported and ``sys.modules`` is never touched, so a user's own ``models`` package
keeps working in the same process.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import zipfile
import zlib
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch


class UnsafePickleError(ValueError):
    """The pickle names something outside the allowlist; nothing it named was run."""


class PickleFormatError(ValueError):
    """The file is not a torch zip archive this module can read, or its contents are corrupt."""


class ModulePlaceholder:
    """An inert stand-in for a module object from a checkpoint.

    ``class_path`` is the dotted name the pickle gave (``models.common.Conv``); ``state`` is the
    object's attribute dict as pickled (for nn.Modules: ``_parameters``, ``_buffers``,
    ``_modules``, plus plain attributes such as ``yaml``, ``names``, ``stride``).
    """

    class_path = "?"
    state: Dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> ModulePlaceholder:
        # NEWOBJ: object creation only; the class's __init__ never runs.
        obj = object.__new__(cls)
        obj.__dict__["state"] = {}
        return obj

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged: Dict[str, Any] = {}
            for part in state:
                if part is not None and not isinstance(part, dict):
                    raise UnsafePickleError(f"a {type(part).__name__} as the state of {self.class_path} is not allowed")
                merged.update(part or {})
            state = merged
        if not isinstance(state, dict):
            raise UnsafePickleError(f"a {type(state).__name__} as the state of {self.class_path} is not allowed")
        self.__dict__["state"] = state

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafePickleError(f"pickle setting attribute {name!r} on {self.class_path} is not allowed")

    def __repr__(self) -> str:
        return f"<placeholder {self.class_path}>"


class _PlaceholderMeta(type):
    """Placeholder classes refuse to be called (REDUCE) or modified (BUILD on the class)."""

    class_path: str

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(f"pickle calls {cls.class_path}(...), which is not allowed")

    def __setattr__(cls, name: str, value: Any) -> None:
        raise UnsafePickleError(f"pickle modifying the class {cls.class_path} is not allowed")

    @property
    def __setstate__(cls) -> Callable[[Any], None]:
        # A data descriptor on the metaclass wins over the class's own __setstate__ when BUILD
        # targets the class itself; instances still find the class's method.
        def refuse(state: Any) -> None:
            raise UnsafePickleError(f"pickle modifying the class {cls.class_path} is not allowed")

        return refuse


# Module prefixes whose classes become placeholders: the reference code and torch's layers.
PLACEHOLDER_PREFIXES = ("models.", "torch.nn.modules.")

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_TORCH_DTYPES = {
    "float16": torch.float16, "half": torch.float16, "float32": torch.float32,
    "float": torch.float32, "float64": torch.float64, "double": torch.float64,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "long": torch.int64, "int32": torch.int32,
    "int": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
# Refuse absurd sizes from a hostile stream before allocating (2**33 elements = 8 G fp8).
_MAX_ELEMENTS = 2 ** 33
# A few bytes of a hostile archive must not make us allocate gigabytes. torch.save stores records
# uncompressed; a record may expand at most this much (a zip bomb expands a thousandfold).
_MAX_EXPANSION = 10
# A tensor with zero strides (an expanded view, e.g. a cached anchor grid) has more elements than
# its storage; cloning it allocates them all, so such a tensor may have at most this many.
_MAX_EXPANDED_ELEMENTS = 2 ** 24


class _Frozen:
    """Shared allowlist entries: no __dict__, no attribute writes, so a pickle's BUILD opcode
    cannot alter them (the change would outlive the load and affect the next file)."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafePickleError(f"pickle modifying {self!r} is not allowed")


class _StorageType(_Frozen):
    """What ``torch.HalfStorage`` etc. resolve to: only a dtype for persistent_load."""

    __slots__ = ("name", "dtype")
    name: str
    dtype: torch.dtype

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)

    def __call__(self, *args: Any) -> Any:
        raise UnsafePickleError(f"pickle calls torch.{self.name}(...), which is not allowed")

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Allowed(_Frozen):
    """An allowlisted callable, reachable from a pickle only through this immutable wrapper."""

    __slots__ = ("fn", "name")
    fn: Callable[..., Any]
    name: str

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __repr__(self) -> str:
        return self.name


def _refuse(what: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"pickle references {what}, which is not allowed (a checkpoint may hold only tensors, "
        "numpy data, plain containers and YOLOv5/torch.nn module classes)"
    )


def _check_tensor_geometry(storage: torch.Tensor, offset: int, size: Any, stride: Any) -> Tuple[int, ...]:
    if not isinstance(storage, torch.Tensor):
        raise UnsafePickleError(f"a tensor rebuilt from a {type(storage).__name__} (not a storage) is not allowed")
    if not (isinstance(offset, int) and isinstance(size, (tuple, list, torch.Size))
            and isinstance(stride, (tuple, list)) and len(size) == len(stride)
            and all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))):
        raise PickleFormatError(f"bad tensor geometry: offset {offset!r}, size {size!r}, stride {stride!r}")
    size = tuple(size)
    numel = math.prod(size)
    if numel > max(storage.numel(), _MAX_EXPANDED_ELEMENTS):
        raise PickleFormatError(
            f"tensor of size {list(size)[:8]} ({numel} elements) expands a storage of {storage.numel()}"
        )
    if all(s > 0 for s in size):
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= storage.numel():
            raise PickleFormatError(
                f"tensor of size {list(size)} reaches element {last} of a storage of {storage.numel()}"
            )
    return size


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    """torch._utils._rebuild_tensor(_v2): a view into an archive storage (copied, so it owns its data)."""
    size = _check_tensor_geometry(storage, storage_offset, size, stride)
    return torch.as_strided(storage, size, tuple(stride), storage_offset).clone()


def _rebuild_parameter(data: Any, *_ignored: Any) -> torch.Tensor:
    """Parameters come back as plain tensors (requires_grad and hooks are training state)."""
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f"a parameter rebuilt from a {type(data).__name__} is not allowed")
    return data


def _ordered_dict(items: Any = ()) -> collections.OrderedDict:
    if not isinstance(items, (list, tuple, dict)):
        raise UnsafePickleError(f"an OrderedDict built from a {type(items).__name__} is not allowed")
    return collections.OrderedDict(items)


def _make_set(kind: type) -> Callable[..., Any]:
    def build(items: Any = ()) -> Any:
        if not isinstance(items, (list, tuple)):
            raise UnsafePickleError(f"a {kind.__name__} built from a {type(items).__name__} is not allowed")
        return kind(items)

    return build


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """Protocol-2 pickles spell bytes as ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode other than encode(str, 'latin1') is not allowed")
    return text.encode("latin1")


def _bytes(data: Any = b"") -> bytes:
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f"bytes built from a {type(data).__name__} is not allowed")
    return bytes(data)


def _np_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if isinstance(spec, bytes):
        spec = spec.decode("latin1")
    if not isinstance(spec, str):
        raise UnsafePickleError(f"a numpy.dtype built from a {type(spec).__name__} is not allowed")
    return np.dtype(spec, align=bool(align), copy=bool(copy))


class _NdarrayType(_Frozen):
    """What ``numpy.ndarray`` resolves to: only an argument for numpy's ``_reconstruct``."""

    __slots__ = ()

    def __call__(self, *args: Any) -> Any:
        raise UnsafePickleError("pickle calls numpy.ndarray(...), which is not allowed")

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayType()


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct``: an empty array that BUILD then fills (ndarray.__setstate__)."""
    if subtype is not _NDARRAY:
        raise UnsafePickleError("numpy _reconstruct of something other than numpy.ndarray is not allowed")
    if not isinstance(shape, (tuple, list)) or int(np.prod(shape)) > 1:
        raise UnsafePickleError(f"numpy _reconstruct with shape {shape!r} is not allowed")
    return np.ndarray.__new__(np.ndarray, tuple(shape), _np_dtype(dtype))


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's ``scalar(dtype, raw bytes)``."""
    if not isinstance(dtype, np.dtype):
        raise UnsafePickleError("a numpy scalar without a numpy dtype is not allowed")
    if dtype.hasobject:
        return data
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise PickleFormatError(f"numpy scalar of {dtype} with {len(data) if data else 0} bytes")
    return np.frombuffer(bytes(data), dtype=dtype)[0]


def _torch_size(dims: Any = ()) -> torch.Size:
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
        raise UnsafePickleError("torch.Size built from something other than ints is not allowed")
    return torch.Size(dims)


def _torch_device(spec: Any, index: Any = None) -> str:
    if not isinstance(spec, str):
        raise UnsafePickleError("torch.device built from something other than a string is not allowed")
    return spec if index is None else f"{spec}:{int(index)}"  # devices are irrelevant on load


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Protocol 0/1 object creation: allowed only for placeholders (object.__new__, no init)."""
    if not (isinstance(cls, _PlaceholderMeta) and base is object and state is None):
        raise UnsafePickleError("copyreg._reconstructor of something other than a module class is not allowed")
    return ModulePlaceholder.__new__(cls)  # type: ignore[arg-type]


_CALLABLES: Dict[Tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _make_set(set),
    ("builtins", "frozenset"): _make_set(frozenset),
    ("builtins", "bytes"): _bytes,
    ("builtins", "bytearray"): _bytes,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _copyreg_reconstructor,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("numpy", "dtype"): _np_dtype,
}
for _core in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _CALLABLES[(_core, "_reconstruct")] = _np_reconstruct
    _CALLABLES[(_core, "scalar")] = _np_scalar
_ALLOWED: Dict[Tuple[str, str], Any] = {
    key: _Allowed(".".join(key), fn) for key, fn in _CALLABLES.items()
}
_ALLOWED[("numpy", "ndarray")] = _NDARRAY
for _name, _dtype in _STORAGE_DTYPES.items():
    for _module in ("torch", "torch.cuda"):  # torch < 1.13 named CUDA storages torch.cuda.*
        _ALLOWED[(_module, _name)] = _StorageType(_name, _dtype)
for _name, _dtype in _TORCH_DTYPES.items():
    _ALLOWED[("torch", _name)] = _dtype
# Python 2 names that protocol-2 pickles use for builtins.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a torch zip archive under the allowlist (see module docstring).

    ``read_storage(key, dtype, numel)`` returns the 1-D tensor of archive record ``data/<key>``.
    """

    def __init__(self, file: io.BufferedIOBase, read_storage: Callable[[str, torch.dtype, int], torch.Tensor]) -> None:
        super().__init__(file)
        self._read_storage = read_storage
        self._storages: Dict[str, torch.Tensor] = {}
        self._placeholders: Dict[Tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        if module.startswith(PLACEHOLDER_PREFIXES) and name.isidentifier():
            key = (module, name)
            if key not in self._placeholders:
                # A fresh class per archive; its dotted name is recorded, nothing is imported.
                self._placeholders[key] = _PlaceholderMeta(
                    name, (ModulePlaceholder,),
                    {"__module__": module, "__qualname__": name, "class_path": f"{module}.{name}"},
                )
            return self._placeholders[key]
        raise _refuse(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise PickleFormatError(f"unknown persistent record {str(pid)[:60]!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError("a storage record without a known storage type is not allowed")
        if not isinstance(key, str) or not isinstance(numel, int) or not 0 <= numel <= _MAX_ELEMENTS:
            raise PickleFormatError(f"bad storage record {key!r} of {numel!r} elements")
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, numel)
        return self._storages[key]


def _check_memo(data: bytes) -> None:
    """C pickle grows its memo table to twice the largest index a PUT names, so a ten-byte pickle
    could claim gigabytes; torch.save numbers memo entries 0, 1, 2, ... in order."""
    stored = 0
    for op, arg, _pos in pickletools.genops(data):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if not isinstance(arg, int) or arg > stored:
                raise PickleFormatError(f"pickle memo index {arg!r} is out of sequence (next is {stored})")
            stored += 1
        elif op.name == "MEMOIZE":
            stored += 1


def _archive_prefix(names: Any) -> str:
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise PickleFormatError("a zip archive without the one data.pkl record torch.save writes")
    return pkl[0][: -len("data.pkl")]


def is_torchscript(zf: zipfile.ZipFile) -> bool:
    return any(n.count("/") >= 1 and n.split("/", 1)[1].startswith(("code/", "constants.pkl"))
               for n in zf.namelist())


def load_torch_archive(path: str) -> Any:
    """The object a ``torch.save`` zip archive holds, rebuilt under the allowlist.

    Raises UnsafePickleError for anything outside it (before it can run) and PickleFormatError
    for a file that is not such an archive or is damaged. Tensors come back on the CPU.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PickleFormatError(f"not a readable zip archive ({exc})") from None
    with zf:
        names = zf.namelist()
        for info in zf.infolist():
            if info.file_size > _MAX_EXPANSION * info.compress_size + 4096:
                raise PickleFormatError(
                    f"record {info.filename!r} would expand from {info.compress_size} to "
                    f"{info.file_size} bytes (torch.save does not compress)"
                )
        if is_torchscript(zf):
            raise PickleFormatError("a TorchScript archive (torch.jit.save), not a checkpoint")
        prefix = _archive_prefix(names)
        if prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() not in (b"little", b""):
            raise PickleFormatError("a big-endian archive; re-save it on a little-endian machine")

        def read_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            record = f"{prefix}data/{key}"
            try:
                raw = zf.read(record)
            except KeyError:
                raise PickleFormatError(f"storage record {record!r} is missing") from None
            itemsize = torch.empty(0, dtype=dtype).element_size()
            if len(raw) < numel * itemsize:
                raise PickleFormatError(f"storage record {record!r} is truncated")
            if numel == 0:
                return torch.empty(0, dtype=dtype)
            return torch.frombuffer(bytearray(raw[: numel * itemsize]), dtype=dtype)

        try:
            data = zf.read(prefix + "data.pkl")
            _check_memo(data)
            return RestrictedUnpickler(io.BytesIO(data), read_storage).load()  # type: ignore[arg-type]
        except (UnsafePickleError, PickleFormatError):
            raise
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zlib.error, ValueError,
                TypeError, KeyError, IndexError, AttributeError, RuntimeError, OverflowError) as exc:
            raise PickleFormatError(f"damaged checkpoint data ({type(exc).__name__}: {exc})") from None


def placeholder_class(obj: Any) -> Optional[str]:
    """The dotted class name of a placeholder, or None for anything else."""
    return obj.class_path if isinstance(obj, ModulePlaceholder) else None
