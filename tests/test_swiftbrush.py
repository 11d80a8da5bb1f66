"""SwiftBrush (variational score distillation): the method's math with real tiny teachers and peft LoRA, then
train_scripts/swiftbrush.py run as a user runs it, with its exports loaded back in fresh processes.

The oracles: the surrogate loss's gradient w.r.t. the student's sample is the VSD gradient computed directly from
the two scores; each loss is recomputed by hand from Algorithm 1 with the same random draws; the exported one-step
scheduler turns the student's UNet output into exactly the generator's x0; the exported pipelines decode exactly the
x0 of the training generator for the same noise; a resumed run, and a 2-process DDP run, end with both adapters of the
shared UNet bit for bit where the uninterrupted 1-process run ends.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file

from conftest import subprocess_env
from distill.conditioning import TextConditioner
from distill.teacher import inspect_teacher, pipeline_class
from distill.denoiser import Denoiser
from distill.errors import DistillError
from distill.export import student_scheduler
from distill.methods import LatentBatch, SwiftBrush, SwiftBrushConfig
from distill.schedule import NoiseSchedule
from distill.score_distillation import one_step_x0, score_distillation_surrogate
from distill.testing import method_on_teacher

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "swiftbrush.py"
LATENT_SHAPE = (4, 16, 16)  # the tiny teachers: 32 px, VAE downsampling 2
PROMPTS = ["a handwritten digit seven", "a red square", "a blue circle on a table"]
PROMPT = "a handwritten digit seven"
NOISE_SEED = 3
PIPELINE_CLASSES = {"sd": "FewStepStableDiffusionPipeline", "sdxl": "FewStepStableDiffusionXLPipeline"}
FLAGS = ["--train_batch_size", "2", "--lora_rank", "4", "--fake_lora_rank", "4", "--seed", "0", "--validation_steps",
         "0", "--report_to", "none", "--checkpointing_steps", "2", "--learning_rate", "1e-3"]


def make_method(folder, prediction_type: str | None = None, **config) -> tuple[SwiftBrush, TextConditioner]:
    config = SwiftBrushConfig(**{"lora_rank": 4, "fake_lora_rank": 4, **config})
    method, teacher = method_on_teacher(SwiftBrush, config, folder, prediction_type=prediction_type)
    return method, teacher.conditioner


def make_batch(conditioner: TextConditioner) -> LatentBatch:
    prompts = PROMPTS[:2]
    return LatentBatch(None, conditioner.encode(prompts), conditioner.unconditional(len(prompts)))


def perturb(params: list[torch.nn.Parameter], seed: int, std: float = 0.02) -> None:
    """Move a LoRA off zero (its B matrices start at zero), so the network differs from the teacher."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator) * std)


def guided_eps_by_hand(denoiser: Denoiser, x_t, t, batch: LatentBatch, w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard-form CFG of eps (and x0) from two separate UNet calls: u + w (c - u)."""
    x0_c, eps_c = denoiser(x_t, t, batch.cond)
    x0_u, eps_u = denoiser(x_t, t, batch.uncond)
    return x0_u + w * (x0_c - x0_u), eps_u + w * (eps_c - eps_u)


def vsd_gradient_by_hand(method: SwiftBrush, x0, x_t, t, batch: LatentBatch) -> torch.Tensor:
    """omega(t) (eps_real - eps_fake), written out: SwiftBrush's sigma_t^2, or DMD2's x0-space form."""
    with torch.no_grad():
        fake = method.denoiser("fake_score")
        with fake.as_teacher() as real:
            x0_real, eps_real = guided_eps_by_hand(real, x_t, t, batch, method.config.guidance_scale)
        x0_fake, eps_fake = fake(x_t, t, batch.cond)
    schedule = method.teacher.schedule
    if method.config.weighting == "swiftbrush":
        return schedule.sigmas[t].view(-1, 1, 1, 1) ** 2 * (eps_real - eps_fake)
    p_real, p_fake = x0 - x0_real, x0 - x0_fake
    return (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)


# ------------------------------------------------------------------------------------------ the method's math


def test_surrogate_gradient_is_its_target_gradient():
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    gradient = torch.randn(2, 4, 8, 8)
    loss = score_distillation_surrogate(x0, gradient)
    loss.backward()
    torch.testing.assert_close(x0.grad * x0.numel(), gradient)
    torch.testing.assert_close(loss, 0.5 * gradient.pow(2).mean())


@pytest.mark.parametrize("weighting", ["swiftbrush", "dmd"])
def test_student_loss_gradient_wrt_sample_is_the_vsd_gradient(sd_teacher, weighting):
    method, conditioner = make_method(sd_teacher, weighting=weighting, guidance_scale=3.0)
    perturb(method.trainable()["fake_score"], seed=1)  # a fake score that is not the teacher
    batch = make_batch(conditioner)
    torch.manual_seed(5)
    x0 = torch.randn(2, *LATENT_SHAPE).requires_grad_(True)  # stands in for the student's sample
    torch.manual_seed(11)
    method.student_loss(x0, batch).backward()

    torch.manual_seed(11)
    t = torch.randint(20, 981, (2,))
    x_t = method.teacher.schedule.alphas[t].view(-1, 1, 1, 1) * x0.detach() + \
        method.teacher.schedule.sigmas[t].view(-1, 1, 1, 1) * torch.randn_like(x0)
    expected = vsd_gradient_by_hand(method, x0.detach(), x_t, t, batch)
    assert expected.abs().max() > 1e-4
    # Equal up to float rounding (the method batches the conditional and unconditional passes; this does not).
    torch.testing.assert_close(x0.grad * x0.numel(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_student_and_fake_score_start_as_the_teacher(teacher):
    """theta <- psi, phi <- psi: without guidance the two scores agree, so the VSD gradient is zero at the start."""
    method, conditioner = make_method(teacher, guidance_scale=1.0)
    batch = make_batch(conditioner)
    torch.manual_seed(0)
    z = torch.randn(2, *LATENT_SHAPE)
    with torch.no_grad():
        x0 = method.generate(z, batch.cond)
        with method.denoiser().as_teacher() as frozen:
            teacher_x0 = one_step_x0(frozen, z, batch.cond)
        t = torch.tensor([500, 900])
        x_t = method.teacher.schedule.add_noise(x0, torch.randn_like(x0), t)
        gradient = method.vsd_gradient(x0, x_t, t, batch)
    torch.testing.assert_close(x0, teacher_x0)
    assert gradient.abs().max() < 1e-5


def test_losses_recomputed_by_hand(sd_teacher):
    method, conditioner = make_method(sd_teacher, guidance_scale=4.5)
    perturb(method.trainable()["unet"], seed=2)
    perturb(method.trainable()["fake_score"], seed=3)
    batch = make_batch(conditioner)
    torch.manual_seed(7)
    losses = method.loss(batch, 0)
    assert list(losses) == ["unet", "fake_score"]  # student first, then the fake score (Algorithm 1)

    schedule = method.teacher.schedule
    torch.manual_seed(7)
    z = torch.randn(2, *LATENT_SHAPE)  # 4. z ~ N(0, I)
    t_last = torch.full((2,), 999)
    with torch.no_grad():
        eps_student = method.nets["unet"](z, t_last, encoder_hidden_states=batch.cond.prompt_embeds).sample
        x0 = (z - schedule.sigmas[999] * eps_student) / schedule.alphas[999]  # 6. x0 = f_theta(z, y)
        t = torch.randint(20, 981, (2,))  # 7. t ~ U[0.02T, 0.98T]
        x_t = schedule.add_noise(x0, torch.randn_like(x0), t)  # 8-9.
        gradient = vsd_gradient_by_hand(method, x0, x_t, t, batch)  # 10.
        t_fake = torch.randint(0, 1000, (2,))  # 11. t' ~ U[0, T]
        eps = torch.randn_like(x0)  # 12.
        x_fake = schedule.add_noise(x0, eps, t_fake)  # 13.
        eps_fake = method.nets["fake_score"](x_fake, t_fake, encoder_hidden_states=batch.cond.prompt_embeds).sample
    torch.testing.assert_close(losses["unet"].detach(), 0.5 * gradient.pow(2).mean(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(losses["fake_score"].detach(), (eps_fake - eps).pow(2).mean())  # 14.


@pytest.mark.parametrize("full_finetune", [False, True])
def test_each_loss_reaches_only_its_own_parameters(teacher, full_finetune):
    method, conditioner = make_method(teacher, full_finetune=full_finetune)
    groups = method.trainable()
    student, fake = method.nets["unet"], method.nets["fake_score"]
    assert student is not fake
    student_ids, fake_ids = {id(p) for p in groups["unet"]}, {id(p) for p in groups["fake_score"]}
    assert student_ids and fake_ids and not student_ids & fake_ids
    assert {id(p) for p in student.parameters() if p.requires_grad} == student_ids
    assert {id(p) for p in fake.parameters() if p.requires_grad} == fake_ids
    # A LoRA student and its fake score are two adapters of the teacher's one UNet; a full student's fake score
    # is a LoRA on a copy of the teacher.
    assert (fake.unet is method.teacher.unet) is not full_finetune

    losses = method.loss(make_batch(conditioner), 0)
    everything = list({id(p): p for p in [*method.teacher.unet.parameters(), *fake.unet.parameters()]}.values())
    for name, loss in losses.items():
        loss.backward()
        reached = {id(p) for p in everything if p.grad is not None and p.grad.abs().sum() > 0}
        assert reached and reached <= {id(p) for p in groups[name]}, name
        assert all(p.grad is None for p in everything if id(p) not in {id(q) for q in groups[name]}), name
        for p in everything:
            p.grad = None


def test_alternating_updates_train_both_and_leave_the_teacher_unchanged(sd_teacher):
    method, conditioner = make_method(sd_teacher)
    batch = make_batch(conditioner)
    probe_z = torch.randn(2, *LATENT_SHAPE)
    probe_t = torch.tensor([300, 700])

    def snapshot():
        with torch.no_grad():
            with method.denoiser("fake_score").as_teacher() as real:
                real_eps = real(probe_z, probe_t, batch.cond)[1]
            with method.denoiser().as_teacher() as frozen:
                frozen_eps = frozen(probe_z, probe_t, batch.cond)[1]
            return real_eps, frozen_eps, method.generate(probe_z, batch.cond), \
                method.denoiser("fake_score")(probe_z, probe_t, batch.cond)[1]

    before = snapshot()
    optimizers = {name: torch.optim.AdamW(params, lr=1e-2) for name, params in method.trainable().items()}
    for step in range(2):
        for name, loss in method.loss(batch, step).items():  # as the trainer does: in dict order
            assert torch.isfinite(loss) and loss.item() >= 0
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
    after = snapshot()
    torch.testing.assert_close(after[0], before[0])  # the real score is the teacher, still
    torch.testing.assert_close(after[1], before[1])  # so is the student's UNet with its LoRA off
    assert (after[2] - before[2]).abs().max() > 1e-4  # the student moved
    assert (after[3] - before[3]).abs().max() > 1e-4  # the fake score moved


def test_full_finetune_trains_every_student_weight_against_a_frozen_real_score(sd_teacher):
    method, conditioner = make_method(sd_teacher, full_finetune=True)
    student = method.nets["unet"]
    assert not getattr(student, "peft_config", None)
    assert method.trainable()["unet"] == list(student.parameters())
    batch = make_batch(conditioner)
    probe_z, probe_t = torch.randn(2, *LATENT_SHAPE), torch.tensor([400, 800])
    with torch.no_grad(), method.denoiser("fake_score").as_teacher() as real:
        real_before = real(probe_z, probe_t, batch.cond)[1]
        student_before = method.generate(probe_z, batch.cond)

    optimizer = torch.optim.AdamW(method.trainable()["unet"], lr=1e-3)
    method.loss(batch, 0)["unet"].backward()
    optimizer.step()
    with torch.no_grad(), method.denoiser("fake_score").as_teacher() as real:
        torch.testing.assert_close(real(probe_z, probe_t, batch.cond)[1], real_before)
        assert (method.generate(probe_z, batch.cond) - student_before).abs().max() > 1e-4


def test_fake_score_learning_rate(sd_teacher):
    lora, _ = make_method(sd_teacher)
    assert lora.learning_rate_for("unet", 1e-4) == 1e-4
    assert lora.learning_rate_for("fake_score", 1e-4) == pytest.approx(1e-3)
    full, _ = make_method(sd_teacher, full_finetune=True)
    assert full.learning_rate_for("fake_score", 1e-6) == pytest.approx(1e-3)
    chosen, _ = make_method(sd_teacher, fake_score_lr_ratio=50.0)
    assert chosen.learning_rate_for("fake_score", 1e-4) == pytest.approx(5e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_step_scheduler_returns_the_generators_x0(sd_teacher, prediction_type):
    """The exported stock scheduler, one step from pure noise at t = T - 1, lands exactly on the student's x0."""
    method, conditioner = make_method(sd_teacher, prediction_type=prediction_type)
    perturb(method.trainable()["unet"], seed=4)
    config = dict(DDPMScheduler.load_config(sd_teacher, subfolder="scheduler"), prediction_type=prediction_type)
    scheduler = student_scheduler(config, method.export_defaults())
    scheduler.set_timesteps(method.export_defaults().num_inference_steps)
    assert scheduler.timesteps.tolist() == [999]
    cond = conditioner.encode([PROMPT])
    z = torch.randn(1, *LATENT_SHAPE) * scheduler.init_noise_sigma
    with torch.no_grad():
        output = method.denoiser().raw(z, scheduler.timesteps, cond)
        expected = method.generate(z, cond)
    stepped = scheduler.step(output, scheduler.timesteps[0], z).prev_sample
    torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-5)


def test_bad_method_config():
    for kwargs, phrase in [({"guidance_scale": 0.5}, "guidance_scale"),
                           ({"min_timestep_ratio": 0.9, "max_timestep_ratio": 0.1}, "min_timestep_ratio"),
                           ({"weighting": "snr"}, "weighting"),
                           ({"fake_lora_rank": 0}, "fake_lora_rank"),
                           ({"fake_score_lr_ratio": -1.0}, "fake_score_lr_ratio")]:
        with pytest.raises(DistillError, match=phrase):
            SwiftBrushConfig(**kwargs)


# ------------------------------------------------------------------------------------------ the command line


def train(teacher: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(SCRIPT), "--pretrained_teacher_model", str(teacher), "--output_dir", str(out),
            *FLAGS, *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=REPO)


def tail(result: subprocess.CompletedProcess, lines: int = 30) -> str:
    return "\n".join(result.stderr.replace("\r", "\n").splitlines()[-lines:])


LOAD_BOTH_WAYS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np, torch
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel

    teacher, out, family, prompt, seed, dest = sys.argv[1:7]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(int(seed)))

    def sample(pipe, **kwargs):
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt, height=32, width=32, latents=latents.clone(), output_type="np", **kwargs).images

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    stock = cls.from_pretrained(teacher)
    stock.scheduler = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    if (Path(out) / "unet").is_dir():  # a fully fine-tuned student
        stock.unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    else:
        stock.load_lora_weights(out)
    images = {"stock": sample(stock, num_inference_steps=1, guidance_scale=1.0)}
    folder = DiffusionPipeline.from_pretrained(out + "/pipeline", trust_remote_code=True)
    images["folder"] = sample(folder)  # the folder's own defaults: 1 step, guidance 1
    np.savez(dest + "/images.npz", **images)
    print(json.dumps({
        "class": type(folder).__name__,
        "scheduler": type(folder.scheduler).__name__,
        "default_num_inference_steps": folder.config.default_num_inference_steps,
        "default_guidance_scale": folder.config.default_guidance_scale,
        "distill_imported": sorted(m for m in sys.modules if m == "distill" or m.startswith("distill.")),
    }))
""")


@dataclass
class Run:
    family: str
    teacher: Path
    out: Path
    train: subprocess.CompletedProcess
    load: subprocess.CompletedProcess | None
    cwd: Path


def train_and_load(family: str, teacher: Path, root: Path, prompts_file: Path, *extra: str) -> Run:
    out = root / "out"
    result = train(teacher, out, "--prompts_file", str(prompts_file), "--max_train_steps", "3", *extra)
    load = None
    if result.returncode == 0:
        load = subprocess.run([sys.executable, "-c", LOAD_BOTH_WAYS, str(teacher), str(out), family, PROMPT,
                               str(NOISE_SEED), str(root)], capture_output=True, text=True, timeout=600,
                              env=subprocess_env(HF_MODULES_CACHE=str(root / "hf_modules")), cwd=root)
    return Run(family, teacher, out, result, load, root)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def lora_run(request, tmp_path_factory, prompts_file) -> Run:
    teacher = request.getfixturevalue(f"{request.param}_teacher")
    return train_and_load(request.param, teacher, tmp_path_factory.mktemp(f"swiftbrush-{request.param}"),
                          prompts_file)


def one_step_image(pipe, info) -> np.ndarray:
    """The training code path (distill's one-step generator on ``pipe.unet``), decoded by the teacher's VAE."""
    schedule = NoiseSchedule.from_scheduler_config(pipe.scheduler.config)
    cond = TextConditioner(info, 32).encode([PROMPT])
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(NOISE_SEED))
    with torch.no_grad():
        x0 = one_step_x0(Denoiser(pipe.unet, schedule), z, cond)
        image = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def generator_images(teacher: Path, out: Path, student: bool = True) -> np.ndarray:
    """One-step image of the exported student (LoRA or full UNet), or of the teacher itself."""
    info = inspect_teacher(str(teacher))
    pipe = pipeline_class(info).from_pretrained(teacher)
    if student and (out / "unet").is_dir():
        pipe.unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    elif student:
        pipe.load_lora_weights(out)
    return one_step_image(pipe, info)


def test_cli_trains_from_prompts_and_exports_a_one_step_lora(lora_run):
    assert lora_run.train.returncode == 0, tail(lora_run.train)
    out = lora_run.out
    checkpoint = out / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == [
        "fake_score_trainable.safetensors", "unet_trainable.safetensors"]
    student = load_file(checkpoint.parent / "checkpoint-3" / "unet_trainable.safetensors")
    fake = load_file(checkpoint.parent / "checkpoint-3" / "fake_score_trainable.safetensors")
    assert student and fake and all("lora_" in k for k in [*student, *fake])
    # Each file holds one adapter of the shared UNet, under the UNet's own (peft) names.
    assert all(".default." in k for k in student) and all(".fake_score." in k for k in fake)
    assert {k.replace(".fake_score.", ".default.") for k in fake} == set(student)
    # The exported LoRA is the student's, not the fake score's.
    exported = load_file(out / "pytorch_lora_weights.safetensors")
    assert len(exported) == len(student)
    renamed = {k[len("unet."):].replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in exported.items()}
    assert all(torch.equal(renamed[k], student[k]) for k in student)
    assert any(not torch.equal(renamed[k.replace(".fake_score.", ".default.")], fake[k]) for k in fake if "lora_B" in k)
    sampling = json.loads((out / "distill_config.json").read_text())["sampling"]
    assert sampling == {"scheduler": "DDIMScheduler", "num_inference_steps": 1, "guidance_scale": 1.0}
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["timestep_spacing"] == "trailing" and scheduler["set_alpha_to_one"] is True
    assert scheduler["clip_sample"] is False
    card = (out / "README.md").read_text()
    assert "SWIFTBRUSH" in card and "DDIMScheduler" in card and "num_inference_steps=1" in card
    assert "| guidance_scale | 4.5 |" in card


def test_both_exports_sample_the_training_generator_in_one_step(lora_run):
    assert lora_run.train.returncode == 0, tail(lora_run.train)
    assert lora_run.load.returncode == 0, tail(lora_run.load)
    report = json.loads(lora_run.load.stdout.strip().splitlines()[-1])
    assert report["class"] == PIPELINE_CLASSES[lora_run.family]
    assert report["scheduler"] == "DDIMScheduler" and report["distill_imported"] == []
    assert report["default_num_inference_steps"] == 1 and report["default_guidance_scale"] == 1.0
    index = json.loads((lora_run.out / "pipeline" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]

    images = np.load(lora_run.cwd / "images.npz")
    expected = generator_images(lora_run.teacher, lora_run.out)
    assert expected.shape == images["stock"].shape == images["folder"].shape == (1, 32, 32, 3)
    np.testing.assert_allclose(images["stock"], expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(images["folder"], expected, rtol=0, atol=1e-3)  # LoRA fused into the weights
    # The trained student is not the teacher: its one-step image differs from the teacher's.
    assert np.abs(generator_images(lora_run.teacher, lora_run.out, student=False) - expected).max() > 1e-3


def test_full_finetune_exports_a_unet(sd_teacher, tmp_path_factory, prompts_file):
    run = train_and_load("sd", sd_teacher, tmp_path_factory.mktemp("swiftbrush-full"), prompts_file,
                         "--full_finetune", "--learning_rate", "1e-4")
    assert run.train.returncode == 0, tail(run.train)
    assert (run.out / "unet" / "config.json").is_file() and not (run.out / "pytorch_lora_weights.safetensors").exists()
    assert run.load.returncode == 0, tail(run.load)
    images = np.load(run.cwd / "images.npz")
    expected = generator_images(sd_teacher, run.out)
    np.testing.assert_allclose(images["stock"], expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(images["folder"], expected, rtol=0, atol=1e-4)


def same_checkpoint_weights(first: Path, second: Path) -> dict:
    """{file: largest difference} over both adapters' checkpoint files of two runs; asserts the files hold the same
    keys and that training moved the adapters (so equality is not that of two untrained LoRAs)."""
    differences = {}
    for name in ("unet_trainable", "fake_score_trainable"):
        a, b = load_file(first / f"{name}.safetensors"), load_file(second / f"{name}.safetensors")
        assert set(a) == set(b) and any(a[k].abs().max() > 0 for k in a if "lora_B" in k), name
        differences[name] = max((a[k] - b[k]).abs().max().item() for k in a)
    return differences


def test_resume_restores_both_adapters_of_the_shared_unet(lora_run, prompts_file, tmp_path):
    """checkpoint-2 resumed in a fresh run ends at step 3 exactly where the uninterrupted run ended: the checkpoint
    stores the student's and the fake score's adapters of the one UNet, and loads each back into its own adapter."""
    assert lora_run.train.returncode == 0, tail(lora_run.train)
    resumed = train(lora_run.teacher, tmp_path / "out", "--prompts_file", str(prompts_file), "--max_train_steps", "3",
                    "--resume_from_checkpoint", str(lora_run.out / "checkpoint-2"), "--no_export_pipeline")
    assert resumed.returncode == 0, tail(resumed)
    differences = same_checkpoint_weights(lora_run.out / "checkpoint-3", tmp_path / "out" / "checkpoint-3")
    assert differences == {"unet_trainable": 0.0, "fake_score_trainable": 0.0}


def test_two_processes_train_what_one_process_trains(sd_teacher, tmp_path):
    """DDP: each adapter of the shared UNet is its own DDP module (one forward with gradients and one backward per step
    each), so 2 processes x batch 2 end with the same two adapters as 1 process x batch 2 x 2 accumulation steps."""
    prompts_file = tmp_path / "prompts.txt"  # two batches of 2 per step: one per process, or two accumulated
    prompts_file.write_text("\n".join(f"{p}, number {i}" for i in range(2) for p in PROMPTS[:2]) + "\n")
    common = ["--pretrained_teacher_model", str(sd_teacher), "--prompts_file", str(prompts_file), *FLAGS,
              "--max_train_steps", "2", "--no_export_pipeline"]
    one = subprocess.run([sys.executable, str(SCRIPT), *common, "--output_dir", str(tmp_path / "one"),
                          "--gradient_accumulation_steps", "2"], capture_output=True, text=True, timeout=600,
                         env=subprocess_env(), cwd=REPO)
    assert one.returncode == 0, tail(one)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = Path(sys.executable).with_name("accelerate")
    two = subprocess.run([str(launcher), "launch", "--config_file", str(REPO / "docs/accelerate_configs/multi_gpu.yaml"),
                          "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port),
                          str(SCRIPT), *common, "--output_dir", str(tmp_path / "two")], capture_output=True, text=True,
                         timeout=600, env=subprocess_env(ACCELERATE_USE_CPU="true"), cwd=REPO)
    assert two.returncode == 0, tail(two)
    assert (tmp_path / "two" / "checkpoint-2" / "random_states_1.pkl").is_file()  # really two processes
    differences = same_checkpoint_weights(tmp_path / "one" / "checkpoint-2", tmp_path / "two" / "checkpoint-2")
    assert differences == {"unet_trainable": 0.0, "fake_score_trainable": 0.0}


@pytest.mark.parametrize("flags, phrases", [
    ([], ["prompts only", "--prompts_file"]),
    (["--prompts_file", "{empty}"], ["contains no prompts"]),
    (["--prompts_file", "{prompts}", "--guidance_scale", "0.5"], ["--guidance_scale", ">= 1"]),
    (["--prompts_file", "{prompts}", "--min_timestep_ratio", "0.5", "--max_timestep_ratio", "0.2"],
     ["--min_timestep_ratio", "--max_timestep_ratio"]),
])
def test_bad_input_exits_with_one_error_line(sd_teacher, prompts_file, tmp_path, flags, phrases):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    flags = [f.format(empty=empty, prompts=prompts_file) for f in flags]
    out = tmp_path / "out"
    result = train(sd_teacher, out, *flags)
    assert result.returncode == 2, tail(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    assert not out.exists()
