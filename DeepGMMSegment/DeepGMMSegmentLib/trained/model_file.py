"""Trained-model files: one file with the network weights and plain-data metadata.

A model file is written with ``torch.save`` as a dictionary holding only tensors, strings and
integers::

    {"format": "deepgmm-model", "format_version": 1,
     "metadata_json": "<JSON text>", "state_dict": {name: tensor, ...}}

Model files travel between sites, so loading never executes code from the file: it uses
``torch.load(..., weights_only=True)``, whose unpickler accepts only tensors and primitive
containers and refuses anything else (e.g. a pickled callable that would run a command). The
metadata is JSON text, parsed with ``json.loads``; nothing in it is evaluated.

Metadata keys (see ``docs/training.md``): ``n_classes``, ``n_channels``, ``channel_names``,
``spatial_dims``, ``method``, ``covariance_type``, ``normalization``, ``network`` (the U-Net
configuration), ``spacing`` (the voxel size (z, y, x) of the training images, or None; older files
lack it), ``prior_means``, ``prior_weight``, ``class_names`` (one per class, or None; older
files lack it), ``package_version``, ``created``,
``training`` (summary: cases, epochs, best epoch, NLL curves, seconds, seed, world size).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

FORMAT_NAME = "deepgmm-model"
FORMAT_VERSION = 1
MODEL_SUFFIX = ".pt"

_REQUIRED_METADATA = ("n_classes", "n_channels", "channel_names", "spatial_dims", "method", "network")


def package_version() -> str:
    """Version of the installed DeepGMMSegment distribution ("unknown" when run from a checkout)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("deepgmmsegment")
    except (ImportError, PackageNotFoundError):  # pragma: no cover - depends on installation
        return "unknown"


def save_model(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
    """Write weights + metadata to ``path`` atomically (a reader never sees a half-written file).

    ``metadata`` must be JSON-serialisable plain data; it is stored as JSON text so that loading
    needs no pickled Python objects. Returns the path written.
    """
    path = Path(path)
    try:
        metadata_json = json.dumps(dict(metadata), allow_nan=True, sort_keys=True)
    except TypeError as error:
        raise ValueError(f"Model metadata must be plain data (numbers, strings, lists, dicts): {error}") from None
    weights = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"state_dict entry {name!r} is not a tensor ({type(tensor).__name__}).")
        weights[str(name)] = tensor.detach().to("cpu").clone()
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "metadata_json": metadata_json,
        "state_dict": weights,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a model file safely; returns ``(state_dict, metadata)``.

    Raises ``ValueError`` naming the problem when the file is missing, not a DeepGMMSegment
    model, of a newer format, or contains anything besides tensors and plain data (such files
    are refused without running any of their code).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Model file {str(path)!r} does not exist: pass the path of a file written by deepgmm-train.")
    if not zipfile.is_zipfile(path):  # every file torch.save writes (and so every model file) is a zip archive
        raise ValueError(
            f"{str(path)!r} is not a DeepGMMSegment model file (not a PyTorch archive): pass the .pt file "
            "written by deepgmm-train or DeepGMMSegmentLib.train."
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"Refusing to load {str(path)!r}: it contains Python objects other than tensors and plain data, "
            "which could execute code. Only model files written by DeepGMMSegment (deepgmm-train / "
            f"DeepGMMSegmentLib.train) can be loaded. Details: {str(error).splitlines()[0]}"
        ) from None
    except Exception as error:  # torch raises many kinds for a file that is not a torch archive
        raise ValueError(
            f"{str(path)!r} is not a readable DeepGMMSegment model file ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no details'}). Re-export it with deepgmm-train."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{str(path)!r} is a PyTorch file but not a DeepGMMSegment model (no '{FORMAT_NAME}' header). "
            "Train a model with deepgmm-train or DeepGMMSegmentLib.train."
        )
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} uses model format version {version!r}; this DeepGMMSegment reads up to "
            f"version {FORMAT_VERSION}. Update DeepGMMSegment to load it."
        )
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise ValueError(f"{str(path)!r} is damaged: its weights are not a dictionary of tensors.")
    metadata_json = payload.get("metadata_json")
    if not isinstance(metadata_json, str):
        raise ValueError(f"{str(path)!r} is damaged: its metadata is missing.")
    try:
        metadata = json.loads(metadata_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is damaged: its metadata is not valid JSON ({error}).") from None
    missing = [key for key in _REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"{str(path)!r} is damaged: its metadata lacks {', '.join(missing)}.")
    return state_dict, metadata


def describe_model(path: str | os.PathLike) -> dict:
    """Metadata of a model file as a plain dict, for display (e.g. in the Slicer panel).

    Adds ``path``, ``file_size_bytes`` and ``n_parameters``; the training curves are summarised
    (their lengths kept) so the dict stays small enough to show.
    """
    state_dict, metadata = load_model(path)
    info = dict(metadata)
    info["path"] = str(Path(path).resolve())
    info["file_size_bytes"] = os.path.getsize(path)
    info["n_parameters"] = int(sum(t.numel() for t in state_dict.values()))
    training = dict(info.get("training") or {})
    for key in ("train_loss_history", "val_loss_history", "train_nll_history", "val_nll_history"):
        if key in training:
            training[key] = f"{len(training[key])} values"
    info["training"] = training
    return info


def format_description(info: Mapping[str, Any]) -> str:
    """Human-readable multi-line summary of ``describe_model`` output."""
    training = info.get("training") or {}
    names = ", ".join(info.get("channel_names") or [])
    lines = [
        f"classes: {info.get('n_classes')}   method: {info.get('method')}   covariance: {info.get('covariance_type')}",
        f"channels ({info.get('n_channels')}): {names}",
        f"image dimension: {info.get('spatial_dims')}D   normalisation: {(info.get('normalization') or {}).get('kind')}",
        *([f"training voxel size: {' x '.join(f'{v:g}' for v in info['spacing'])} (finer images are segmented "
           "on this grid)"] if info.get("spacing") else []),
        f"prior means: {'yes (weight ' + str(info.get('prior_weight')) + ')' if info.get('prior_means') else 'no'}",
        f"class names: {', '.join(info.get('class_names') or []) or 'none (class 1..K)'}",
        f"trained on {training.get('n_train', '?')} cases (+{training.get('n_val', '?')} held out), "
        f"best epoch {training.get('best_epoch', '?')} of {training.get('epochs', '?')}, "
        f"held-out NLL {training.get('best_val_nll', float('nan')):.4f}"
        if isinstance(training.get("best_val_nll"), (int, float))
        else f"trained on {training.get('n_train', '?')} cases",
        f"package version: {info.get('package_version')}   created: {info.get('created')}",
    ]
    return "\n".join(lines)


def check_compatible(
    metadata: Mapping[str, Any],
    n_channels: int,
    spatial_dims: int | None = None,
    channel_names: Sequence[str] | None = None,
    n_classes: int | None = None,
) -> None:
    """Raise ``ValueError`` saying exactly what does not match between a model and an input.

    ``n_channels``: number of input channels; ``spatial_dims``: 2 or 3 (the input's dimension;
    a 2D model can segment a 3D volume slice by slice only if its network says so, so dimensions
    must match); ``channel_names``: compared (in order) only when both sides have names;
    ``n_classes``: the K the caller asked for, if any.
    """
    problems = []
    model_channels = int(metadata["n_channels"])
    model_names = list(metadata.get("channel_names") or [])
    if n_channels != model_channels:
        expected = f" ({', '.join(model_names)})" if model_names else ""
        problems.append(
            f"the model expects {model_channels} channel(s){expected} but the input has {n_channels}"
        )
    elif channel_names is not None and model_names and not is_generic_channel_names(channel_names) and not is_generic_channel_names(model_names):
        given = [str(n) for n in channel_names]
        if [n.lower() for n in given] != [n.lower() for n in model_names]:
            if sorted(n.lower() for n in given) == sorted(n.lower() for n in model_names):
                problems.append(
                    f"the channels are in a different order: the model expects {model_names}, the input is {given}; "
                    "reorder the inputs"
                )
            else:
                problems.append(f"the channel names differ: the model was trained on {model_names}, the input is {given}")
    if spatial_dims is not None and int(metadata["spatial_dims"]) != int(spatial_dims):
        problems.append(
            f"the model was trained on {metadata['spatial_dims']}D images but the input is {spatial_dims}D"
        )
    if n_classes is not None and int(n_classes) != int(metadata["n_classes"]):
        problems.append(
            f"the model segments into {metadata['n_classes']} classes but {n_classes} were requested "
            f"(set the number of classes to {metadata['n_classes']} or train another model)"
        )
    if problems:
        raise ValueError("The trained model does not match the input: " + "; ".join(problems) + ".")


def is_generic_channel_names(names: Sequence[str]) -> bool:
    """True for placeholder names ("channel1", "input 2", ...) that carry no meaning to compare."""
    return all(re.fullmatch(r"(channel|input|image|volume)[ _-]?\d+", str(n).strip().lower()) for n in names)

