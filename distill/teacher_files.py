"""Reading a teacher folder's files without loading a model: component configs, weight files cut short, the Hub."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import DistillError

FINGERPRINT_CHUNK = 64 * 1024


def component_config(folder: Path, component: str, path: str) -> dict:
    """``<component>/config.json`` of a teacher, or a DistillError saying it is missing or unreadable."""
    file = folder / component / "config.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise DistillError(f"{path} is incomplete: {component}/config.json is missing. Re-download the teacher "
                           "(or save it again with save_pretrained).") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DistillError(f"{file} is damaged (not valid JSON). Re-download the teacher's {component}/ "
                           "folder.") from None


WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")  # what from_pretrained reads, no variant
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def _safetensors_damage(file: Path) -> str | None:
    """Why a .safetensors file cannot be complete (its header must describe exactly the bytes it holds), or None.

    Reads the header only, so even a 10 GB UNet is checked in milliseconds.
    """
    size = file.stat().st_size
    if size < 8:
        return f"{size} bytes, too short for a safetensors header"
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if header_size > min(size - 8, MAX_HEADER_BYTES):
            return f"its header claims {header_size} bytes but the file holds {size}"
        try:
            header = json.loads(f.read(header_size))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not valid safetensors JSON"
    if 8 + header_size + end != size:
        return f"it holds {size} bytes but its header describes {8 + header_size + end}"
    return None


def check_weight_files(component: Path) -> None:
    """Refuse a teacher component whose safetensors weights are cut short or missing (an interrupted download)."""
    files = [component / name for name in WEIGHT_NAMES if (component / name).is_file()]
    for name in WEIGHT_NAMES:  # sharded weights: <name>.index.json lists the shard files
        index = component / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise DistillError(f"The teacher's weights index {index} is damaged (not a valid weight map). "
                                   f"Re-download the teacher's {component.name}/ folder.") from None
            files += [component / shard for shard in shards]
    if not files and not any(component.glob("*.safetensors")) and not any(component.glob("*.bin")):
        raise DistillError(f"The teacher's {component.name}/ folder ({component}) holds no weights file (e.g. "
                           f"{WEIGHT_NAMES[0 if component.name in ('unet', 'vae') else 1]}). Re-download the "
                           "teacher.")
    for file in files:
        if not file.is_file():
            raise DistillError(f"The teacher's weights file {file} is missing (its index lists it): an interrupted "
                               f"download. Re-download the teacher's {component.name}/ folder and rerun.")
        damage = _safetensors_damage(file)
        if damage:
            raise DistillError(f"The teacher's weights file {file} is damaged ({damage}): an interrupted download "
                               f"or copy cut it short. Re-download {component.name}/{file.name} (or the whole "
                               "teacher) and rerun.")


def resolve_hub_snapshot(repo_id: str, cache_dir: str | None, revision: str | None) -> Path:
    """Download (or find in the cache) a teacher's files from the Hub."""
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        raise DistillError(f"Teacher folder {repo_id} does not exist. Check --pretrained_teacher_model.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, revision=revision,
                                      allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]))
    except Exception as error:  # network, auth or missing repo: all user-facing
        raise DistillError(
            f"Could not find the teacher {repo_id}: it is not a local folder and the Hub lookup failed "
            f"({type(error).__name__}). Pass a local folder, or check the repo id and your connection."
        ) from error


NETWORK_SUBFOLDERS = ("unet", "transformer")  # where the families' denoiser networks live (distill/families.py)


def teacher_fingerprint(teacher_path: str | os.PathLike) -> str:
    """A cheap identity of a teacher's denoiser network (unet/ or transformer/): sha256 of its config and a sample of
    its weight bytes.

    Reads about 200 KB per weight file whatever its size (the size and 64 KiB at its start, middle and end), so the
    same files give the same value under any path or Hub id, while another model or a fine-tune of the same one (its
    weights differ everywhere) gives another.
    """
    unet = next((Path(teacher_path) / name for name in NETWORK_SUBFOLDERS
                 if (Path(teacher_path) / name / "config.json").is_file()), Path(teacher_path) / NETWORK_SUBFOLDERS[0])
    config = json.loads((unet / "config.json").read_text())
    digest = hashlib.sha256(json.dumps({k: v for k, v in config.items() if not k.startswith("_")},
                                       sort_keys=True).encode())
    index = unet / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = [unet / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        files = [file for file in (unet / "diffusion_pytorch_model.safetensors", unet / "diffusion_pytorch_model.bin")
                 if file.is_file()][:1]
    for file in files:
        size = file.stat().st_size
        digest.update(str(size).encode())
        with open(file, "rb") as f:
            for offset in (0, size // 2, max(size - FINGERPRINT_CHUNK, 0)):
                f.seek(offset)
                digest.update(f.read(FINGERPRINT_CHUNK))
    return digest.hexdigest()
