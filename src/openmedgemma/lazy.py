"""Package exports imported from their module on first use, so that importing a package (and the CLI) stays
fast and torch-free."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """`__getattr__` and `__dir__` for `package`, whose public names map to their module in `exports`
    (absolute, or relative to the package). A name, once imported, is kept in the package's namespace."""
    module = sys.modules[package]

    def __getattr__(name: str):
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        path = target if target.startswith("openmedgemma.") else f"{package}.{target}"
        value = getattr(importlib.import_module(path), name)
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(exports))

    return __getattr__, __dir__
