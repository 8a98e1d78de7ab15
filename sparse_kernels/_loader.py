"""Loads the compiled kernel library, degrading to the torch reference when it cannot."""
import glob
import logging
import os

import torch

log = logging.getLogger("sparse_kernels")

_HERE = os.path.dirname(os.path.abspath(__file__))

#: Why the native library is not in use, or None when it loaded.
native_load_error: str | None = None


def _load() -> None:
    global native_load_error
    candidates = sorted(glob.glob(os.path.join(_HERE, "_C*.so")) +
                        glob.glob(os.path.join(_HERE, "_C*.pyd")))
    if not candidates:
        native_load_error = ("no compiled library in the package (install with "
                             "`pip install -e . --no-build-isolation`)")
    else:
        try:
            torch.ops.load_library(candidates[0])
        except (OSError, RuntimeError) as exc:
            native_load_error = f"{os.path.basename(candidates[0])} failed to load: {exc}"
    if native_load_error is not None:
        log.warning("sparse_kernels: %s; the pure-torch reference serves every op",
                    native_load_error)


def native_loaded() -> bool:
    return native_load_error is None


_load()
