"""The two diagnosis tools, on a briefly trained tiny run: `diagnose_diffusion.py` passes every check on the healthy
run and turns the right check to fail for each planted bug (the bugs of DESIGN.md, planted the way they occur in
real code), and `test_model_inference.py` exits 0 on the healthy run and non-zero on NaN weights.

The run (trained once per session, ~30 s on one CPU thread): the bundled VAE (assets/vae_synthetic) on 32x32
frames of the synthetic world (fast objects, so that copying the last frame is a weak predictor), 2 past + 2 future
frames, a two-level 16/32-channel UNet with v-prediction, 300 AdamW steps, EMA with warm-up, 20 DDIM steps.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.training_utils import EMAModel
from PIL import Image

import diagnose_diffusion
import test_model_inference as inference_cli
from configs import config_from_dict
from diagnosis.checks import IMAGENET_MEAN, IMAGENET_STD, Context, check_context
from diagnosis.inputs import val_windows
from helpers import one_torch_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from model.loading import LoadError, load_model
from model.schedule import NoiseSchedule
from model.unet import ConditionalUNet
from trainer_helpers import explain, run_cli, write_yaml
from model.checkpoint import load_checkpoint, resolve_resume, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
ASSET_VAE = REPO / "assets" / "vae_synthetic"
ALL_CHECKS = {"pixel_range", "vae_roundtrip_psnr", "latent_scale", "vae_matches_checkpoint", "clip_bound_vs_data",
              "clip_in_sampling", "schedule_match", "first_timestep", "final_alpha_bar", "step_pairs",
              "oracle_sampler", "one_step_x0", "sampling_trace", "ema_horizon", "ema_vs_raw", "weights_finite",
              "uses_past_frames"}
SCHEDULE = {"schedule_match", "first_timestep", "final_alpha_bar", "step_pairs"}


# ------------------------------------------------------------------------------------------------ the trained run
@pytest.fixture(scope="session")
def healthy(tmp_path_factory) -> Path:
    """A briefly trained healthy run folder (the real training command line, in a subprocess)."""
    assert (ASSET_VAE / "config.json").is_file(), "the bundled VAE assets/vae_synthetic is missing"
    root = tmp_path_factory.mktemp("diagnosis")
    vae = shutil.copytree(ASSET_VAE, root / "vae")  # the run's own copy: a planted bug edits copies of it
    raw = {
        "data": {"root": str(root / "world"), "height": 32, "width": 32, "t_past": 2, "t_future": 2,
                 "val_fraction": 0.25, "num_workers": 0,
                 "synthetic": {"enabled": True, "num_clips": 8, "frames_per_clip": 16, "height": 32, "width": 32,
                               "speed": 4.0}},
        "vae": {"pretrained": str(vae)},
        "unet": {"block_out_channels": [16, 32], "attention": [False, True], "layers_per_block": 1,
                 "attention_head_dim": 8, "norm_num_groups": 8},
        "diffusion": {"prediction_type": "v_prediction"},
        # the bound sits above the data's scaled latents (max |z| ~ 6.7 for this VAE at 32x32), as DESIGN asks
        "sampler": {"num_inference_steps": 20, "clip_x0": "static", "clip_bound": 8.0},
        "train": {"batch_size": 8, "max_steps": 300, "log_every": 100, "mixed_precision": "no"},
        "optim": {"lr": 3e-3, "warmup_steps": 20},
        "eval": {"visualize_every": 0, "every": 0, "vis_clips": 0, "clips": 1, "steps": 1},
        "checkpoint": {"every": 0},
        "cache": {"dir": str(root / "cache")},
        "logging": {"run_dir": str(root / "runs"), "name": "healthy", "wandb": {"mode": "disabled"}},
    }
    proc = run_cli(["--config", str(write_yaml(root / "healthy.yaml", raw))], root, timeout=600)
    assert proc.returncode == 0, explain(proc)
    return root / "runs" / "healthy"


def plant(healthy: Path, dest: Path, mutate) -> Path:
    """A copy of the healthy run's checkpoint, changed by mutate(state), as the only checkpoint of run folder `dest`."""
    _, state = resolve_resume(healthy / "checkpoints")
    mutate(state)
    save_checkpoint(state, dest / "checkpoints", state["step"])
    return dest


def diagnose(run: Path, out: Path, *extra: str, pixel_transform=None) -> tuple[int, dict, dict]:
    """(exit code, name -> check, the whole report) of diagnose_diffusion.py on 4 validation windows."""
    rc = diagnose_diffusion.main(["--run", str(run), "--out", str(out), "--clips", "4", "--device", "cpu", *extra],
                                 pixel_transform=pixel_transform)
    report = json.loads((out / "report.json").read_text())
    return rc, {c["name"]: c for c in report["checks"]}, report


@pytest.fixture(scope="module")
def healthy_report(healthy, tmp_path_factory):
    out = tmp_path_factory.mktemp("healthy_diagnosis")
    return (*diagnose(healthy, out), out)


# ------------------------------------------------------------------------------------------------ the bugs, planted
def imagenet_normalised(frames: torch.Tensor) -> torch.Tensor:
    """(a) What a torchvision Normalize(IMAGENET_MEAN, IMAGENET_STD) after ToTensor makes of the pipeline's frames."""
    unit = (frames + 1) / 2
    return (unit - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def sd_scaling_factor(tmp: Path):
    """(b) The VAE's config.json edited to Stable Diffusion's 0.18215, a literal copied from SD code."""
    def mutate(state):
        vae = shutil.copytree(state["config"]["vae"]["pretrained"], tmp / "vae_sd_scale")
        cfg = json.loads((vae / "config.json").read_text())
        cfg["scaling_factor"] = 0.18215
        (vae / "config.json").write_text(json.dumps(cfg))
        state["config"]["vae"]["pretrained"] = str(vae)
    return mutate


def sampler_setting(key: str, value):
    """(c), (d) A sampler setting in the stored config, as `--set sampler.<key>=<value>` at training would write it."""
    def mutate(state):
        state["config"]["sampler"][key] = value
    return mutate


def _unet(state, weights="unet") -> ConditionalUNet:
    unet = ConditionalUNet(config_from_dict(state["config"]).unet, **state["model_args"])
    if weights:
        unet.load_state_dict(state[weights])
    return unet


def lagging_ema(tmp: Path):
    """(e) EMA with a constant decay 0.9999 and no warm-up (diffusers EMAModel with min_decay = decay) after 1,000
    updates: update 1 copies the weights after the first optimizer step (about the random init; diffusers' first
    decay is 0), the other 999 average in the trained weights."""
    def mutate(state):
        torch.manual_seed(0)
        init, trained = _unet(state, weights=None), _unet(state)
        ema = EMAModel(init.parameters(), decay=0.9999, min_decay=0.9999, use_ema_warmup=False, foreach=True)
        ema.step(init.parameters())
        for _ in range(999):
            ema.step(trained.parameters())
        state["ema"] = ema.state_dict()
        state["step"] = 1000
    return mutate


def nan_weight(tmp: Path):
    """(f) One NaN in the raw UNet weights of the checkpoint."""
    def mutate(state):
        state["unet"]["unet.mid_block.resnets.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    return mutate


def past_ignored(tmp: Path):
    """(g) The UNet's conv_in weights on the past-latent input channels zeroed, in the raw and the EMA weights: the
    input is [noisy future | past] stacked on channels, so the model no longer sees its past frames."""
    def mutate(state):
        a = state["model_args"]
        first_past = a["t_future"] * a["latent_channels"]
        state["unet"]["unet.conv_in.weight"][:, first_past:] = 0
        names = [n for n, _ in _unet(state, weights=None).named_parameters()]
        state["ema"]["shadow_params"][names.index("unet.conv_in.weight")][:, first_past:] = 0
    return mutate


# bug -> (how to plant it, checks that must fail, checks that must still pass)
BUGS = {
    "a_imagenet_pixels": (None, {"pixel_range", "vae_roundtrip_psnr"},
                          SCHEDULE | {"ema_horizon", "weights_finite", "vae_matches_checkpoint"}),
    "b_wrong_scaling_factor": (sd_scaling_factor, {"latent_scale", "vae_matches_checkpoint"},
                               SCHEDULE | {"pixel_range", "vae_roundtrip_psnr", "clip_bound_vs_data",
                                           "oracle_sampler", "ema_horizon", "weights_finite"}),
    "c_leading_spacing": (lambda tmp: sampler_setting("timestep_spacing", "leading"), {"first_timestep"},
                          ALL_CHECKS - {"first_timestep", "sampling_trace", "clip_in_sampling"}),
    "d_clip_bound_below_data": (lambda tmp: sampler_setting("clip_bound", 1.5),
                                {"clip_bound_vs_data", "oracle_sampler"},
                                SCHEDULE | {"pixel_range", "vae_roundtrip_psnr", "latent_scale", "one_step_x0",
                                            "ema_horizon", "ema_vs_raw", "weights_finite", "uses_past_frames"}),
    "e_ema_without_warmup": (lagging_ema, {"ema_horizon", "ema_vs_raw"},
                             SCHEDULE | {"pixel_range", "vae_roundtrip_psnr", "latent_scale", "clip_bound_vs_data",
                                         "oracle_sampler", "weights_finite"}),
    "f_nan_weight": (nan_weight, {"weights_finite"},
                     SCHEDULE | {"pixel_range", "vae_roundtrip_psnr", "latent_scale", "clip_bound_vs_data",
                                 "oracle_sampler", "one_step_x0", "ema_horizon", "uses_past_frames"}),
    "g_past_ignored": (past_ignored, {"uses_past_frames"},
                       SCHEDULE | {"pixel_range", "vae_roundtrip_psnr", "latent_scale", "clip_bound_vs_data",
                                   "oracle_sampler", "ema_horizon", "ema_vs_raw", "weights_finite"}),
}


# ------------------------------------------------------------------------------------------------ diagnose_diffusion
def test_healthy_run_passes_every_check(healthy_report):
    rc, checks, report, out = healthy_report
    assert set(checks) == ALL_CHECKS  # no conditioning vector in this run: no uses_cond_vector
    failing = {n: (c["status"], c["value"], c["hint"]) for n, c in checks.items() if c["status"] != "pass"}
    assert not failing, failing
    assert rc == 0
    for c in report["checks"]:
        assert set(c) >= {"name", "status", "value", "expected", "hint"} and c["expected"] and c["hint"]
    md = (out / "report.md").read_text()
    assert all(f"| {name} | pass |" in md for name in ALL_CHECKS)
    # the measured values behind the verdicts are the ones the run was built to have
    assert checks["first_timestep"]["value"] == 999
    assert checks["ema_horizon"]["value"]["initial_weight"] < 1e-3
    assert checks["uses_past_frames"]["value"]["error_ratio_other_past"] > 1.2


def test_pictures_are_readable_pngs(healthy_report):
    _, _, report, out = healthy_report
    assert set(report["pictures"].values()) == {"pixels_roundtrip.png", "latent_histogram.png", "one_step_x0.png",
                                                "sampling_trace.png", "x0_filmstrip.png"}
    md = (out / "report.md").read_text()
    for file in report["pictures"].values():
        assert f"]({file})" in md
        with Image.open(out / file) as img:
            assert img.format == "PNG" and img.width >= 200 and img.height >= 100, (file, img.size)
            pixels = np.asarray(img.convert("L"))
        assert pixels.std() > 10, f"{file} is nearly blank"


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_each_planted_bug_fails_its_check(bug, healthy, tmp_path):
    planter, must_fail, must_pass = BUGS[bug]
    if planter is None:  # (a) lives in the data pipeline's output, not in the checkpoint
        rc, checks, _ = diagnose(healthy, tmp_path / "out", pixel_transform=imagenet_normalised)
    else:
        rc, checks, _ = diagnose(plant(healthy, tmp_path / "run", planter(tmp_path)), tmp_path / "out")
    status = {n: c["status"] for n, c in checks.items()}
    assert {n: status[n] for n in must_fail} == {n: "fail" for n in must_fail}, checks
    assert {n: status[n] for n in must_pass} == {n: "pass" for n in must_pass}, \
        {n: (status[n], checks[n]["value"], checks[n]["hint"]) for n in must_pass if status[n] != "pass"}
    assert rc == 1


def test_bug_hints_name_the_fix(healthy, tmp_path):
    """The hint of a failing check says what to change, with the measured numbers."""
    run = plant(healthy, tmp_path / "run", sampler_setting("clip_bound", 1.5))
    _, checks, _ = diagnose(run, tmp_path / "out")
    bound = checks["clip_bound_vs_data"]
    assert "sampler.clip_bound" in bound["hint"] and bound["value"]["fraction_beyond"] > 1e-3
    assert bound["details"]["suggested_bound"] > bound["value"]["max_abs_latent"]
    assert "without clipping it recovers" in checks["oracle_sampler"]["hint"]
    # the suggested bound, set through --set without retraining, clears both checks
    _, fixed, _ = diagnose(run, tmp_path / "out2", "--set", f"sampler.clip_bound={bound['details']['suggested_bound']}")
    assert fixed["clip_bound_vs_data"]["status"] == fixed["oracle_sampler"]["status"] == "pass"


def test_sampling_with_other_betas_than_training(healthy, tmp_path):
    """An inference-time schedule that differs from training's (here through --set; in real code, a scheduler built
    with its own defaults) is read back from the sampler's callback and compared with the stored training config."""
    rc, checks, _ = diagnose(healthy, tmp_path, "--set", "diffusion.beta_schedule=scaled_linear")
    assert checks["schedule_match"]["status"] == checks["oracle_sampler"]["status"] == "fail" and rc == 1
    assert checks["schedule_match"]["value"]["max_rel_alpha_bar_error"] > 0.1
    assert {checks[n]["status"] for n in ("first_timestep", "final_alpha_bar", "step_pairs", "one_step_x0")} == {"pass"}


def _diffusers_prev_timestep(self, num_steps, spacing="trailing"):
    """DDIMScheduler's step rule, prev = t - T // n: for n not dividing T it lands on timesteps never visited."""
    return [(t, t - self.num_train_timesteps // num_steps) for t in self.timesteps(num_steps, spacing)]


def _final_step_to_t0(self, num_steps, spacing="trailing"):
    """DDIMScheduler with set_alpha_to_one=False: the last step lands on alpha_bar_0 < 1 instead of clean data."""
    ts = self.timesteps(num_steps, spacing)
    return list(zip(ts, ts[1:] + [0]))


@pytest.mark.parametrize("step_rule, failing", [(_diffusers_prev_timestep, "step_pairs"),
                                                (_final_step_to_t0, "final_alpha_bar")])
def test_sampler_step_bugs_are_seen_through_the_callback(healthy, tmp_path, monkeypatch, step_rule, failing):
    """Two historical DDIM step bugs planted in the schedule the sampler walks (30 steps: 1000 / 30 is no integer)."""
    monkeypatch.setattr(NoiseSchedule, "step_pairs", step_rule)
    rc, checks, _ = diagnose(healthy, tmp_path, "--set", "sampler.num_inference_steps=30")
    assert checks[failing]["status"] == "fail" and rc == 1, checks[failing]
    assert checks["first_timestep"]["status"] == checks["schedule_match"]["status"] == "pass"
    if failing == "final_alpha_bar":  # measured from the last update: alpha_bar_0 = 1 - beta_1, not 1
        assert checks[failing]["value"]["alpha_bar"] == pytest.approx(1 - 1e-4, abs=1e-6)


def test_lagging_ema_reports_the_weight_left_on_the_initial_weights(healthy, tmp_path):
    _, checks, _ = diagnose(plant(healthy, tmp_path / "run", lagging_ema(tmp_path)), tmp_path / "out")
    value = checks["ema_horizon"]["value"]
    assert checks["one_step_x0"]["status"] != "pass"  # the EMA weights, judged by default, are the weak ones
    assert value["initial_weight"] == pytest.approx(0.9999 ** 999, rel=1e-6)  # 0.905
    assert value["final_decay"] == 0.9999 and value["ema_updates"] == 1000
    # the raw weights of the same checkpoint are fine: judged with --raw, the model check passes
    _, raw, _ = diagnose(tmp_path / "run", tmp_path / "out_raw", "--raw")
    assert raw["one_step_x0"]["status"] == "pass"


def test_context_check_sees_the_conditioning_vector(tmp_path):
    """With a conditioning vector (the synthetic world's camera-pan action), the context check measures the
    prediction's change when another clip's vector is given: non-zero for a UNet that reads it, exactly zero (warn)
    once its projection into the time embedding is zeroed. Random weights: no training needed for this."""
    raw = {"data": {"root": str(tmp_path / "world"), "height": 32, "width": 32, "t_past": 2, "t_future": 2,
                    "val_fraction": 0.5, "num_workers": 0, "cond_keys": ["action"],
                    "synthetic": {"enabled": True, "num_clips": 4, "frames_per_clip": 8, "height": 32, "width": 32,
                                  "action_pan": True}},
           "vae": {"pretrained": str(ASSET_VAE)},
           "unet": {"block_out_channels": [16, 32], "attention": [False, False], "layers_per_block": 1,
                    "attention_head_dim": 8, "norm_num_groups": 8}}
    loaded = load_model(config=write_yaml(tmp_path / "cond.yaml", raw))
    windows = val_windows(loaded.cfg.data, 4, 2)
    assert windows.cond.shape == (4, 2) and windows.cond.abs().sum() > 0  # the actions of the 2 future frames

    def cond_check():
        checks = {c.name: c for c in check_context(Context(loaded, windows, tmp_path / "out", net_name="raw"))}
        return checks["uses_cond_vector"]

    assert cond_check().value["relative_change"] > 1e-4
    torch.nn.init.zeros_(loaded.raw_unet.cond_proj[-1].weight)
    torch.nn.init.zeros_(loaded.raw_unet.cond_proj[-1].bias)
    ignored = cond_check()
    assert ignored.value["relative_change"] == 0 and ignored.status == "warn"


# ------------------------------------------------------------------------------------------------ test_model_inference
def infer(*args: str) -> tuple[int, dict | None]:
    out = Path(args[args.index("--out") + 1])
    rc = inference_cli.main([*args, "--device", "cpu"])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else None
    return rc, summary


def test_inference_on_the_healthy_run(healthy, tmp_path, capsys):
    rc, s = infer("--run", str(healthy), "--out", str(tmp_path), "--clips", "3", "--rollout", "2")
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert s["healthy"] and s["problems"] == [] and not s["random_weights"] and s["weights"] == "ema"
    assert s["num_clips"] == 3 and s["predicted_frames"] == 4  # 2 rounds of t_future = 2
    for name in ("input_frames", "pred_frames", "past_latents", "pred_latents"):
        assert s[name]["nan"] == s[name]["inf"] == 0
    assert -1 <= s["pred_frames"]["min"] < s["pred_frames"]["max"] <= 1
    psnr = s["metrics"]["model"]["psnr"]
    assert len(psnr) == len(s["metrics"]["copy_last"]["psnr"]) == 4 and all(10 < v < 60 for v in psnr)
    assert s["seconds_per_clip"] > 0
    assert "PSNR" in stdout and "copy_last" in stdout
    for file in ("grid.png", "clip.gif"):  # 32x32 frames are enlarged to 96 pixels in both
        with Image.open(tmp_path / file) as img:
            assert img.height >= 96 and img.width >= 2 * 96, (file, img.size)


def test_inference_exits_nonzero_on_nan_weights(healthy, tmp_path, capsys):
    run = plant(healthy, tmp_path / "run", nan_weight(tmp_path))
    rc, s = infer("--run", str(run), "--out", str(tmp_path / "ema"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and not s["healthy"]
    assert len(err) == 1 and err[0].startswith("UNHEALTHY") and "unet.mid_block.resnets.0.conv1.weight" in err[0]
    rc, s = infer("--run", str(run), "--out", str(tmp_path / "raw"), "--raw")  # the NaN weights predict NaN
    assert rc == 1 and s["pred_latents"]["nan"] > 0
    assert any("non-finite predictions" in p for p in s["problems"])


def test_inference_on_frames_given_as_folder_or_video(healthy, tmp_path):
    cfg = load_model(healthy).cfg
    clip = sorted(p for p in Path(cfg.data.root).iterdir() if p.is_dir())[0]
    frames = sorted(clip.glob("*.png"))
    # a folder long enough for windows: the truth is known
    rc, s = infer("--run", str(healthy), "--out", str(tmp_path / "long"), "--frames", str(clip), "--clips", "2")
    assert rc == 0 and s["num_clips"] == 2 and len(s["metrics"]["model"]["psnr"]) == 2
    assert s["windows"][-1] == f"{clip.name}@{len(frames) - 4}"  # the last window ends at the last frame
    # only t_past frames: prediction only, nothing to compare with
    short = tmp_path / "short"
    short.mkdir()
    for f in frames[:2]:
        shutil.copy(f, short / f.name)
    rc, s = infer("--run", str(healthy), "--out", str(tmp_path / "short_out"), "--frames", str(short))
    assert rc == 0 and s["num_clips"] == 1 and s["metrics"] == {} and s["predicted_frames"] == 2
    # a video file (GIF, decoded by PyAV like any video)
    images = [Image.open(f).convert("RGB") for f in frames[:8]]
    images[0].save(tmp_path / "clip.gif", save_all=True, append_images=images[1:], duration=100)
    rc, s = infer("--run", str(healthy), "--out", str(tmp_path / "video"), "--frames", str(tmp_path / "clip.gif"))
    assert rc == 0 and s["source"].endswith("clip.gif") and s["metrics"]["model"]["psnr"]


def test_inference_with_random_weights_says_so(healthy, tmp_path, capsys):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text((healthy / "config.yaml").read_text())
    rc, s = infer("--config", str(cfg_file), "--out", str(tmp_path / "out"), "--clips", "1")
    assert rc == 0 and s["random_weights"] and s["checkpoint"] is None
    assert "RANDOM WEIGHTS" in capsys.readouterr().out


def test_loading_errors_exit_2_with_one_line(tmp_path, healthy, capsys):
    assert inference_cli.main(["--run", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert diagnose_diffusion.main(["--run", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    # a checkpoint whose VAE folder has gone
    run = plant(healthy, tmp_path / "run", sampler_setting("clip_bound", 8.0))
    _, state = resolve_resume(run / "checkpoints")
    state["config"]["vae"]["pretrained"] = str(tmp_path / "no_vae_here")
    save_checkpoint(state, run / "checkpoints", state["step"] + 1)
    capsys.readouterr()
    assert inference_cli.main(["--run", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_vae_here" in err[0]


@pytest.mark.parametrize("script", ["test_model_inference.py", "diagnose_diffusion.py"])
def test_help_explains_every_flag(script):
    proc = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    module = inference_cli if script.startswith("test_") else diagnose_diffusion
    for action in module.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
        for flag in action.option_strings:
            assert flag in proc.stdout
    assert "exit code" in proc.stdout


# ------------------------------------------------------------------------------------------------ model/loading.py
def test_model_rebuilt_from_the_checkpoint_alone(healthy):
    path, state = resolve_resume(healthy / "checkpoints")
    by_run, by_file = load_model(healthy), load_model(checkpoint=str(path))
    assert by_run.checkpoint == by_file.checkpoint == path and by_run.step == state["step"] == 300
    for a, b in zip(by_run.raw_unet.state_dict().values(), state["unet"].values()):
        assert torch.equal(a, b)
    for a, b in zip(by_file.ema_unet.parameters(), state["ema"]["shadow_params"]):
        assert torch.equal(a, b)
    assert by_run.ema_state["optimization_step"] == 300 and not by_run.nonfinite
    assert by_run.net("ema") is by_run.ema_unet and by_run.net("raw") is by_run.raw_unet
    # overrides apply on top of the stored config
    assert load_model(healthy, overrides=["sampler.num_inference_steps=7"]).cfg.sampler.num_inference_steps == 7


def test_loading_refuses_a_unet_of_another_shape(healthy, tmp_path):
    run = plant(healthy, tmp_path / "run", lambda s: s["config"]["data"].update(t_past=3))
    with pytest.raises(LoadError, match="t_past"):
        load_model(run)
    assert load_checkpoint(next((run / "checkpoints").glob("ckpt_*.pt")))["model_args"]["t_past"] == 2


def test_one_step_check_warns_when_copying_beats_the_model_on_a_still_camera(tmp_path):
    """The one-step x0 curves measured on UCSD Ped2 (EMA weights after 2,000 steps, H100): copy-last's latent MSE is
    0.24 % of E[x0^2], and the model's is 1.1x to 2.1x that at t = 100 .. 500. A floor of 1 % of E[x0^2] on the
    copy-last side (the blind predictors' floor) passed this; the check must warn and say where."""
    import types
    from diagnosis.checks import check_one_step
    ts = [0, 20, 50, 100, 200, 300, 400, 500, 599, 699, 799, 899, 999]
    mse = {"ema": [8.93e-05, 0.0008846, 0.001657, 0.002987, 0.005093, 0.005471, 0.005178, 0.00541, 0.007792, 0.01545,
                   0.02681, 0.03529, 0.04536],
           "zero": [1.099] * 13, "copy_last": [0.002647] * 13,
           "x_t/sqrt(ab)": [9.999e-05, 0.006303, 0.03097, 0.1171, 0.5235, 1.538, 4.165, 11.85, 37.63, 142.5, 651.6,
                            3632.0, 24770.0],
           "blind": [9.998e-05, 0.006267, 0.03013, 0.1059, 0.3546, 0.6409, 0.8694, 1.005, 1.067, 1.09, 1.097, 1.098,
                     1.098]}
    ctx = types.SimpleNamespace(one_step={"t": ts, "mse": mse}, net_name="ema", picture=lambda *a, **k: None,
                                train_schedule=types.SimpleNamespace(num_train_timesteps=1000))
    (check,) = check_one_step(ctx)
    assert check.status == "warn", check
    assert check.value["worst_ratio_to_copy_last"] == pytest.approx(0.005471 / 0.002647)
    assert check.value["worst_copy_last_t"] == 300 and "t = 300" in check.hint
    assert check.value["worst_ratio_to_blind"] < 0.1  # it has learned to denoise: a warning, not a failure
    mse["ema"] = [min(m, 0.9 * c) for m, c in zip(mse["ema"], mse["copy_last"])]  # better than copying everywhere
    (check,) = check_one_step(ctx)
    assert check.status == "pass", check


def test_schedule_and_oracle_checks_hold_with_a_residual_target(healthy, tmp_path):
    """With diffusion.target=residual the sampler works on the change from the last past latent: the schedule read
    back from the callback, the last step's landing and the oracle must be judged in that space, not in latents."""
    run = plant(healthy, tmp_path / "residual", lambda s: s["config"]["diffusion"].update(target="residual"))
    _, checks, _ = diagnose(run, tmp_path / "out")
    failing = {n: (checks[n]["status"], checks[n]["value"]) for n in SCHEDULE | {"oracle_sampler"}
               if checks[n]["status"] != "pass"}
    assert not failing, failing
