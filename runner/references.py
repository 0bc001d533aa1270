"""References by name: `"module:attribute"`, resolved where the named object is used.

A seam's declarations are read where torch must not be imported (the driver, `quantbench
validate`, `collect`, `report`), and name the halves that need it (a precision family's worker, a
task's worker and plots, the function a work item runs on a node) by reference. The process that
uses one resolves it, and imports its module then: a variant's own process, never the fork server
before it forks. This is the one place code is imported by name.
"""

from __future__ import annotations

import functools
import pkgutil
from typing import Any


@functools.cache
def resolve(reference: str) -> Any:
    """The object `reference` ("package.module:attribute") names, its module imported now."""
    return pkgutil.resolve_name(reference)


def call(reference: str, *args) -> Any:
    """What the object `reference` names returns for args. Handed to another process with its
    reference, so that the callee imports the module, not the caller: a Ray worker that forks a
    variant's process never imports torch for it (2.2 s on 2 cores, first call)."""
    return resolve(reference)(*args)
