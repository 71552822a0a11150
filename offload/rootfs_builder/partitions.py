"""Which partition of a disk image is the root filesystem (from `sfdisk --json`).

Pure: the table is sfdisk's JSON document; the answer is an offset and a
size in bytes for a loop device.  The reference mounts /dev/nbd0p2 by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from offload.errors import RootfsError

# GPT partition type GUIDs (the Discoverable Partitions Specification).
GPT_ROOT = {
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "x86_64",
    "B921B045-1DF0-41C3-AF44-4C6F280D3FAE": "aarch64",
    "44479540-F297-41B2-9AF7-D131D5F0458A": "x86",
}
GPT_LINUX_DATA = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
GPT_NOT_ROOT = {
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",  # EFI system
    "21686148-6449-6E6F-744E-656564454649",  # BIOS boot
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",  # swap
    "E6D6D379-F507-44C2-A23C-238F2A3DF928",  # LVM (no device-mapper here)
    "BC13C2FF-59E6-4262-A352-B275FD6F7172",  # extended boot loader
}
MBR_LINUX = "83"


@dataclass(frozen=True)
class Partition:
    number: int  # 1-based, as in /dev/nbd0pN
    offset: int  # bytes
    size: int  # bytes
    type: str

    def describe(self) -> str:
        return f"partition {self.number} (type {self.type}, {self.size // (1 << 20)} MiB at byte {self.offset})"


def parse(document: str) -> list[Partition]:
    try:
        table = json.loads(document)["partitiontable"]
        sector = int(table.get("sectorsize", 512))
        parts = []
        for index, part in enumerate(table.get("partitions", []), start=1):
            node = str(part.get("node", ""))
            digits = node[len(node.rstrip("0123456789")) :]
            number = int(digits) if digits else index
            parts.append(Partition(number, int(part["start"]) * sector, int(part["size"]) * sector, str(part["type"])))
        return parts
    except (ValueError, KeyError, TypeError) as exc:
        raise RootfsError(f"cannot read the partition table (sfdisk --json): {exc}") from None


def choose_root(parts: list[Partition], number: int | None = None) -> Partition:
    """``number`` if given; else a GPT root partition; else the largest Linux filesystem partition."""
    if number is not None:
        for part in parts:
            if part.number == number:
                return part
        raise RootfsError(f"no partition {number}; the image has {', '.join(p.describe() for p in parts) or 'none'}")
    roots = [p for p in parts if p.type.upper() in GPT_ROOT]
    if roots:
        return max(roots, key=lambda p: p.size)
    linux = [p for p in parts if p.type.upper() in (GPT_LINUX_DATA, MBR_LINUX)]
    candidates = linux or [p for p in parts if p.type.upper() not in GPT_NOT_ROOT and p.type not in ("5", "f", "82")]
    if not candidates:
        raise RootfsError("no Linux partition in the image; name one with --partition N")
    return max(candidates, key=lambda p: p.size)
