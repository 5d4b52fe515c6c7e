"""Scan a model repository folder: which models exist, which versions, and a fingerprint that
changes when any of their files change (what poll mode compares)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ModelFolder:
    name: str
    path: Path
    # (relative path, size, mtime_ns) of every file below the folder, sorted.
    fingerprint: tuple[tuple[str, int, int], ...]


def scan_repository(root: Path) -> dict[str, ModelFolder]:
    """Every non-hidden folder directly under `root` is a model named after the folder."""
    found: dict[str, ModelFolder] = {}
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return found
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        path = Path(entry.path)
        found[entry.name] = ModelFolder(entry.name, path, fingerprint(path))
    return found


def fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    items: list[tuple[str, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if filename.startswith("."):
                continue
            full = os.path.join(dirpath, filename)
            try:
                st = os.stat(full)
            except FileNotFoundError:  # removed while we walked: the next scan sees it
                continue
            items.append((os.path.relpath(full, folder), st.st_size, st.st_mtime_ns))
    return tuple(sorted(items))


def version_folders(model_dir: Path, model_filename: str) -> dict[int, Path]:
    """Numeric subfolders holding the model file (or folder) -> path of that file."""
    versions: dict[int, Path] = {}
    try:
        entries = list(os.scandir(model_dir))
    except FileNotFoundError:
        return versions
    for entry in entries:
        if not entry.is_dir() or not entry.name.isdigit():
            continue
        candidate = Path(entry.path) / model_filename
        if candidate.exists():
            versions[int(entry.name)] = candidate
    return versions
