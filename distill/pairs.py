"""Coupled (initial noise, teacher sample) pairs: a resumable, sharded store and its training dataset.

Rectified Diffusion (Wang et al. 2024, Algorithm 4) retrains a student on pairs (eps, x0_hat) where x0_hat is what
the teacher's ODE solver makes of the noise eps. ``train_scripts/generate_pairs.py`` writes them here:

    <folder>/pairs.json                     manifest: teacher, sampler settings, sample count, shard size
    <folder>/shard-00000.safetensors        "noise" [n, C, h, w], "latents" [n, C, h, w]; captions in the metadata
    ...

Sample ``i`` lives in shard ``i // shard_size``; its noise is drawn from a generator seeded by (seed, i) alone, so a
run that is interrupted and started again with the same arguments makes exactly the pairs an uninterrupted run makes.
Shards are written to a temporary file and renamed, so a shard file that exists is complete; a resumed run still
checks each one (a copy or disk can cut a file short) and writes damaged ones again.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import DistillError
from .teacher_files import teacher_fingerprint

MANIFEST = "pairs.json"
FORMAT_VERSION = 1
SAMPLER = "DPMSolverMultistepScheduler (dpmsolver++, trailing, final sigma 0)"
SEED_STRIDE = 2**32  # sample i of seed s uses generator seed s * 2**32 + i: distinct for every (s, i)
logger = logging.getLogger(__name__)


@dataclass
class PairManifest:
    """What a pair folder holds and how it was made (a restart must ask for exactly the same)."""

    teacher: str
    family: str
    resolution: int
    latent_shape: list[int]
    num_samples: int
    shard_size: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    sampler: str
    prompts_source: str
    num_prompts: int
    format_version: int = FORMAT_VERSION
    # Added later, so manifests without them still read: the teacher's resolved folder and teacher_fingerprint().
    teacher_path: str = ""
    teacher_fingerprint: str = ""

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.shard_size)

    def shard_range(self, shard: int) -> range:
        """Indices of the samples stored in shard ``shard``."""
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_samples))


def shard_path(folder: Path, shard: int) -> Path:
    return Path(folder) / f"shard-{shard:05d}.safetensors"


def sample_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The initial noise eps of sample ``index``: a function of (seed, index) only."""
    generator = torch.Generator().manual_seed(seed * SEED_STRIDE + index)
    return torch.randn(shape, generator=generator)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_manifest(folder: Path) -> PairManifest:
    """The manifest of a pair folder, or a DistillError saying what is wrong with the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DistillError(f"The pair folder {folder} does not exist. Write it first with train_scripts/"
                           "generate_pairs.py --output_dir <folder>, then pass that folder as --pairs_dir.")
    path = folder / MANIFEST
    if not path.is_file():
        raise DistillError(f"{folder} is not a pair folder (no {MANIFEST}). Pass the --output_dir of "
                           "train_scripts/generate_pairs.py as --pairs_dir.")
    try:
        manifest = PairManifest(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as error:
        raise DistillError(f"{path} is not a valid pair manifest ({type(error).__name__}). Regenerate the pairs "
                           "with train_scripts/generate_pairs.py into a new folder.") from None
    if manifest.format_version != FORMAT_VERSION:
        raise DistillError(f"{path} has pair format {manifest.format_version}, this version reads {FORMAT_VERSION}. "
                           "Regenerate the pairs with this version's train_scripts/generate_pairs.py.")
    return manifest


def start_or_resume(folder: Path, manifest: PairManifest) -> list[int]:
    """Write the manifest (or check it matches the one already there) and return the shards to write: missing ones,
    and damaged ones (cut short, unreadable, wrong rows), which are deleted with a warning naming them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / MANIFEST).is_file():
        existing = read_manifest(folder)
        # teacher_path may differ for the same teacher (another working directory); an older manifest has no
        # fingerprint, and its folder keeps its own manifest.
        changed = [k for k, v in asdict(manifest).items() if getattr(existing, k) != v and k != "teacher_path"
                   and not (k == "teacher_fingerprint" and not existing.teacher_fingerprint)]
        if changed:
            raise DistillError(f"{folder} already holds pairs made with different settings ({', '.join(changed)}). "
                               "Rerun with the same arguments to resume, or pass a new --output_dir.")
    else:
        _atomic_write_text(folder / MANIFEST, json.dumps(asdict(manifest), indent=2) + "\n")
    for stale in folder.glob("*.tmp"):
        stale.unlink()  # half-written shards of a killed run
    missing = [s for s in range(manifest.num_shards) if not shard_path(folder, s).is_file()]
    damaged = [s for s in sorted(set(range(manifest.num_shards)) - set(missing))
               if not _shard_is_intact(folder, manifest, s)]
    if damaged:
        names = [shard_path(folder, s).name for s in damaged]
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        logger.warning("%d shard(s) in %s are damaged (cut short, unreadable or with the wrong number of pairs), "
                       "regenerating them: %s", len(damaged), folder, listed)
        for s in damaged:
            shard_path(folder, s).unlink()
    return sorted(missing + damaged)


def _shard_is_intact(folder: Path, manifest: PairManifest, shard: int) -> bool:
    """True if the shard reads back with the rows and shapes the manifest asks for (see _check_shard)."""
    try:
        _check_shard(folder, manifest, shard)
    except DistillError:
        return False
    return True


def write_shard(folder: Path, shard: int, noise: torch.Tensor, latents: torch.Tensor, captions: list[str]) -> Path:
    """Write one complete shard atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    if not len(noise) == len(latents) == len(captions):
        raise ValueError("noise, latents and captions must have the same length")
    path = shard_path(folder, shard)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {"noise": noise.float().contiguous().cpu(), "latents": latents.float().contiguous().cpu()}
    save_file(tensors, tmp, metadata={"captions": json.dumps(captions)})
    os.replace(tmp, path)
    return path


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset of {"noise", "latents", "caption"} items read lazily from the shards."""

    def __init__(self, folder: Path, manifest: PairManifest, captions: list[list[str]]):
        self.folder = Path(folder)
        self.manifest = manifest
        self.captions = captions

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __getitem__(self, index: int) -> dict:
        from safetensors import safe_open

        if not 0 <= index < len(self):
            raise IndexError(index)
        shard, offset = divmod(index, self.manifest.shard_size)
        with safe_open(shard_path(self.folder, shard), framework="pt") as f:
            noise = f.get_slice("noise")[offset]
            latents = f.get_slice("latents")[offset]
        return {"noise": noise, "latents": latents, "caption": self.captions[shard][offset]}


def _check_shard(folder: Path, manifest: PairManifest, shard: int) -> list[str]:
    """The captions of a complete shard; a DistillError if its contents do not match the manifest."""
    from safetensors import safe_open

    path = shard_path(folder, shard)
    expected = (len(manifest.shard_range(shard)), *manifest.latent_shape)
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in ("noise", "latents")}
            captions = json.loads((f.metadata() or {}).get("captions", "null"))
    except Exception as error:  # safetensors raises several types for truncated or foreign files
        raise DistillError(f"{path} is not a readable pair shard ({type(error).__name__}). Delete it and rerun "
                           "train_scripts/generate_pairs.py with the same arguments to write it again.") from None
    if any(shape != expected for shape in shapes.values()) or not isinstance(captions, list) \
            or len(captions) != expected[0]:
        raise DistillError(f"{path} holds {shapes} with {len(captions or [])} captions, expected {expected}. Delete "
                           "it and rerun train_scripts/generate_pairs.py with the same arguments to write it again.")
    return captions


def load_pair_dataset(path: str | os.PathLike, teacher=None, resolution: int | None = None) -> PairDataset:
    """Check a pair folder completely (manifest, every shard present and well-formed) and return its dataset.

    With ``teacher`` (a TeacherInfo) and ``resolution``, the pairs must also come from that teacher at that latent
    shape (see check_pairs_teacher).
    """
    folder = Path(path).expanduser()
    manifest = read_manifest(folder)
    if teacher is not None:
        check_pairs_teacher(folder, manifest, teacher, resolution)
    if manifest.num_samples <= 0:
        raise DistillError(f"{folder} holds no pairs (num_samples = {manifest.num_samples}). Regenerate it with "
                           "train_scripts/generate_pairs.py and --num_samples >= 1.")
    missing = [s for s in range(manifest.num_shards) if not shard_path(folder, s).is_file()]
    if missing:
        raise DistillError(f"{folder} is incomplete: {len(missing)} of {manifest.num_shards} shards are missing "
                           f"(first: {shard_path(folder, missing[0]).name}). Rerun train_scripts/generate_pairs.py "
                           "with the same arguments: it resumes and writes only the missing shards.")
    captions = [_check_shard(folder, manifest, s) for s in range(manifest.num_shards)]
    return PairDataset(folder, manifest, captions)


def _same_teacher(manifest: PairManifest, teacher, fingerprint: str) -> bool:
    """Whether the manifest's teacher is ``teacher``: by fingerprint when recorded, else by name or folder."""
    if manifest.teacher_fingerprint:
        return manifest.teacher_fingerprint == fingerprint
    if manifest.teacher == teacher.name:  # an older manifest: the same folder or Hub id as given
        return True
    recorded = Path(manifest.teacher).expanduser()
    if not (recorded / "unet").is_dir():
        return False  # a Hub id or a folder that is gone: nothing to compare the weights with
    try:
        return recorded.resolve() == Path(teacher.path).resolve() or teacher_fingerprint(recorded) == fingerprint
    except (OSError, ValueError, KeyError):
        return False


def check_pairs_teacher(folder: Path, manifest: PairManifest, teacher, resolution: int) -> None:
    """Refuse pairs that another teacher made, or that have another latent shape than this run trains at.

    Rectified Diffusion (Wang et al. 2024, Algorithm 4) retrains a teacher on its own couplings (eps, x0_hat): pairs
    of another model are another coupling, and latents of another shape do not fit the UNet at this resolution.
    Family and latent shape are compared strictly; the teacher by the UNet fingerprint pairs.json records (older
    manifests: by the name or folder given to generate_pairs.py).
    """
    from .families import family_label

    run_shape = list(latent_shape(teacher, resolution))
    fingerprint = teacher_fingerprint(teacher.path)
    family, run_family = family_label(manifest.family), teacher.family_spec.label
    problems = []
    if manifest.family != teacher.family:
        problems.append(f"family {family} vs {run_family}")
    if not _same_teacher(manifest, teacher, fingerprint):
        problems.append(f"UNet fingerprint {manifest.teacher_fingerprint[:12]} vs {fingerprint[:12]}"
                        if manifest.teacher_fingerprint else "another teacher named in pairs.json")
    if list(manifest.latent_shape) != run_shape:
        problems.append(f"latent shape {tuple(manifest.latent_shape)} vs {tuple(run_shape)}")
    if not problems:
        return
    name = teacher.name or teacher.path
    regenerate = (f"train_scripts/generate_pairs.py --pretrained_teacher_model {name} --resolution {resolution} "
                  "--output_dir <new folder>")
    fix = (f"Train at --resolution {manifest.resolution}, or generate pairs at this resolution: {regenerate}."
           if len(problems) == 1 and problems[0].startswith("latent shape") else
           f"Generate pairs with this teacher: {regenerate}, and pass that folder as --pairs_dir.")
    raise DistillError(f"The pairs in {folder} do not match this run's teacher and resolution ({'; '.join(problems)}): "
                       f"they were made by {manifest.teacher} ({family}, latents {tuple(manifest.latent_shape)} at "
                       f"{manifest.resolution}px), this run's teacher is {name} ({run_family}, latents "
                       f"{tuple(run_shape)} at {resolution}px). {fix}")


def latent_shape(info, resolution: int) -> tuple[int, int, int]:
    """(C, H/f, W/f) of the teacher's latents at ``resolution`` (f: the VAE's downsampling factor), from the configs."""
    from diffusers import AutoencoderKL

    channels = info.family_spec.network_config(info.path)["in_channels"]
    factor = 2 ** (len(AutoencoderKL.load_config(info.path, subfolder="vae")["block_out_channels"]) - 1)
    return (channels, resolution // factor, resolution // factor)


def collate_pairs(examples: list[dict]) -> dict:
    """Batch items: noise and latents [B, C, h, w] float, caption list[str]."""
    return {
        "noise": torch.stack([example["noise"] for example in examples]).float(),
        "latents": torch.stack([example["latents"] for example in examples]).float(),
        "caption": [example["caption"] for example in examples],
    }


# --------------------------------------------------------------------------------------------- generation
