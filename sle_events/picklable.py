"""Exceptions that survive a trip between processes.

`sle verify` and `sle projections rebuild` run workers in other processes, and a worker's exception reaches the
parent pickled. Pickle rebuilds an exception as `cls(*exc.args)`, which fails for a class whose `__init__` takes
other arguments than its message (the parent's result thread then dies and the parent waits forever), and
silently drops attributes set from keyword arguments. This module has no imports of the project, so every
layer can use it.
"""

from __future__ import annotations

import copyreg
from typing import Any


class Picklable:
    """Mixin for exception classes: unpickled without calling `__init__`, with `args` and attributes kept."""

    def __reduce__(self) -> tuple[Any, ...]:
        # BaseException.__new__ takes any arguments and sets `args`; __setstate__ restores the attributes.
        return copyreg.__newobj__, (type(self), *self.args), dict(self.__dict__)  # type: ignore[attr-defined]  # copyreg.__newobj__ is not in typeshed
