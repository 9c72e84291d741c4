"""Cohorts of cases on disk: a folder or a CSV file → list of cases (channel files + optional mask).

Used by ``deepgmm-train`` and the batch mode of ``deepgmm-segment --model``. Accepted layouts:

* **CSV** (``.csv``): a header row; a column ``case`` (case id, optional), a column ``mask``
  (optional, may be empty), every other column is one channel, in column order, named by its
  header. Relative paths are relative to the CSV file's folder.
* **Folder of case folders**: ``cohort/<case>/<channel>.nii.gz`` (+ ``mask.nii.gz``). Channels are
  the image files other than the mask, in name order (or those named by ``channel_names``); every
  case must have the same channel files.
* **Flat folder**: every image file is one single-channel case; ``<case>_mask.nii.gz`` is the mask
  of ``<case>.nii.gz``. With ``channel_names`` (e.g. T1,T2) files ``<case>_T1.nii.gz``,
  ``<case>_T2.nii.gz`` are grouped into multi-channel cases.

Reading (SimpleITK, resampling of channels 2..N and the mask onto channel 1) is the single-case
reader of :mod:`.images`, so a case is read the same way in every command.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .images import engine_geometry, load_inputs

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class CaseFiles:
    """One case on disk."""

    case_id: str
    channels: list[str]  # one image file per channel, in channel order
    mask: str | None = None


@dataclass
class LoadedCase:
    """One case read into memory, on the grid of its first channel."""

    case_id: str
    channels: list[np.ndarray]  # float32, engine shape ((y, x) or (z, y, x))
    mask: np.ndarray | None
    spacing: tuple[float, ...]  # engine (z, y, x) order
    reference: object  # SimpleITK image of channel 1 (output geometry)
    notes: list[str]


def image_stem(path: str | os.PathLike) -> str | None:
    """File name without its image suffix, or None if the file is not an image SimpleITK reads."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and image_stem(p) is not None
                  and not p.name.startswith("."))


def discover_cases(source: str | os.PathLike, channel_names: Sequence[str] | None = None,
                   mask_name: str = "mask") -> tuple[list[CaseFiles], list[str]]:
    """Cases and channel names of a cohort folder or CSV file (layouts in the module docstring).

    Raises ``ValueError`` naming the file or case that does not fit the layout.
    """
    source = Path(source)
    if not source.exists():
        raise ValueError(f"{str(source)!r} does not exist: give a folder of cases or a CSV file listing them.")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise ValueError(f"{str(source)!r} is a file but not a .csv case list: give a folder of cases or a CSV file.")
        return _from_csv(source)
    subfolders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".") and _images_in(p))
    if subfolders:
        return _from_case_folders(subfolders, channel_names, mask_name)
    return _from_flat_folder(source, channel_names, mask_name)


def _from_csv(path: Path) -> tuple[list[CaseFiles], list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as stream:
        rows = list(csv.reader(stream))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if len(rows) < 2:
        raise ValueError(f"{str(path)!r} has no cases: it needs a header row (e.g. case,T1,T2,mask) and one row per case.")
    header = [h.strip() for h in rows[0]]
    lowered = [h.lower() for h in header]
    case_col = lowered.index("case") if "case" in lowered else None
    mask_col = lowered.index("mask") if "mask" in lowered else None
    channel_cols = [i for i in range(len(header)) if i not in (case_col, mask_col)]
    if not channel_cols:
        raise ValueError(f"{str(path)!r} has no channel column: add one column per image channel (e.g. T1,T2).")
    names = [header[i] or f"channel{n + 1}" for n, i in enumerate(channel_cols)]
    cases, seen = [], set()
    for line, row in enumerate(rows[1:], start=2):
        row = [cell.strip() for cell in row] + [""] * (len(header) - len(row))

        def resolve(cell: str) -> str:
            p = Path(cell)
            return str(p if p.is_absolute() else path.parent / p)

        channels = [row[i] for i in channel_cols]
        if not all(channels):
            raise ValueError(f"{str(path)!r} line {line}: a channel path is empty; every case needs every channel.")
        case_id = row[case_col] if case_col is not None and row[case_col] else (image_stem(channels[0]) or f"case{line - 1}")
        if case_id in seen:
            raise ValueError(f"{str(path)!r} line {line}: case id {case_id!r} appears twice; case ids must be unique.")
        seen.add(case_id)
        mask = resolve(row[mask_col]) if mask_col is not None and row[mask_col] else None
        cases.append(CaseFiles(case_id, [resolve(c) for c in channels], mask))
    return cases, names


def _from_case_folders(folders: list[Path], channel_names, mask_name) -> tuple[list[CaseFiles], list[str]]:
    cases, names = [], None
    for folder in folders:
        files = {image_stem(p): p for p in _images_in(folder)}
        mask = next((str(p) for stem, p in files.items() if stem.lower() == mask_name.lower()), None)
        others = {stem: p for stem, p in files.items() if stem.lower() != mask_name.lower()}
        if channel_names:
            lookup = {stem.lower(): p for stem, p in others.items()}
            missing = [n for n in channel_names if n.lower() not in lookup]
            if missing:
                raise ValueError(
                    f"Case folder {str(folder)!r} has no image named {', '.join(missing)} "
                    f"(found: {', '.join(sorted(others)) or 'none'})."
                )
            channels = [str(lookup[n.lower()]) for n in channel_names]
            case_names = list(channel_names)
        else:
            case_names = sorted(others)
            channels = [str(others[s]) for s in case_names]
            if not channels:
                raise ValueError(f"Case folder {str(folder)!r} holds only a mask, no channel image.")
        if names is None:
            names = case_names
        elif [n.lower() for n in case_names] != [n.lower() for n in names]:
            raise ValueError(
                f"Case folder {str(folder)!r} has channels {case_names} but the first case has {names}: every case "
                "needs the same channel files (or pass the channel names to use)."
            )
        cases.append(CaseFiles(folder.name, channels, mask))
    return cases, list(names)


def _from_flat_folder(folder: Path, channel_names, mask_name) -> tuple[list[CaseFiles], list[str]]:
    files = {image_stem(p): p for p in _images_in(folder)}
    if not files:
        raise ValueError(
            f"{str(folder)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}) and no case folders."
        )
    suffix = "_" + mask_name.lower()
    masks = {stem[: -len(suffix)].lower(): str(p) for stem, p in files.items() if stem.lower().endswith(suffix)}
    images = {stem: p for stem, p in files.items() if not stem.lower().endswith(suffix)}
    cases = []
    if channel_names and len(channel_names) > 1:
        groups: dict[str, dict[str, Path]] = {}
        for stem, p in images.items():
            for name in channel_names:
                if stem.lower().endswith("_" + name.lower()):
                    groups.setdefault(stem[: -len(name) - 1], {})[name.lower()] = p
        for case_id in sorted(groups):
            missing = [n for n in channel_names if n.lower() not in groups[case_id]]
            if missing:
                raise ValueError(f"Case {case_id!r} in {str(folder)!r} lacks {', '.join(f'{case_id}_{m}' for m in missing)}.")
            cases.append(CaseFiles(case_id, [str(groups[case_id][n.lower()]) for n in channel_names],
                                   masks.get(case_id.lower())))
        if not cases:
            raise ValueError(f"No files named <case>_{channel_names[0]} etc. in {str(folder)!r}.")
        return cases, list(channel_names)
    for stem in sorted(images):
        cases.append(CaseFiles(stem, [str(images[stem])], masks.get(stem.lower())))
    return cases, [channel_names[0] if channel_names else "image"]


def load_case(case: CaseFiles) -> LoadedCase:
    """Read one case (channels resampled onto channel 1's grid). Raises ``ValueError`` for bad files."""
    inputs = load_inputs(case.channels, case.mask)
    shape, spacing = engine_geometry(inputs.reference)
    channels = [a.reshape(shape) for a in inputs.channels]
    mask = None if inputs.mask is None else inputs.mask.reshape(shape)
    return LoadedCase(case.case_id, channels, mask, tuple(spacing), inputs.reference, list(inputs.notes))
