"""Atomic writes: a temporary sibling that no other writer uses, then one rename (or one put)."""

from __future__ import annotations

import uuid


def temporary_name(path):
    """A sibling of `path` (a Path or a store path) named `.part` plus a random token: concurrent atomic
    writes of the same file never rename each other's half-written temporaries."""
    return path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.part")
