"""Sharded training: every trainable network, and the frozen network it shares, split across processes with FSDP2.

The trainer applies torch's ``fully_shard`` (FSDP2; Zhao et al. 2023, "PyTorch FSDP") itself, with accelerate only
launching the processes: the same code then runs on GPUs and in the CPU tests (accelerate does not engage its FSDP
plugin on a CPU). A run asks for it with an accelerate config of ``distributed_type: FSDP`` and ``fsdp_version: 2``
(``docs/accelerate_configs/fsdp.yaml``); see ``docs/distributed.md``.

* Units: the family's blocks (a UNet's resnets and transformer blocks), every other ModuleList element (a UNet's down
  and up blocks) and every other direct child holding weights are each all-gathered on their own, so a network's root
  holds no weight, and code that calls a child directly (the discriminators' encoder half) finds its weights gathered.
* A UNet shared by several LoRA adapters (student, fake score, discriminator backbone) is sharded once.
* Checkpoints: trainable weights and optimizer states are written by every process with ``torch.distributed.checkpoint``
  (one file per process), which reshards on load: a checkpoint resumes with any process count.
* Validation and export read a full copy of the student gathered on the main process (collective), with the EMA's
  averages in place of its weights under --use_ema (the averages are sharded like the weights, and checkpointed).
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .denoiser import AdapterView
from .errors import DistillError

FSDP_ENV = "ACCELERATE_USE_FSDP"  # what `accelerate launch` exports for an FSDP config
SHARDED_STATE = "sharded_state"  # the folder of a checkpoint holding the sharded weights and optimizer states
FSDP_CONFIG = "docs/accelerate_configs/fsdp.yaml"


@dataclass(frozen=True)
class ShardingSettings:
    """The FSDP settings of the launch that the trainer applies (from accelerate's FSDP config)."""

    reshard_after_forward: bool = True  # free the gathered weights after each unit's forward (FULL_SHARD)
    unit_classes: tuple[str, ...] | None = None  # fsdp_transformer_layer_cls_to_wrap; None: the family's blocks


def _flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def requested_sharding() -> ShardingSettings | None:
    """The sharding an ``accelerate launch`` with an FSDP config asked for, or None; refuses what is not supported."""
    if _flag(FSDP_ENV, "false") != "true":
        return None
    if _flag("FSDP_VERSION", "1") != "2":
        raise DistillError(f"The accelerate config asks for FSDP version {os.environ.get('FSDP_VERSION', '1')}; the "
                           f"trainer shards with FSDP2: set fsdp_version: 2 (see {FSDP_CONFIG}).")
    if _flag("FSDP_OFFLOAD_PARAMS", "false") == "true":
        raise DistillError("fsdp_offload_params: true is not supported by the sharded trainer; set it to false (more "
                           "processes shard the weights further).")
    reshard = _flag("FSDP_RESHARD_AFTER_FORWARD", "true") not in ("false", "shard_grad_op", "2")
    classes = tuple(c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
    return ShardingSettings(reshard_after_forward=reshard, unit_classes=classes or None)


@contextlib.contextmanager
def accelerate_without_fsdp():
    """While the Accelerator is built, hide the FSDP config from accelerate: its processes start as plain data-parallel
    ones, as they do on a CPU, and the trainer shards the networks itself (one code path on GPUs and CPUs)."""
    saved = os.environ.get(FSDP_ENV)
    os.environ[FSDP_ENV] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(FSDP_ENV, None)
        else:
            os.environ[FSDP_ENV] = saved


def ensure_process_group(device: torch.device) -> None:
    """A one-process group where accelerate started none (a single process), for FSDP's device mesh."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)


def is_sharded_checkpoint(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was written by a sharded run (its weights in ``sharded_state/``)."""
    return (Path(checkpoint) / SHARDED_STATE).is_dir()


def damaged_shards(folder: Path) -> list[str]:
    """Files of a sharded state (``torch.distributed.checkpoint``) that cannot be read back: a metadata file that does
    not load, or shard files shorter than the extents the metadata records (a truncated write). Reads no tensor."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception:  # noqa: BLE001 - any failure to read the metadata back means it is damaged
        return [f"{folder.name}/.metadata"]
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    return [f"{folder.name}/{name}" for name, size in sorted(needed.items())
            if not (folder / name).is_file() or (folder / name).stat().st_size < size]


def _has_weights(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def shard_units(root: nn.Module, unit_classes: tuple[str, ...] = ()) -> list[nn.Module]:
    """The modules below ``root`` that are all-gathered one at a time, innermost first: every module of a class named
    in ``unit_classes`` (the family's blocks: a UNet's resnets and transformer blocks), every other element of a
    ModuleList (a UNet's down and up blocks hold what their blocks leave), and every other direct child of ``root``
    with weights. ``root`` then holds no weight of its own."""
    units: list[nn.Module] = []

    def visit(module: nn.Module, top: bool) -> None:
        for child in module.children():
            if type(child).__name__ in unit_classes:
                if _has_weights(child):
                    units.append(child)
                continue
            visit(child, False)
            if (top or isinstance(module, nn.ModuleList)) and not isinstance(child, nn.ModuleList) \
                    and _has_weights(child):
                units.append(child)

    visit(root, True)
    return units


def unit_parameters(root: nn.Module, unit_classes: tuple[str, ...] = ()) -> list[list[nn.Parameter]]:
    """The parameters each unit of ``root`` shards (a unit holds what its inner units leave), ``root``'s own last."""
    claimed: set[int] = set()
    groups = []
    for unit in [*shard_units(root, unit_classes), root]:
        own = [p for p in unit.parameters() if id(p) not in claimed]
        claimed.update(id(p) for p in own)
        groups.append(own)
    return groups


def shard_roots(nets: dict[str, nn.Module]) -> list[nn.Module]:
    """The distinct modules to shard: the UNet behind each ``AdapterView`` (once, however many views share it), every
    other network, and of a network that holds views (UFOGen's trained discriminator) its other children."""
    roots: list[nn.Module] = []

    def visit(net: nn.Module) -> None:
        if isinstance(net, AdapterView):
            visit(net.unet)
        elif any(isinstance(m, AdapterView) for m in net.modules()):
            for child in net.children():
                visit(child)
        elif _has_weights(net) and not any(net is root for root in roots):
            roots.append(net)

    for net in nets.values():
        visit(net)
    return roots


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (adapters, configs, flags) whose weights are on the meta device: the shape to gather into."""
    memo: dict[int, object] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                               for p in module.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in module.buffers()})
    return copy.deepcopy(module, memo)


class ShardedNetworks:
    """A method's networks sharded across the processes; maps its parameter lists to the sharded parameters, writes
    and reads sharded checkpoints, and gathers a full copy of a network for validation and export."""

    def __init__(self, nets: dict[str, nn.Module], settings: ShardingSettings, compute_dtype: torch.dtype | None,
                 unit_classes: tuple[str, ...] = ()):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.roots = shard_roots(nets)
        # One module over every root: the checkpoint's names, and what the optimizers' states are keyed by.
        self.container = nn.ModuleDict({f"network{i}": root for i, root in enumerate(self.roots)})
        self._names = {id(p): name for name, p in self.container.named_parameters()}
        self._skeletons = {id(root): meta_copy(root) for root in self.roots}
        # Mixed precision: weights gathered and computed in the compute dtype, gradients reduced in float32.
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype,
                                      reduce_dtype=torch.float32 if compute_dtype is not None else None)
        for root in self.roots:
            for unit in shard_units(root, unit_classes):
                fully_shard(unit, reshard_after_forward=settings.reshard_after_forward, mp_policy=policy)
            fully_shard(root, reshard_after_forward=settings.reshard_after_forward, mp_policy=policy)
            # The root must be the first to run; a direct call of one of its units would otherwise claim the role.
            fully_shard.state(root)._lazy_init()
        self._live = dict(self.container.named_parameters())

    def live(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """The sharded parameters that took the place of ``params`` (fully_shard registers new ones)."""
        missing = [p for p in params if id(p) not in self._names]
        if missing:
            raise RuntimeError(f"{len(missing)} trainable parameters lie outside the sharded networks.")
        sharded = [self._live[self._names[id(p)]] for p in params]
        from torch.distributed.tensor import DTensor

        if not all(isinstance(p, DTensor) for p in sharded):
            raise RuntimeError("Sharding was asked for, but some trainable parameters were left whole.")
        return sharded

    def _ema_shadows(self, ema) -> dict[str, torch.Tensor]:
        """The EMA's averages (sharded like the weights they track), keyed by those weights' names."""
        names = {id(p): name for name, p in self._live.items()}
        return {names[id(p)]: shadow for p, shadow in zip(ema.params, ema.average.shadow_params)}

    # ------------------------------------------------------------------------------------------- checkpoints
    def _state(self, optimizers: list[torch.optim.Optimizer], ema=None) -> dict:
        """{"model": trainable weights, "optim": optimizer states, "ema": averages and their step count}, keyed by
        parameter name, each process its shards."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.container, optimizers)
        trainable = {name for name, p in self.container.named_parameters() if p.requires_grad}
        state = {"model": {k: v for k, v in model.items() if k in trainable}, "optim": optim}
        if ema is not None:
            state["ema"] = {**self._ema_shadows(ema), "step": torch.tensor(ema.average.optimization_step)}
        return state

    def save(self, folder: Path, optimizers: list[torch.optim.Optimizer], ema=None) -> None:
        """Write the trainable weights, optimizer states and EMA to ``folder``; every process writes its shards."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(optimizers, ema), checkpoint_id=str(folder))

    def load(self, folder: Path, optimizers: list[torch.optim.Optimizer], ema=None) -> None:
        """Read what ``save`` wrote (by any number of processes) into this run's shards."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._state(optimizers, ema)
        dcp.load(state, checkpoint_id=str(folder))  # in place, the EMA's averages included
        set_state_dict(self.container, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=False))
        if ema is not None:
            ema.average.optimization_step = int(state["ema"]["step"])

    # ------------------------------------------------------------------------------------------- full copies
    def gathered(self, root: nn.Module, device: torch.device, ema=None) -> nn.Module | None:
        """Collective: a plain copy of the sharded ``root`` with its full weights on the main process (None on the
        others), with the adapters it had when sharded, and with ``ema``'s averages in place of the weights it
        tracks; for validation and export."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        prefix = next(f"{name}." for name, module in self.container.items() if module is root)
        for name, shadow in (self._ema_shadows(ema) if ema is not None else {}).items():
            if name.startswith(prefix):
                state[name.removeprefix(prefix)] = shadow.full_tensor().cpu()  # every process joins the gather
        if dist.get_rank() != 0:
            return None
        plain = copy.deepcopy(self._skeletons[id(root)]).to_empty(device=device)
        plain.load_state_dict(state)
        return plain.eval()


def check_sharding_flags(cfg, settings: ShardingSettings | None, resume_path: Path | None) -> None:
    """Flags the sharded trainer does not take, and a checkpoint written in the other layout, before any work."""
    if resume_path is not None and is_sharded_checkpoint(resume_path) != (settings is not None):
        written, now = ("sharded (FSDP)", "without sharding") if settings is None else ("without sharding", "sharded")
        raise DistillError(f"--resume_from_checkpoint {resume_path} was written {written}, and this run trains {now}: "
                           "resume it with the launch that wrote it (any process count).")
    if settings is None:
        return
    if cfg.mixed_precision == "fp16":
        raise DistillError("Sharded training (FSDP) takes --mixed_precision bf16 or no, not fp16 (its loss scaling "
                           "is not sharded).")
    if cfg.torch_compile:
        raise DistillError("--torch_compile is not supported with sharded training (FSDP) yet; drop one of them.")
