"""Victim models from the user's code: ``model: package.module:function``.

The function is called with the keyword arguments ``num_classes``, ``in_channels`` and ``image_size`` (and
``width`` when the trial sets one) under the trial's ``model_seed``, and returns a ``torch.nn.Module``. The
module is imported by name from the Python path; a study file's directory joins the path when the study is
loaded (sweep.study), so a module beside the study file is found.

A trial is keyed by the factory's name (the ``model`` value) and the SHA-256 of its module's source file
(``model_source_sha256``), so editing that file gives new keys; the modules it imports in turn are not hashed.
On a Ray cluster the module's top-level package (or single-file module) travels to the workers in the
runtime environment's ``py_modules`` (:func:`shipped`), not over a shared disk.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
import sysconfig
from collections.abc import Callable

from .errors import ConfigError, require

FIELD = "model"
FORM = "write it as package.module:function (a dotted module name, one colon, a function name)"
PATH_FIX = "put the module's directory on PYTHONPATH, or the module beside the study file"
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_SPEC = re.compile(rf"^({_NAME}(?:\.{_NAME})*):({_NAME})$")
_imported: dict[str, str] = {}  # module name -> the source digest it was imported (or reloaded) at


def is_factory(name: object) -> bool:
    """Whether a ``model`` value names a function (``package.module:function``) rather than a registry model."""
    return isinstance(name, str) and ":" in name


def parse(name: str) -> tuple[str, str]:
    """(module, function) of ``package.module:function``; a malformed value is a ConfigError."""
    match = _SPEC.match(name)
    require(match is not None, FIELD, name, FORM)
    return match.group(1), match.group(2)


def _module(name: str):
    """The factory's module, imported, and reloaded when its source changed since (new keys, new code)."""
    module_name, _ = parse(name)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name) and module_name[len(error.name) :][:1] in ("", "."):
            raise ConfigError(FIELD, name, f"no module {module_name!r} on the Python path; {PATH_FIX}") from None
        raise _failed(name, "importing", module_name, error) from None
    except Exception as error:  # the module's own code failed
        raise _failed(name, "importing", module_name, error) from None
    path = getattr(module, "__file__", None)
    if path and os.path.isfile(path):
        digest = _digest(path)
        if _imported.setdefault(module_name, digest) != digest:
            importlib.invalidate_caches()
            try:
                module = importlib.reload(module)
            except Exception as error:
                raise _failed(name, "reloading", module_name, error) from None
            _imported[module_name] = digest
    return module


def factory(name: str) -> Callable:
    """The function ``name`` names; a ConfigError when its module cannot be imported or lacks it."""
    module_name, function = parse(name)
    found = getattr(_module(name), function, None)
    require(
        callable(found),
        FIELD,
        name,
        f"module {module_name} has no function {function!r}; define it, or name one the module has",
    )
    return found


def build(name: str, *, channels: int, num_classes: int, image_size: int, width: int | None):
    """The module the factory returns; a factory that raises or returns no ``nn.Module`` is a ConfigError."""
    from torch import nn

    arguments = dict(num_classes=num_classes, in_channels=channels, image_size=image_size)
    if width is not None:
        arguments["width"] = width
    function = factory(name)
    try:
        model = function(**arguments)
    except Exception as error:
        keywords = ", ".join(arguments)
        fix = f"it must build a model from the keyword arguments {keywords}"
        raise ConfigError(FIELD, name, f"the function raised {_reason(error)}; {fix}") from None
    require(
        isinstance(model, nn.Module),
        FIELD,
        name,
        f"the function returned a {type(model).__name__}, not a torch.nn.Module; return the model",
    )
    return model


def source(name: str) -> str:
    """The factory module's source file (absolute)."""
    path = getattr(_module(name), "__file__", None)
    require(path is not None and os.path.isfile(path), FIELD, name, f"its module has no source file; {PATH_FIX}")
    return os.path.abspath(path)


def source_sha256(name: str) -> str:
    """The SHA-256 (hex) of the factory module's source file: what a trial's key holds."""
    return _digest(source(name))


def check_source(name: str, sha256: str | None) -> None:
    """A ConfigError when the module's source is not the one the trial was keyed with (a file edited since,
    or another copy on a worker would give a row under a wrong key)."""
    if sha256 is None:
        return
    found = source_sha256(name)
    require(
        found == sha256,
        FIELD,
        name,
        f"its module changed after its trials were keyed (sha256 {sha256[:12]}..., now {found[:12]}...); "
        "restore it, or run the study again to key the new code",
    )


def shipped(name: str) -> str | None:
    """What a Ray worker needs to import the factory (runtime_env ``py_modules``): the directory of its
    top-level package, or the file of a single-file module; None for installed packages and gradinv's own."""
    module_name, _ = parse(name)
    top = module_name.split(".")[0]
    if top in ("gradinv", "sweep", "analysis"):
        return None
    _module(name)
    module = sys.modules[top]
    paths = list(getattr(module, "__path__", []) or [])
    path = paths[0] if len(paths) == 1 else getattr(module, "__file__", None)
    if not path:
        return None
    path = os.path.abspath(path)
    installed = {sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib", "platstdlib")}
    if any(path.startswith(os.path.abspath(root) + os.sep) for root in installed):
        return None
    return path


def _digest(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def _failed(name: str, doing: str, module_name: str, error: BaseException) -> ConfigError:
    return ConfigError(FIELD, name, f"{doing} {module_name} failed ({_reason(error)}); fix the module")


def _reason(error: BaseException) -> str:
    text = str(error).splitlines()[0][:120] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
