"""Where `configs/...` paths lead when `ctrl` runs outside the repository.

The repository's `configs/` folder ships with the package (in a wheel as `ctrl/configs/`, see pyproject.toml), so
`ctrl run`, `ctrl bench` and the README's examples run from any folder. One rule, for every path a command reads
as a config or an example (`--config`, `--config_dir`, `--data.data_dir` / `--data_dir`, `ctrl score --rows`):
a path that exists as given wins; otherwise a relative path under `configs/` names the shipped copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # ctrl/
CONFIG_OPTIONS = ("--config", "-c")


def shipped_configs() -> Path:
    """The copy of `configs/` that came with the package: inside it when installed from a wheel or sdist, the
    repository's own beside it in a source checkout or an editable install."""
    installed = PACKAGE / "configs"
    return installed if installed.is_dir() else PACKAGE.parent / "configs"


def resolve_config_path(path: str) -> str:
    """`path` itself when it exists or is not a relative path under `configs/`; otherwise its shipped copy when
    that exists (else `path`, so the error that follows names what the user wrote)."""
    given = Path(path)
    if given.exists() or given.is_absolute() or given.parts[:1] != ("configs",):
        return path
    shipped = shipped_configs().joinpath(*given.parts[1:])
    return str(shipped) if shipped.exists() else path


def portable_config_path(path: str) -> str:
    """A path into some copy of `configs/` as `configs/...` when the shipped copy has that file, wherever either
    lies (a checkout, a venv's site-packages, another machine's); any other path as given. The same configs
    then compare alike across installations, e.g. in `ctrl bench`'s store (whose content hash still tells
    whether the files changed)."""
    parts = Path(path).parts
    if "configs" not in parts:
        return path
    inside = parts[len(parts) - parts[::-1].index("configs"):]  # after the last `configs`
    return str(Path("configs", *inside)) if inside and shipped_configs().joinpath(*inside).is_file() else path


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """Command-line arguments with each config file (`--config X`, `--config=X`, `-c X`) resolved as above. A
    `--config` given as a YAML string instead of a file is not under `configs/` and stays as it is."""
    out = list(args)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if eq and name in CONFIG_OPTIONS:
            out[i] = f"{name}={resolve_config_path(value)}"
        elif arg in CONFIG_OPTIONS and i + 1 < len(out):
            out[i + 1] = resolve_config_path(out[i + 1])
    return out
