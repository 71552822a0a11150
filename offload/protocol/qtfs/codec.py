"""qtfs payload encoding: checked paths, errno names, file attributes and the declared message layouts.

Payloads are binary, not JSON: numbers are fixed-width big-endian, strings a
u32 length and the bytes; a write's data (and a read reply's data) is the
rest of the payload, so it is never copied into a length-prefixed field.
Paths are bytes (``os.fsencode``) relative to the mounted directory: ``b""``
is the mount root, components are separated by single slashes, and ``.``,
``..`` and empty components are refused by both sides.  An error travels as
the errno's name (``b"ENOENT"``), since numbers differ between architectures.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from dataclasses import Field, dataclass, fields
from typing import Any, ClassVar, NamedTuple, Self, TypeVar, dataclass_transform

from offload.errors import RemoteProtocolError

#: The largest read or write one request carries (FUSE's max_write is 1 MiB).
MAX_IO = 1 << 20
#: Room for the fields around the data of a write or a directory page.
MAX_PAYLOAD = MAX_IO + 64 * 1024
MAX_PATH = 4096
MAX_NAME = 255
MAX_XATTR = 64 * 1024
MAX_ID = 0xFFFFFFFF


def check_relative(path: bytes, what: str = "path") -> None:
    """A path below the mount root: no leading slash, no empty, ``.`` or ``..`` component."""
    if not isinstance(path, bytes):
        raise ValueError(f"{what}: {path!r} is not bytes")
    if not path:
        return
    if len(path) > MAX_PATH or b"\0" in path:
        raise ValueError(f"{what}: path is too long or contains NUL")
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            raise ValueError(f"{what}: {path!r} has an empty, '.' or '..' component")


def check_absolute(path: bytes, what: str = "path") -> None:
    if not isinstance(path, bytes) or not path.startswith(b"/"):
        raise ValueError(f"{what}: {path!r} is not absolute")
    if path != b"/":
        check_relative(path.rstrip(b"/")[1:], what)


def check_name(name: bytes, what: str = "name") -> None:
    if not name or len(name) > MAX_NAME or b"\0" in name or b"/" in name or name in (b".", b".."):
        raise ValueError(f"{what}: {name!r} is not a file name")


# -- attributes -----------------------------------------------------------------------


class Attr(NamedTuple):
    """What lstat said about a host file (host inode and device numbers).

    The one list of the stat fields carried: the wire layout (`ATTR_LAYOUT`,
    in this order), `pack_stat` and the FUSE entry are all derived from it;
    each field is ``st_<name>`` of an os.stat_result.
    """

    ino: int
    dev: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    def encode(self) -> bytes:
        return ATTR_LAYOUT.pack(*self)

    @classmethod
    def decode_from(cls, data: bytes | memoryview, offset: int = 0) -> Attr:
        return cls._make(ATTR_LAYOUT.unpack_from(data, offset))


ATTR_LAYOUT = struct.Struct("!QQIIIIQqqIqqq")
_stat_fields = operator.attrgetter(*(f"st_{name}" for name in Attr._fields))


def pack_stat(st: Any) -> bytes:
    """An os.stat_result straight to wire bytes (the server's hot path: no Attr object)."""
    return ATTR_LAYOUT.pack(*_stat_fields(st))


# -- message layouts ------------------------------------------------------------------------
#
# Each message lists its wire layout as one letter per field, in field
# order: Q u64, q i64, I u32, B u8, s bytes (u32 length), p relative path,
# a absolute path, n file name, d the rest of the payload.  Numbers come
# first on the wire (one struct), then the strings in order.

_LIMITS = {"Q": (0, (1 << 64) - 1), "q": (-(1 << 63), (1 << 63) - 1), "I": (0, MAX_ID), "B": (0, 255)}
_PATH_CHECKS = {"p": check_relative, "a": check_absolute, "n": check_name}
_U32 = struct.Struct("!I")


class Message:
    LAYOUT: ClassVar[str] = ""
    # Set by @dataclass; declared so that a Message is a dataclass to the type checker.
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]
    _numbers: ClassVar[struct.Struct]
    _number_fields: ClassVar[tuple[str, ...]]
    _string_fields: ClassVar[tuple[tuple[str, str], ...]]

    @classmethod
    def _prepare(cls) -> None:
        names = [f.name for f in fields(cls)]
        if len(names) != len(cls.LAYOUT):
            raise TypeError(f"{cls.__name__}: layout {cls.LAYOUT!r} does not match {names}")
        kinds = list(zip(names, cls.LAYOUT, strict=True))
        if "d" in cls.LAYOUT[:-1]:
            raise TypeError(f"{cls.__name__}: trailing data must be the last field")
        cls._number_fields = tuple(n for n, k in kinds if k in _LIMITS)
        cls._numbers = struct.Struct("!" + "".join(k for _, k in kinds if k in _LIMITS))
        cls._string_fields = tuple((n, k) for n, k in kinds if k not in _LIMITS)

    def __post_init__(self) -> None:
        for name, kind in zip((f.name for f in fields(self)), self.LAYOUT, strict=True):
            value = getattr(self, name)
            what = f"{type(self).__name__}.{name}"
            if kind in _LIMITS:
                low, high = _LIMITS[kind]
                if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                    raise ValueError(f"{what} = {value!r} out of range")
            elif not isinstance(value, bytes):
                raise ValueError(f"{what} must be bytes")
            elif kind in _PATH_CHECKS:
                _PATH_CHECKS[kind](value, what)

    def encode(self) -> bytes:
        parts = [self._numbers.pack(*(getattr(self, n) for n in self._number_fields))]
        for name, kind in self._string_fields:
            value = getattr(self, name)
            if kind != "d":
                parts.append(_U32.pack(len(value)))
            parts.append(value)
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: bytes | memoryview, what: str = "") -> Self:
        view = memoryview(payload)
        try:
            values = dict(zip(cls._number_fields, cls._numbers.unpack_from(view), strict=True))
            at = cls._numbers.size
            for name, kind in cls._string_fields:
                if kind == "d":
                    # A read's data arrives as the whole payload: keep that object, no copy.
                    values[name] = payload if at == 0 and isinstance(payload, bytes) else bytes(view[at:])
                    at = len(view)
                    continue
                (length,) = _U32.unpack_from(view, at)
                at += 4
                if at + length > len(view):
                    raise struct.error("string runs past the end")
                values[name] = bytes(view[at : at + length])
                at += length
            if at != len(view):
                raise struct.error(f"{len(view) - at} trailing bytes")
            return cls(**values)
        except (struct.error, ValueError) as exc:
            raise RemoteProtocolError(f"{what or cls.__name__}: malformed payload: {exc}") from None


_M = TypeVar("_M", bound=Message)


@dataclass_transform(frozen_default=True)
def message(layout: str) -> Callable[[type[_M]], type[_M]]:
    """Class decorator: a frozen dataclass with a wire layout."""

    def wrap(cls: type[_M]) -> type[_M]:
        cls.LAYOUT = layout
        made = dataclass(frozen=True, slots=True)(cls)
        made._prepare()
        return made

    return wrap


# -- directory pages ----------------------------------------------------------------------

_ENTRY_NAME = struct.Struct("!H")


def encode_entry(name: bytes, attr: bytes) -> bytes:
    return attr + _ENTRY_NAME.pack(len(name)) + name


def decode_entries(data: bytes | memoryview) -> list[tuple[bytes, Attr]]:
    """The (name, attributes) pairs of a directory page."""
    view = memoryview(data)
    entries = []
    at = 0
    try:
        while at < len(view):
            attr = Attr.decode_from(view, at)
            at += ATTR_LAYOUT.size
            (length,) = _ENTRY_NAME.unpack_from(view, at)
            at += 2
            name = bytes(view[at : at + length])
            at += length
            check_name(name, "directory entry")
            if len(name) != length:
                raise struct.error("name runs past the end")
            entries.append((name, attr))
    except (struct.error, ValueError) as exc:
        raise RemoteProtocolError(f"directory page: {exc}") from None
    return entries
