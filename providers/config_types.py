"""Value types shared by the config models (backupd's own and each provider's), so that a name
or a path is refused the same way, with the same words, in every section of the config.

- :data:`Name`: a job, provider, repository or VM name: 1 to :data:`MAX_NAME` characters, no
  control characters (NUL, newline, escape ...), no spaces at either end.
- :data:`ConfigPath`: a non-empty path without NUL characters (the operating system cannot
  represent one).
- :data:`FolderPath`: a :data:`ConfigPath` naming a folder that may not exist yet; refused when
  it, or a folder above it, exists as a file. A relative path is checked against the folder
  given as ``base`` in the validation context (the config file's folder; see
  :func:`backupd.config.load_config`), else against the working directory.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ValidationInfo

#: longest name accepted, in characters (the simulated provider's VM names always had it)
MAX_NAME = 255


def _check_name(value: str) -> str:
    if not value.strip():
        raise ValueError("a name cannot be empty")
    if len(value) > MAX_NAME:
        raise ValueError(f"a name is at most {MAX_NAME} characters, this one has {len(value)}")
    control = next((char for char in value if unicodedata.category(char) == "Cc"), None)
    if control is not None:
        raise ValueError(f"a name cannot contain control characters (found {control!r} in {value!r})")
    if value != value.strip():
        raise ValueError(f"a name cannot begin or end with spaces: {value!r}")
    return value


def check_path_text(value: Any) -> Any:
    """``value`` as given, unless it is a string that cannot be a path (empty, or with a NUL).

    :raises ValueError: naming the problem.
    """
    if isinstance(value, str):
        if not value:
            raise ValueError("a path cannot be empty")
        if "\0" in value:
            raise ValueError(f"a path cannot contain a NUL character: {value!r}")
    return value


def absolute(path: Path, info: ValidationInfo | None) -> Path:
    """``path`` made absolute against the ``base`` folder of the validation context, if any."""
    base = (info.context or {}).get("base") if info is not None else None
    return path if path.is_absolute() or base is None else Path(base) / path


def refuse_files_on_the_way(path: Path) -> None:
    """Raise ValueError when ``path`` or a folder above it exists as something other than a
    folder (``path`` itself may be absent: it is created on first use)."""
    for candidate in (path, *path.parents):
        if os.path.isdir(candidate):
            return
        if os.path.lexists(candidate):
            where = "" if candidate == path else f" (on the way to {path})"
            raise ValueError(f"{candidate} is a file, not a folder{where}")


def _check_folder(path: Path, info: ValidationInfo) -> Path:
    refuse_files_on_the_way(absolute(path, info))
    return path


Name = Annotated[str, AfterValidator(_check_name)]
ConfigPath = Annotated[Path, BeforeValidator(check_path_text)]
FolderPath = Annotated[Path, BeforeValidator(check_path_text), AfterValidator(_check_folder)]
