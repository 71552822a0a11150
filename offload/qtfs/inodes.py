"""The client's inode table: FUSE inode numbers <-> host files and the paths they are at.

A host file is known by (st_dev, st_ino); it gets one local inode number
for as long as the kernel remembers it (lookup counts, as FUSE defines
them: every entry reply adds one, forget subtracts).  Operations name
files by path, so each node also records the path it was last seen at;
rename moves it (and everything below a renamed directory), unlink drops
the mapping.  A hard link's node keeps the path it was last looked up by.
"""

from __future__ import annotations

import errno

ROOT_INODE = 1


class Node:
    __slots__ = ("inode", "key", "lookups", "path")

    def __init__(self, inode: int, key: tuple[int, int], path: bytes | None) -> None:
        self.inode = inode
        self.key = key
        self.path = path
        self.lookups = 0


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class InodeTable:
    def __init__(self, root_key: tuple[int, int] = (0, 0)) -> None:
        self.root = Node(ROOT_INODE, root_key, b"")
        self.root.lookups = 1
        self._nodes: dict[int, Node] = {ROOT_INODE: self.root}
        self._by_key: dict[tuple[int, int], Node] = {root_key: self.root}
        self._by_path: dict[bytes, Node] = {b"": self.root}
        self._next = ROOT_INODE + 1

    def path(self, inode: int) -> bytes:
        node = self._nodes.get(inode)
        if node is None or node.path is None:
            raise OSError(errno.ESTALE, "stale inode")
        return node.path

    def get(self, inode: int) -> Node | None:
        return self._nodes.get(inode)

    def find(self, path: bytes) -> Node | None:
        """The node last seen at ``path``, if any."""
        return self._by_path.get(path)

    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def node_at(self, path: bytes, key: tuple[int, int]) -> Node:
        """The node for the file ``key`` seen at ``path`` (made if new; its count unchanged)."""
        node = self._by_key.get(key)
        if node is None:
            node = Node(self._next, key, None)
            self._next += 1
            self._nodes[node.inode] = node
            self._by_key[key] = node
        if node.path != path:
            self._place(node, path)
        return node

    def remember(self, path: bytes, key: tuple[int, int]) -> Node:
        """``node_at`` plus one lookup (what an entry reply to the kernel means)."""
        node = self.node_at(path, key)
        node.lookups += 1
        return node

    def _place(self, node: Node, path: bytes) -> None:
        if node.path is not None and self._by_path.get(node.path) is node:
            del self._by_path[node.path]
        previous = self._by_path.get(path)
        if previous is not None and previous is not node:
            previous.path = None  # replaced on the host: that file is not at this path any more
        node.path = path
        self._by_path[path] = node

    def drop_unused(self, node: Node) -> None:
        """Forget a node made for a reply the kernel did not take."""
        if node.lookups == 0 and node is not self.root:
            self._remove(node)

    def forget(self, inode: int, count: int) -> None:
        node = self._nodes.get(inode)
        if node is None or node is self.root:
            return
        node.lookups -= count
        if node.lookups <= 0:
            self._remove(node)

    def _remove(self, node: Node) -> None:
        self._nodes.pop(node.inode, None)
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]
        if node.path is not None and self._by_path.get(node.path) is node:
            del self._by_path[node.path]

    def removed(self, path: bytes) -> None:
        """``path`` was unlinked or removed: whatever node was there is no longer reachable by it."""
        node = self._by_path.pop(path, None)
        if node is not None:
            node.path = None

    def moved(self, old: bytes, new: bytes) -> None:
        """A rename: the node at ``old`` and everything below it now live under ``new``."""
        self.removed(new)
        prefix = old + b"/"
        for path in [p for p in self._by_path if p == old or p.startswith(prefix)]:
            node = self._by_path.pop(path)
            node.path = new + path[len(old) :]
            self._by_path[node.path] = node

    def exchanged(self, a: bytes, b: bytes) -> None:
        """RENAME_EXCHANGE: the two paths (and their subtrees) swap."""
        temp = b"\0exchange"
        self.moved(a, temp)
        self.moved(b, a)
        self.moved(temp, b)
