"""A UNet seen as a denoiser: owns the one ``unet(...)`` call and absorbs the prediction type. Also the one place where
LoRA adapters are switched: ``using_adapter``, and ``AdapterView``, one adapter of a shared UNet as a network."""

from __future__ import annotations

import contextlib

import torch

from .conditioning import Cond
from .lora import switch_adapter
from .schedule import NoiseSchedule


class Denoiser:
    """(x_t, t, cond) -> (x0, eps) for any prediction type; ``as_teacher`` turns LoRA adapters off."""

    def __init__(self, unet: torch.nn.Module, schedule: NoiseSchedule):
        self.unet = unet  # possibly wrapped by accelerate (DDP/FSDP); called for the forward pass
        self.module = getattr(unet, "module", unet)  # the bare UNet (or AdapterView), for its dtype and adapters
        self.schedule = schedule

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.raw(x_t, t, cond)
        return self.schedule.to_x0_eps(output.float(), x_t.float(), t)

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The network's own output (eps, v, x0 or flow velocity, depending on the teacher)."""
        dtype = network_dtype(self.module)
        cond = cond.to(x_t.device, dtype)
        timestep = self.schedule.network_timestep(t.to(x_t.device))
        return self.unet(x_t.to(dtype), timestep=timestep, **cond.unet_kwargs(), return_dict=False)[0]

    @contextlib.contextmanager
    def as_teacher(self):
        """The frozen teacher: the same UNet with its LoRA adapters disabled (LCM-LoRA, Luo et al. 2023, sec. 3)."""
        with using_adapter(self.module, None):
            yield self


def network_dtype(net: torch.nn.Module) -> torch.dtype:
    """The dtype ``net`` computes in: that of its first floating-point weight (an ``AdapterView``: of its UNet's).

    What diffusers' ``ModelMixin.dtype`` returns for a network without layerwise-casting hooks, without its walk over
    every submodule looking for them, which costs milliseconds per call: a tenth of a small UNet's forward pass.
    """
    net = getattr(net, "module", net)
    net = net.unet if isinstance(net, AdapterView) else net
    return next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)


@contextlib.contextmanager
def using_adapter(net: torch.nn.Module, adapter: str | None):
    """Inside the block ``net`` runs with only LoRA ``adapter`` on (None: every adapter off, i.e. the teacher).

    ``net`` is a UNet (possibly DDP-wrapped) or an ``AdapterView``, which switches its UNet in its own forward. A UNet
    without adapters is the teacher already. requires_grad flags never change (see ``lora.switch_adapter``).
    """
    net = getattr(net, "module", net)
    view = isinstance(net, AdapterView)
    if view:
        previous, net.adapter = net.adapter, adapter
    else:
        previous = switch_adapter(net, adapter)
    try:
        yield net
    finally:
        if view:
            net.adapter = previous
        else:
            switch_adapter(net, previous)


class AdapterView(torch.nn.Module):
    """One LoRA adapter of a UNet that holds several, as a network of its own (a student and a fake score on one UNet).

    Its parameters are that adapter's weights alone, under the UNet's own names, so an optimizer, a DDP wrapper and a
    checkpoint each hold one adapter; its forward runs the whole UNet with only this adapter on (``adapter`` None:
    all off). Each view is its own DDP module: one forward with gradients and one backward per step each, as DDP needs.
    """

    def __init__(self, unet: torch.nn.Module, adapter: str):
        from peft.tuners.tuners_utils import BaseTunerLayer

        super().__init__()
        self.__dict__["unet"] = unet  # a plain attribute, not a submodule: the frozen weights stay out of parameters()
        self.adapter = adapter
        for path, layer in unet.named_modules():
            if isinstance(layer, BaseTunerLayer):
                for kind in layer.adapter_layer_names:
                    if adapter in getattr(layer, kind):
                        _register(self, f"{path}.{kind}.{adapter}", getattr(layer, kind)[adapter])
        if next(self.parameters(), None) is None:
            raise ValueError(f"The UNet has no LoRA adapter {adapter!r}.")

    @property
    def dtype(self) -> torch.dtype:
        return network_dtype(self.unet)

    def forward(self, *args, **kwargs):
        """The UNet's forward with only this adapter on."""
        with using_adapter(self.unet, self.adapter):
            output = self.unet(*args, **kwargs)
        if torch.is_grad_enabled() and getattr(self.unet, "is_gradient_checkpointing", False):
            if isinstance(output, tuple):
                return (_SwitchOnBackward.apply(output[0], self.unet, self.adapter), *output[1:])
            output.sample = _SwitchOnBackward.apply(output.sample, self.unet, self.adapter)
        return output

    def activated(self) -> torch.nn.Module:
        """The shared UNet, left with only this adapter on, for code that calls it directly (validation, export).

        A UNet in half precision (mixed-precision training) then runs as the networks accelerate prepared do: under
        autocast, with float32 outputs. accelerate prepares the views, not the UNet they share, and a stock SDXL
        pipeline fails on a half-precision UNet's latents with the float32 VAE the trainer keeps for SDXL.
        """
        switch_adapter(self.unet, self.adapter)
        return with_mixed_precision(self.unet)


def with_mixed_precision(unet: torch.nn.Module) -> torch.nn.Module:
    """``unet`` itself, made to run as accelerate's prepared networks do when its weights are in half precision: under
    autocast, with float32 outputs (for code that calls a bare UNet: validation and export)."""
    if unet.dtype in (torch.float16, torch.bfloat16) and "forward" not in unet.__dict__:
        unet.forward = _autocast_forward(unet)
    return unet


def _autocast_forward(unet: torch.nn.Module):
    """``unet.forward`` under autocast to the UNet's own dtype, with float32 outputs (accelerate's mixed precision)."""
    from accelerate.utils import convert_outputs_to_fp32

    forward = unet.forward

    def run(*args, **kwargs):
        with torch.autocast(unet.device.type, dtype=unet.dtype):
            return forward(*args, **kwargs)

    return convert_outputs_to_fp32(run)


def _register(root: torch.nn.Module, path: str, value: torch.nn.Module | torch.nn.Parameter) -> None:
    """Register ``value`` under the dotted ``path`` below ``root``, creating empty parent modules as needed."""
    *parents, name = path.split(".")
    for part in parents:
        if part not in root._modules:
            root.add_module(part, torch.nn.Module())
        root = root._modules[part]
    if isinstance(value, torch.nn.Parameter):
        root.register_parameter(name, value)
    else:
        root.add_module(name, value)


class _SwitchOnBackward(torch.autograd.Function):
    """Identity whose backward first turns the forward's adapter back on: with gradient checkpointing the UNet's blocks
    are recomputed during the backward pass, when another adapter may have run since (the trainer computes every
    loss before the first backward)."""

    @staticmethod
    def forward(ctx, sample: torch.Tensor, unet: torch.nn.Module, adapter: str | None) -> torch.Tensor:
        ctx.unet, ctx.adapter = unet, adapter
        return sample.view_as(sample)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        switch_adapter(ctx.unet, ctx.adapter)
        return grad, None, None
