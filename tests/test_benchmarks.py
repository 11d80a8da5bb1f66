"""The benchmark scripts' code on tiny settings (their figures come from full runs, not from this suite)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.demo import digit_prompts, metrics_table, save_grid

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method,cached", [("lcm", False), ("lcm", True), ("pcm", True), ("rectified", True),
                                           ("swiftbrush", False), ("ufogen", True)])
def test_speed_measure_runs_real_training_steps(sd_teacher, method, cached):
    speed = load_benchmark("speed")
    result = speed.measure(method, sd_teacher, cached=cached, steps=1, batch_size=2, device=torch.device("cpu"))
    assert result["samples_per_s"] > 0 and result["peak_mb"] > 100


def test_quality_targets_compare_against_the_teacher():
    quality = load_benchmark("quality")
    results = {"teacher DDIM 25": {"fd": 10.0, "accuracy": 0.9}, "teacher DDIM 1": {"fd": 100.0, "accuracy": 0.1},
               "lcm 4": {"fd": 10.4, "accuracy": 0.92}, "lcm 1": {"fd": 61.0, "accuracy": 0.5}}
    lines = quality.targets(results, "lcm")
    assert "met" in lines[0] and "NOT" not in lines[0]  # 10.4 <= 10.5 and 0.92 >= 0.9
    assert "NOT met" in lines[1]  # 61 > 60
    results["lcm 4"]["accuracy"] = 0.85
    assert "NOT met" in quality.targets(results, "lcm")[0]


def test_quality_targets_on_a_flow_teacher_compare_against_its_euler_sampler():
    quality = load_benchmark("quality")
    results = {"teacher Euler 28": {"fd": 10.0, "accuracy": 0.9}, "teacher Euler 1": {"fd": 100.0, "accuracy": 0.1},
               "teacher DDIM 25": {"fd": 1000.0, "accuracy": 0.0}, "lcm 4": {"fd": 10.4, "accuracy": 0.92},
               "lcm 1": {"fd": 59.0, "accuracy": 0.5}}
    lines = quality.targets(results, "lcm", "sd3")
    assert "Euler-28 10.00" in lines[0] and "NOT" not in lines[0]
    assert "Euler-1 100.00" in lines[1] and "NOT" not in lines[1]
    assert "not evaluated" in quality.targets({"lcm 4": results["lcm 4"]}, "lcm", "sd3")[0]


def test_quality_teacher_rows_on_a_flow_teacher_are_euler_and_flow_dpm_solver(tmp_path):
    from distill.demo import digits

    quality = load_benchmark("quality")
    teacher = digits.build_digits_teacher(tmp_path / "sd3", family="sd3", vae_steps=1, denoiser_steps=1,
                                          vae_batch_size=2, denoiser_batch_size=2, warmup_steps=1,
                                          transformer_layers=1, progress=False, num_threads=1, guidance_candidates=())
    runs = quality.teacher_runs(teacher, 2.0, [1, 28])
    assert sorted(runs) == ["teacher DPM-Solver++ 1", "teacher DPM-Solver++ 28", "teacher Euler 1",
                            "teacher Euler 28"]
    euler, dpm = runs["teacher Euler 1"][1].scheduler, runs["teacher DPM-Solver++ 1"][1].scheduler
    assert type(euler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert (dpm.config.use_flow_sigmas, dpm.config.prediction_type, dpm.config.flow_shift) == (
        True, "flow_prediction", euler.config.shift)
    dpm.set_timesteps(4)
    shift, sigmas = euler.config.shift, dpm.sigmas[:-1].double()
    unshifted = sigmas / (shift - (shift - 1) * sigmas)  # inverse of sigma' = shift sigma / (1 + (shift - 1) sigma)
    torch.testing.assert_close(unshifted, torch.tensor([0.999, 0.75, 0.5, 0.25], dtype=torch.float64), atol=1e-3,
                               rtol=0)  # the teacher's shift on an even grid, then the clean end
    assert float(dpm.sigmas[-1]) == 0.0


def test_demo_report_pieces(tmp_path):
    prompts, labels = digit_prompts(2)
    assert prompts[:3] == ["a handwritten digit zero", "a handwritten digit zero", "a handwritten digit one"]
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    table = metrics_table({"teacher DDIM 25": {"nfe": 50, "accuracy": 0.91, "fd": 3.2, "ms_per_image": 12.0}})
    assert "| teacher DDIM 25 | 50 | 0.910 | 3.20 | 12.0 |" in table
    images = np.zeros((20, 32, 32, 3), dtype=np.uint8)
    path = save_grid({"a": images, "b": images + 255}, 2, tmp_path / "grid.png")
    assert path.stat().st_size > 1000
