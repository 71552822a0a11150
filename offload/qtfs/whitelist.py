"""The reference's /etc/qtfs/whitelist, accepted as the server's rule set.

The file is a GLib key file: the `SECTIONS` (the reference's [Kill] and
[Udsconnect] are accepted and ignored: other parts of this project own
those jobs), each with ``Path=a;b``.  A rule matches a path equal to it or
below it on a component boundary.  With a whitelist loaded, an operation
whose section is missing or has no matching rule is refused; without one,
everything inside the exports is allowed.  README.md ("qtfs", Security)
says which operations are gated and on which path (`offload.qtfs.backend`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from offload.errors import ConfigError
from offload.prefix import is_under

SECTIONS = (
    "Open",
    "Write",
    "Read",
    "Readdir",
    "Mkdir",
    "Rmdir",
    "Create",
    "Unlink",
    "Rename",
    "Setattr",
    "Setxattr",
    "Mount",
)
IGNORED = ("Kill", "Udsconnect")
#: The reference's limits (qtfs/include/comm.h): 64 rules a section, paths under 4096 bytes.
MAX_RULES = 64
MAX_RULE = 4095


@dataclass(frozen=True)
class Whitelist:
    rules: dict[str, tuple[bytes, ...]] = field(default_factory=dict)
    enforced: bool = False  # False: no whitelist loaded, everything in the exports is allowed

    def allows(self, section: str, path: bytes) -> bool:
        if not self.enforced:
            return True
        return any(is_under(path, rule) for rule in self.rules.get(section, ()))


def parse(text: str, source: str = "whitelist") -> Whitelist:
    rules: dict[str, list[bytes]] = {}
    section: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        if line.startswith("["):
            if not line.endswith("]"):
                raise ConfigError(f"{where}: malformed section header {line!r}")
            section = line[1:-1].strip()
            if section not in SECTIONS and section not in IGNORED:
                raise ConfigError(f"{where}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
            rules.setdefault(section, [])
            continue
        key, equals, value = line.partition("=")
        if not equals:
            raise ConfigError(f"{where}: expected Path=..., got {line!r}")
        if section is None:
            raise ConfigError(f"{where}: {key.strip()}= outside a section")
        if key.strip() != "Path":
            raise ConfigError(f"{where}: unknown key {key.strip()!r} (only Path=)")
        if section in IGNORED:
            continue  # [Kill] names programs, [Udsconnect] sockets: not ours to check
        for item in value.split(";"):
            item = item.strip()
            if not item:
                continue  # GLib lists may end with ';'
            if not item.startswith("/") or ".." in item.split("/") or len(item) > MAX_RULE:
                raise ConfigError(f"{where}: rule {item!r} must be an absolute path without '..' components")
            rules[section].append(item.rstrip("/").encode() or b"/")
        if len(rules[section]) > MAX_RULES:
            raise ConfigError(f"{where}: more than {MAX_RULES} rules in [{section}]")
    return Whitelist({name: tuple(items) for name, items in rules.items() if name in SECTIONS}, enforced=True)


def load(path: str | Path) -> Whitelist:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the whitelist: {exc.strerror}", path=str(path)) from None
    return parse(text, str(path))
