"""The manifest: what a build installed into a rootfs, with hashes.

It lives in the rootfs (/etc/offload/rootfs-manifest.json) so the rootfs
describes itself wherever it is moved; `check` compares the tree with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from offload.errors import ConfigError

VERSION = 1


@dataclass(frozen=True)
class Entry:
    path: str  # inside the rootfs, absolute (/usr/bin/rexec)
    sha256: str
    mode: int  # permission bits
    what: str  # one line for humans: "the rexec stand-in"


@dataclass(frozen=True)
class Manifest:
    mode: str  # overlay, copy, debootstrap, image
    arch: str
    host: str  # --host as given ("" when the agent's default peer is used)
    files: tuple[Entry, ...] = ()
    packages: tuple[str, ...] = ()  # installed by the build with apt
    source: str = ""  # the root copied, the image, or the suite
    overlay: dict[str, Any] = field(default_factory=dict)  # lower, upper, work, nested (overlay mode)
    version: int = VERSION

    @classmethod
    def from_json(cls, document: dict[str, Any], *, source: str = "manifest") -> Manifest:
        try:
            if document.get("version") != VERSION:
                raise ConfigError(f"manifest version {document.get('version')!r}, expected {VERSION}", path=source)
            files = tuple(Entry(**entry) for entry in document["files"])
            return cls(
                mode=str(document["mode"]),
                arch=str(document["arch"]),
                host=str(document["host"]),
                files=files,
                packages=tuple(document.get("packages", ())),
                source=str(document.get("source", "")),
                overlay=dict(document.get("overlay") or {}),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"malformed manifest: {exc}", path=source) from None


def read(path: Path) -> Manifest | None:
    """The manifest at ``path``; None when there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=str(path)) from None
    try:
        return Manifest.from_json(json.loads(text), source=str(path))
    except ValueError as exc:
        raise ConfigError(f"not valid JSON: {exc}", path=str(path)) from None


def render(manifest: Manifest) -> bytes:
    return (json.dumps(asdict(manifest), indent=1, sort_keys=True) + "\n").encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_state(path: Path) -> tuple[str, int] | None:
    """(sha256, permission bits) of a regular file, not following a final symlink; None if absent or not a file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return sha256(path.read_bytes()), stat.S_IMODE(info.st_mode)
