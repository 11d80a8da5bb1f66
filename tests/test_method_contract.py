"""The contract every registered method satisfies, checked on the tiny SD teacher (see docs/adding_a_method.md).

A method registered in distill/methods/__init__.py is picked up here with its default configuration: its losses name
its optimizer groups and reach only their own group, training never changes the teacher, a LoRA student starts as the
teacher, its SamplingSpec builds a scheduler, its model card renders, and ``python -m distill <name> --help`` works.
A toy method that updates its second group every other step trains through the real Trainer.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import subprocess_env
from distill.data import ImageDataConfig
from distill.denoiser import Denoiser
from distill.export import method_description, student_scheduler, write_model_card
from distill.lora import LoRASettings
from distill.methods import METHODS, LatentBatch, Method, SamplingSpec, Teacher
from distill.trainer import Trainer, TrainConfig, stepped_groups
from distill.testing import TINY_RESOLUTION, method_on_teacher

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a handwritten digit seven", "a red square"]
# Every registered method with its defaults, plus variants that train more networks than the default does.
CASES = [(name, {}) for name in METHODS] + [("pcm", {"adv_weight": 0.1}), ("dmd2", {"gen_cls_loss_weight": 0.0}),
                                               ("dmd2", {"gen_cls_loss_weight": 0.0, "regression_loss_weight": 1.0})]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in overrides.items()) for name, overrides in CASES]
# The same contract on the flow-matching transformer teachers (SD3, FLUX.1-dev): every method with its defaults, and
# the variants that add a discriminator on the transformer's tokens (DMD2's GAN term is off there by default).
FLOW_CASES = [(name, {}) for name in METHODS] + [("pcm", {"adv_weight": 0.1}), ("dmd2", {"gen_cls_loss_weight": 5e-3})]
FAMILY_CASES = [("sd", *case) for case in CASES] + [(family, *case) for family in ("sd3", "flux")
                                                     for case in FLOW_CASES]
FAMILY_CASE_IDS = [f"{family}-{name}" + "".join(f"-{k}={v}" for k, v in overrides.items())
                   for family, name, overrides in FAMILY_CASES]


def build(teacher_folder: Path, name: str, overrides: dict):
    """(method, loaded teacher), built as Trainer._build_method builds it."""
    cls = METHODS[name]
    return method_on_teacher(cls, cls.Config(**overrides), teacher_folder, resolution=TINY_RESOLUTION)


def make_batch(method: Method, loaded, seed: int = 0) -> LatentBatch:
    """A batch of what the method's data kind provides: latents (images, pairs), coupled noise (pairs), prompts."""
    generator = torch.Generator().manual_seed(seed)
    kind = type(method).data_kind_for(method.config)
    shape = (len(PROMPTS), *loaded.latent_shape)
    latents = torch.randn(shape, generator=generator) if kind in ("images", "pairs") else None
    noise = torch.randn(shape, generator=generator) if kind == "pairs" else None
    return LatentBatch(latents, loaded.conditioner.encode(PROMPTS), loaded.conditioner.unconditional(len(PROMPTS)),
                       noise)


def fixed_input(loaded, seed: int = 1):
    """(x_t, t, cond): one input on which teacher and student predictions are compared."""
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn((len(PROMPTS), *loaded.latent_shape), generator=generator)
    return x_t, torch.tensor([999, 500]), loaded.conditioner.encode(PROMPTS)


@torch.no_grad()
def teacher_prediction(method: Method, loaded) -> torch.Tensor:
    """The x0 of the teacher the method distils from: its network with the adapters off."""
    with method.denoiser().as_teacher() as teacher:
        return teacher(*fixed_input(loaded))[0]


@torch.no_grad()
def student_prediction(method: Method, loaded) -> torch.Tensor:
    """The x0 of the network the method validates and exports."""
    return Denoiser(method.student_unet(), method.teacher.schedule)(*fixed_input(loaded))[0]


def losses_at(method: Method, batch: LatentBatch, step: int) -> dict[str, torch.Tensor]:
    """The method's losses at ``step``, with the RNG seeded from the step (the same draws on every call)."""
    torch.manual_seed(step)
    return method.loss(batch, step)


def parametrize_cases(test):
    return pytest.mark.parametrize("name, overrides", CASES, ids=CASE_IDS)(test)


def parametrize_family_cases(test):
    return pytest.mark.parametrize("family, name, overrides", FAMILY_CASES, ids=FAMILY_CASE_IDS)(test)


# ------------------------------------------------------------------------------------------ training contract


@parametrize_family_cases
def test_losses_name_disjoint_groups_that_hold_every_trainable_parameter(request, family, name, overrides):
    method, loaded = build(request.getfixturevalue(f"{family}_teacher"), name, overrides)
    groups = method.trainable()
    assert groups and all(groups.values()), {k: len(v) for k, v in groups.items()}
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)), "a parameter is in two optimizer groups"
    requiring = {id(p) for net in method.nets.values() for p in net.parameters() if p.requires_grad}
    assert requiring == set(ids), "every parameter with requires_grad belongs to exactly one group"
    batch = make_batch(method, loaded)
    for step in (0, 1):
        losses = losses_at(method, batch, step)
        assert losses and set(losses) <= set(groups), (step, sorted(losses), sorted(groups))
        assert all(loss.dim() == 0 and torch.isfinite(loss) for loss in losses.values())


@parametrize_family_cases
def test_each_loss_reaches_only_its_own_group(request, family, name, overrides):
    method, loaded = build(request.getfixturevalue(f"{family}_teacher"), name, overrides)
    groups = method.trainable()
    everything = [p for net in method.nets.values() for p in net.parameters()]
    batch = make_batch(method, loaded)
    for step in (0, 1):
        for loss_name in losses_at(method, batch, step):
            for p in everything:
                p.grad = None
            losses_at(method, batch, step)[loss_name].backward()  # this loss alone, on a fresh graph
            reached = {group: any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
                       for group, params in groups.items()}
            assert reached == {group: group == loss_name for group in groups}, (step, loss_name, reached)
            assert all(p.grad is None for p in everything if not p.requires_grad)


@parametrize_family_cases
def test_training_changes_the_student_and_never_the_teacher(request, family, name, overrides):
    method, loaded = build(request.getfixturevalue(f"{family}_teacher"), name, overrides)
    groups = method.trainable()
    frozen = {n: p.detach().clone() for n, p in loaded.network.named_parameters() if not p.requires_grad}
    trained = {group: [p.detach().clone() for p in params] for group, params in groups.items()}
    before = teacher_prediction(method, loaded)
    optimizers = {group: torch.optim.AdamW(params, lr=1e-3) for group, params in groups.items()}
    batch, stepped = make_batch(method, loaded), set()
    for step in range(2):  # as Trainer._train_micro_batch: each returned loss, then its optimizer, in group order
        losses = losses_at(method, batch, step)
        for group in stepped_groups(groups, losses):
            losses[group].backward()
            optimizers[group].step()
            optimizers[group].zero_grad(set_to_none=True)
            stepped.add(group)
        method.on_step_end(step)
    torch.testing.assert_close(teacher_prediction(method, loaded), before, rtol=0, atol=0)
    assert all(torch.equal(p, frozen[n]) for n, p in loaded.network.named_parameters() if n in frozen)
    for group in stepped:
        assert any(not torch.equal(p, old) for p, old in zip(groups[group], trained[group])), group


@parametrize_family_cases
def test_a_lora_student_starts_as_the_teacher(request, family, name, overrides):
    method, loaded = build(request.getfixturevalue(f"{family}_teacher"), name, overrides)
    assert not getattr(method.config, "full_finetune", False)  # every method's default student is a LoRA
    student, teacher = student_prediction(method, loaded), teacher_prediction(method, loaded)
    assert student.abs().sum() > 0
    torch.testing.assert_close(student, teacher)


# ------------------------------------------------------------------------------------------ export contract


@parametrize_family_cases
def test_sampling_spec_builds_a_scheduler_for_its_steps(request, family, name, overrides):
    method, loaded = build(request.getfixturevalue(f"{family}_teacher"), name, overrides)
    spec = method.sampling()  # export_defaults, or its counterpart on a flow-matching teacher
    assert isinstance(spec, SamplingSpec)
    assert spec.num_inference_steps >= 1 and spec.guidance_scale >= 1.0
    scheduler = student_scheduler(loaded.scheduler_config, spec)
    assert type(scheduler).__name__ == spec.scheduler
    assert all(scheduler.config[k] == v for k, v in spec.scheduler_config.items())
    scheduler.set_timesteps(spec.num_inference_steps)
    assert len(scheduler.timesteps) == spec.num_inference_steps
    assert json.loads(json.dumps(dataclasses.asdict(spec))) == dataclasses.asdict(spec)  # what export records
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_inference_steps = 2


@parametrize_cases
def test_model_card_renders_the_method_and_its_sampling(sd_teacher, name, overrides, tmp_path):
    method, loaded = build(sd_teacher, name, overrides)
    spec = method.export_defaults()
    hyper = {k: v for k, v in dataclasses.asdict(method.config).items() if not isinstance(v, list)}
    path = write_model_card(tmp_path, name, loaded.info, "org/teacher", spec, hyper,
                            description=method_description(type(method)))
    text = path.read_text()
    assert f"# {name.upper()} student of org/teacher" in text and name in ModelCard.load(path).data.tags
    assert spec.scheduler in text and "{{" not in text
    assert f"num_inference_steps={spec.num_inference_steps}, guidance_scale={spec.guidance_scale}" in text


@pytest.mark.parametrize("name", list(METHODS))
def test_python_m_distill_help_lists_every_flag_of_the_method(name):
    result = subprocess.run([sys.executable, "-m", "distill", name, "--help"], capture_output=True, text=True,
                            timeout=180, env=subprocess_env(COLUMNS="200"), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"usage: python -m distill {name} ")
    for f in dataclasses.fields(METHODS[name].Config):
        assert re.search(rf"--(no_)?{f.name}\b", result.stdout), f.name


def test_python_m_distill_without_a_method_lists_the_methods(capsys):
    from distill.__main__ import run

    assert run([]) == 2 and run(["no-such-method"]) == 2
    err = capsys.readouterr().err
    assert "error: no method given" in err and "error: unknown method 'no-such-method'" in err
    assert all(f"methods: {', '.join(METHODS)}" in part for part in err.split("usage:")[1:])
    assert run(["--help"]) == 0 and "python -m distill <method> --help" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ losses at two rates


@dataclass
class TwoRateConfig(LoRASettings):
    """A LoRA student and a small head, the head updated every ``head_every`` steps."""

    head_every: int = field(default=2, metadata={"help": "Update the head on every head_every-th step."})


class TwoRateToy(Method):
    """A toy: a LoRA student regresses the clean latents; a linear head is fitted only on every other step."""

    name = "two-rate-toy"
    Config = TwoRateConfig

    def __init__(self, teacher: Teacher, config: TwoRateConfig):
        super().__init__(teacher, config)
        self.lora_params = config.attach_lora(teacher.unet, teacher.lora_targets)
        self.nets["unet"] = teacher.unet
        self.nets["head"] = torch.nn.Linear(teacher.latent_shape[0], 1)
        self.head_params = list(self.nets["head"].parameters())
        self.head_after_step = {-1: [p.detach().clone() for p in self.head_params]}

    def trainable(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"unet": self.lora_params, "head": self.head_params}

    def loss(self, batch: LatentBatch, step: int) -> dict[str, torch.Tensor]:
        latents = batch.latents
        # 1. Noise the latents at a random t; 2. the student's x0 against the clean latents.
        t = torch.randint(0, self.teacher.schedule.num_train_timesteps, (latents.shape[0],))
        x0, _ = self.denoiser()(self.teacher.schedule.add_noise(latents, torch.randn_like(latents), t), t, batch.cond)
        losses = {"unet": (x0 - latents.float()).pow(2).mean()}
        # 3. The head's loss, only on the steps it is updated.
        if step % self.config.head_every == self.config.head_every - 1:
            losses["head"] = (self.nets["head"](latents.float().mean(dim=(2, 3))) - 1).pow(2).mean()
        return losses

    def on_step_end(self, step: int) -> None:
        self.head_after_step[step] = [p.detach().clone() for p in self.head_params]

    def export_defaults(self) -> SamplingSpec:
        return SamplingSpec("DDIMScheduler", num_inference_steps=2,
                            scheduler_config={"timestep_spacing": "trailing", "set_alpha_to_one": True})


def test_stepped_groups_keep_the_trainable_order_and_refuse_unknown_losses():
    groups = {"unet": [], "fake_score": [], "discriminator": []}
    assert stepped_groups(groups, {"discriminator": 1, "unet": 2}) == ["unet", "discriminator"]
    with pytest.raises(KeyError, match="trainable"):
        stepped_groups(groups, {"generator": 1})
    with pytest.raises(KeyError, match="at least one"):
        stepped_groups(groups, {})


def test_trainer_steps_a_group_only_on_the_steps_that_return_its_loss(sd_teacher, image_folder, tmp_path,
                                                                       monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setitem(METHODS, TwoRateToy.name, TwoRateToy)
    config = TrainConfig(pretrained_teacher_model=str(sd_teacher), output_dir=str(tmp_path / "run"), seed=0,
                         train_batch_size=2, max_train_steps=4, checkpointing_steps=100, export_pipeline=False,
                         learning_rate=1e-2)
    trainer = Trainer(TwoRateToy.name, TwoRateConfig(lora_rank=4), ImageDataConfig(train_data_dir=str(image_folder)),
                      config)
    out = trainer.run()
    after = trainer.method.head_after_step
    changed = [not all(torch.equal(a, b) for a, b in zip(after[step], after[step - 1])) for step in range(4)]
    assert changed == [False, True, False, True]
    # The schedules in trainable() order (unet, head), from the final checkpoint: both follow the optimizer step count
    # (as DMD2's reference steps its generator's schedule on the steps the generator skips), and the head's optimizer
    # stepped only twice (its Adam step count), so the skipped steps left its weights and moments alone.
    schedules = [torch.load(out / "checkpoint-4" / f, weights_only=False) for f in ("scheduler.bin", "scheduler_1.bin")]
    assert [s["last_epoch"] for s in schedules] == [4, 4]
    head_state = torch.load(out / "checkpoint-4" / "optimizer_1.bin", weights_only=False)["state"]
    assert {int(state["step"]) for state in head_state.values()} == {2}
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent)).Reload()
    assert [e.step for e in events.Scalars("loss/unet")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("loss/head")] == [2, 4]  # logged only when returned
    card = (out / "README.md").read_text()  # no model_cards/two-rate-toy.md: the generic card, with the docstring
    assert f"About the method: {TwoRateToy.__doc__}" in card and "num_inference_steps=2, guidance_scale=1.0" in card
    recorded = json.loads((out / "distill_config.json").read_text())
    assert recorded["method"] == TwoRateToy.name
    assert recorded["sampling"] == {"scheduler": "DDIMScheduler", "num_inference_steps": 2, "guidance_scale": 1.0}
