"""The typed config schema and its strict YAML loader: every YAML file loads; every class of bad input fails at
load time with a ConfigError that names the dotted key path; overrides go through the same checks."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from configs.loader import ConfigError, apply_overrides, config_from_dict, dump_config, load_config, parse_yaml
from configs.schema import MOVED_KEYS, Config, SpeedConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
YAML_FILES = sorted(CONFIG_DIR.rglob("*.yaml")) + sorted(CONFIG_DIR.rglob("*.yml"))


def load_text(tmp_path: Path, text: str, overrides=()) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path, overrides)


def problems_of(tmp_path: Path, text: str, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, overrides)
    return info.value.problems


# ---------------------------------------------------------------- every file, and the defaults

@pytest.mark.parametrize("path", YAML_FILES, ids=[str(p.relative_to(CONFIG_DIR)) for p in YAML_FILES])
def test_every_yaml_file_loads_and_round_trips(path):
    cfg = load_config(path)
    assert cfg.validate() == []
    assert config_from_dict(parse_yaml(dump_config(cfg))) == cfg


def test_main_config_file_is_among_the_tested_files():
    main = CONFIG_DIR / "config_video_prediction.yaml"
    if not main.exists():
        pytest.skip("configs/config_video_prediction.yaml not written yet")
    assert main in YAML_FILES


def test_default_config_validates():
    assert Config().validate() == []
    assert load_config(None) == Config()


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_text(tmp_path, "") == Config()
    assert load_text(tmp_path, "# only a comment\n") == Config()


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- each class of bad input

def test_unknown_key_names_path_and_suggests(tmp_path):
    (p,) = problems_of(tmp_path, "train:\n  learning_rat: 0.1\n")
    assert p.startswith("train.learning_rat: unknown key")
    (p,) = problems_of(tmp_path, "optim:\n  lrr: 0.1\n")
    assert p.startswith("optim.lrr:") and "did you mean 'lr'" in p
    (p,) = problems_of(tmp_path, "trian:\n  lr: 0.1\n")
    assert p.startswith("trian:") and "did you mean 'train'" in p
    (p,) = problems_of(tmp_path, "logging:\n  wandb:\n    mdoe: online\n")
    assert p.startswith("logging.wandb.mdoe:") and "did you mean 'mode'" in p


SPEED_MOVES = {old: new for old, new in MOVED_KEYS.items() if new.startswith("speed.")
               and not old.startswith("train.")}


def test_every_speed_switch_lives_in_the_speed_section():
    """Issue 17 (8): the switches that change how, not what, are computed are in one section; none is left in
    vae, unet or sampler."""
    assert set(SPEED_MOVES) == {"vae.channels_last", "vae.compile", "vae.compile_mode", "vae.fuse_upsample",
                                "unet.fuse_upsample", "unet.nhwc_shortcuts", "unet.nhwc_group_norm",
                                "sampler.compile"}
    for new in SPEED_MOVES.values():
        assert new.split(".")[1] in {f.name for f in dataclasses.fields(SpeedConfig)}, new
    for section in ("vae", "unet", "sampler"):
        names = {f.name for f in dataclasses.fields(type(getattr(Config(), section)))}
        assert not names & {"compile", "compile_mode", "channels_last", "fuse_upsample", "nhwc_shortcuts",
                            "nhwc_group_norm"}, (section, names)


@pytest.mark.parametrize("old", sorted(SPEED_MOVES))
def test_a_speed_switch_at_its_old_key_is_refused_naming_its_new_place(tmp_path, old):
    section, key = old.split(".")
    value = "default" if key == "compile_mode" else "true"
    (p,) = problems_of(tmp_path, f"{section}:\n  {key}: {value}\n")
    assert p == f"{old}: unknown key; it moved to {SPEED_MOVES[old]}"
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{old}={value}"])
    assert info.value.problems == [p]
    assert getattr(load_config(None, [f"{SPEED_MOVES[old]}={value}"]).speed, SPEED_MOVES[old].split(".")[1]) == \
        ("default" if key == "compile_mode" else True)


def test_a_stored_config_with_the_old_speed_keys_loads_with_their_values_in_speed():
    """A checkpoint written before the move carries vae.compile, unet.nhwc_shortcuts, ...: it loads (the tools and
    --resume read it), each value at its new key."""
    from model.loading import stored_config
    old = {"vae": {"channels_last": True, "compile": True, "compile_mode": "max-autotune", "fuse_upsample": False},
           "unet": {"fuse_upsample": True, "nhwc_shortcuts": False, "nhwc_group_norm": False},
           "sampler": {"compile": True}}
    speed = stored_config({"config": old}).speed
    assert (speed.vae_channels_last, speed.vae_compile, speed.vae_compile_mode, speed.vae_fuse_upsample) == \
        (True, True, "max-autotune", False)
    assert (speed.fuse_upsample, speed.nhwc_shortcuts, speed.nhwc_group_norm, speed.sampler_compile) == \
        (True, False, False, True)


@pytest.mark.parametrize("text, path, words", [
    ("train:\n  batch_size: 8.0\n", "train.batch_size", "expected int"),
    ("train:\n  batch_size: true\n", "train.batch_size", "expected int"),  # bool is an int in Python; not here
    ("cache:\n  enabled: 1\n", "cache.enabled", "expected bool"),
    ("vae:\n  pretrained: 3\n", "vae.pretrained", "expected str"),
    ("unet:\n  block_out_channels: 64\n", "unet.block_out_channels", "expected a list"),
    ("unet:\n  block_out_channels: [32, x]\n", "unet.block_out_channels[1]", "expected int"),
    ("train: 5\n", "train", "expected a mapping"),
    ("data:\n  synthetic: [1]\n", "data.synthetic", "expected a mapping"),
    ("sampler:\n  eta: yes\n", "sampler.eta", "expected float"),
])
def test_wrong_type_names_path(tmp_path, text, path, words):
    problems = problems_of(tmp_path, text)
    assert any(p.startswith(f"{path}:") and words in p for p in problems), problems


def test_quoted_number_for_float_is_an_error_with_hint(tmp_path):
    (p,) = problems_of(tmp_path, 'optim:\n  lr: "1e-4"\n')
    assert p.startswith("optim.lr: expected float, got str '1e-4'") and "quoted number" in p


@pytest.mark.parametrize("text, value", [
    ("1e-4", 1e-4), ("1E-4", 1e-4), ("2.5e-4", 2.5e-4), ("1.0e-4", 1e-4), (".5", 0.5), ("1.", 1.0),
    ("-2e+1", -20.0),
])
def test_unquoted_scientific_notation_is_a_float(tmp_path, text, value):
    """PyYAML (YAML 1.1) reads `1e-4` as the string '1e-4'; the loader reads it as YAML 1.2 does."""
    assert parse_yaml(f"x: {text}") == {"x": value}
    assert isinstance(parse_yaml(f"x: {text}")["x"], float)
    if value > 0:
        assert load_text(tmp_path, f"optim:\n  lr: {text}\n").optim.lr == value


def test_int_for_a_float_field_becomes_a_float(tmp_path):
    lr = load_text(tmp_path, "optim:\n  lr: 3\n").optim.lr
    assert lr == 3.0 and type(lr) is float


def test_strings_that_only_look_numeric_stay_strings(tmp_path):
    """A bare '.' or 'e5' is not a number; before the fix '.' crashed the loader with float('.')."""
    assert parse_yaml("a: .\nb: e5\nc: 1_000\nd: 1.2.3\n") == {"a": ".", "b": "e5", "c": 1000, "d": "1.2.3"}
    (p,) = problems_of(tmp_path, "logging:\n  name: .\n")
    assert p.startswith("logging.name:")
    assert load_text(tmp_path, "data:\n  sidecar_dir: .\n").data.sidecar_dir == "."


def test_duplicate_keys_are_all_named_by_path(tmp_path):
    problems = problems_of(tmp_path, "optim:\n  lr: 0.1\n  lr: 0.2\nsampler: {eta: 0.0, eta: 1.0}\n")
    assert len(problems) == 2
    assert problems[0].startswith("optim.lr: duplicate key") and "lines 2 and 3" in problems[0]
    assert problems[1].startswith("sampler.eta: duplicate key")
    (p,) = problems_of(tmp_path, "train: {}\ntrain: {}\n")
    assert p.startswith("train: duplicate key")


@pytest.mark.parametrize("text, path", [
    ("optim:\n  lr: 0.0\n", "optim.lr"),
    ("optim:\n  lr: -1.0e-4\n", "optim.lr"),
    ("optim:\n  lr: .nan\n", "optim.lr"),  # NaN passes every `<`; the schema must still refuse it
    ("optim:\n  grad_clip: .inf\n", "optim.grad_clip"),
    ("checkpoint:\n  keep_last: 1\n", "checkpoint.keep_last"),
    ("train:\n  log_every: -1\n", "train.log_every"),
    ("optim:\n  adam_betas: [0.9]\n", "optim.adam_betas"),
    ("ema:\n  decay: 1.0\n", "ema.decay"),
    ("data:\n  height: 100\n", "data.height"),
    ("data:\n  val_fraction: 1.0\n", "data.val_fraction"),
    ("data:\n  t_future: 0\n", "data.t_future"),
    ("vae:\n  latent: median\n", "vae.latent"),
    ("vae:\n  chunk_size: 0\n", "vae.chunk_size"),
    ("unet:\n  norm_num_groups: 24\n", "unet.norm_num_groups"),
    ("unet:\n  attention: [true]\n", "unet.attention"),
    ("diffusion:\n  beta_end: 0.00001\n", "diffusion.beta_end"),
    ("diffusion:\n  beta_end: .nan\n", "diffusion.beta_end"),
    ("diffusion:\n  prediction_type: sample\n", "diffusion.prediction_type"),
    ("sampler:\n  eta: 1.5\n", "sampler.eta"),
    ("sampler:\n  clip_x0: clamp\n", "sampler.clip_x0"),
    ("sampler:\n  clip_bound: 0.0\n", "sampler.clip_bound"),
    ("sampler:\n  clip_percentile: 0.2\n", "sampler.clip_percentile"),
    ("sampler:\n  num_inference_steps: 1001\n", "sampler.num_inference_steps"),
    ("logging:\n  name: a/b\n", "logging.name"),
    ("logging:\n  wandb:\n    mode: loud\n", "logging.wandb.mode"),
])
def test_out_of_range_value_names_path(tmp_path, text, path):
    problems = problems_of(tmp_path, text)
    assert problems and all(p.startswith(f"{path}:") for p in problems), problems


@pytest.mark.parametrize("text, path", [
    ("train:\n  batch_size: 10\n  grad_accum_steps: 3\n", "train.batch_size"),
    ("sampler:\n  guidance_past: 2.0\n", "sampler.guidance_past"),
    ("sampler:\n  guidance_cond: 2.0\n", "sampler.guidance_cond"),
    ("diffusion:\n  cond_dropout: 0.1\n", "diffusion.cond_dropout"),  # dropout of a vector that does not exist
])
def test_cross_field_problems_name_path(tmp_path, text, path):
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1 and problems[0].startswith(f"{path}:"), problems


def test_cross_field_combinations_that_are_fine(tmp_path):
    cfg = load_text(tmp_path, "train:\n  batch_size: 12\n  grad_accum_steps: 3\n"
                              "diffusion:\n  past_dropout: 0.1\n  cond_dropout: 0.1\n"
                              "data:\n  cond_keys: [speed]\n"
                              "sampler:\n  guidance_past: 2.0\n  guidance_cond: 1.5\n")
    assert cfg.cond_dim == 4 and cfg.sampler.guidance_past == 2.0


def test_several_problems_reported_at_once(tmp_path):
    text = ("train:\n  lrr: 0.1\n  batch_size: 8.0\noptim:\n  warmup_steps: -1\n"
            "sampler:\n  eta: 2.0\n  guidance_past: 3.0\n"
            "vae:\n  latent: median\n")
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    paths = sorted(p.split(":")[0] for p in info.value.problems)
    for expected in ("train.lrr", "train.batch_size", "optim.warmup_steps", "sampler.eta", "sampler.guidance_past",
                     "vae.latent"):
        assert expected in paths, paths
    message = str(info.value)
    assert str(tmp_path / "config.yaml") in message and f"{len(info.value.problems)} problem(s)" in message


def test_top_level_must_be_a_mapping(tmp_path):
    (p,) = problems_of(tmp_path, "- a\n- b\n")
    assert "expected a mapping" in p


def test_yaml_syntax_error_is_a_config_error(tmp_path):
    (p,) = problems_of(tmp_path, "optim:\n  lr: [1\n")
    assert p.startswith("(yaml)")


# ---------------------------------------------------------------- overrides

def test_dotted_overrides(tmp_path):
    cfg = load_text(tmp_path, "optim:\n  lr: 1.0e-3\n", [
        "optim.lr=2e-4", "--set=train.batch_size=32", "unet.block_out_channels=[32, 64]",
        "unet.attention=[false, true]", "logging.wandb.mode=disabled", "data.cond_keys=[speed, steer]",
        "logging.name=", "data.synthetic.enabled=true"])
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.batch_size == 32
    assert cfg.unet.block_out_channels == [32, 64] and cfg.unet.attention == [False, True]
    assert cfg.logging.wandb.mode == "disabled"
    assert cfg.data.cond_keys == ["speed", "steer"]
    assert cfg.logging.name == ""
    assert cfg.data.synthetic.enabled is True


def test_overrides_on_defaults_and_later_wins():
    cfg = load_config(None, ["optim.lr=0.5", "optim.lr=0.25"])
    assert cfg.optim.lr == 0.25


@pytest.mark.parametrize("override, path, words", [
    ("optim.lr='1e-4'", "optim.lr", "expected float"),
    ("optim.lrr=0.1", "optim.lrr", "did you mean 'lr'"),
    ("train.batch_size=abc", "train.batch_size", "expected int"),
    ("sampler.eta=2", "sampler.eta", "must be in"),
    ("logging.wandb.mode=loud", "logging.wandb.mode", "not one of"),
    ("speed.vae_compile_mode=fast", "speed.vae_compile_mode", "not one of"),
    ("speed.compile_mode=cudagraphs", "speed.compile_mode", "not one of"),
    ("train.batch_size=10", "train.batch_size", "not divisible"),  # with grad_accum_steps=3 below
    ("optim.lr.x=1", "optim.lr", "expected float"),
    ("train.mixed_precision=no", "train.mixed_precision", "quote it"),  # YAML 1.1: no -> False
])
def test_overrides_go_through_the_same_checks(override, path, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.grad_accum_steps=3", "train.batch_size=12", override])
    assert any(p.startswith(f"{path}:") and words in p for p in info.value.problems), info.value.problems


def test_malformed_overrides_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["optim.lr", "sampler.eta=[", "--set=train"])
    problems = info.value.problems
    assert len(problems) == 3
    assert problems[0].startswith("optim.lr: override must look like")
    assert problems[1].startswith("sampler.eta: (yaml)")


def test_override_into_a_value_that_is_not_a_section():
    problems: list[str] = []
    raw = apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr.x=1"], problems)
    assert problems == ["optim.lr.x: lr is not a section"] and raw == {"optim": {"lr": 0.1}}


def test_an_override_yaml_reads_as_an_alias_says_to_quote_it():
    """--set data.frame_glob=*.jpg: '*' starts a YAML alias; the problem says how to quote it, and quoted it loads."""
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.frame_glob=*.jpg", "data.root=!x"])
    assert info.value.problems == [
        "data.frame_glob: '*.jpg' is not a YAML value (a leading '*' has a meaning in YAML); quote it, e.g. "
        "--set \"data.frame_glob='*.jpg'\" (the outer quotes are for the shell)",
        "data.root: '!x' is not a YAML value (a leading '!' has a meaning in YAML); quote it, e.g. "
        "--set \"data.root='!x'\" (the outer quotes are for the shell)"]
    assert load_config(None, ["data.frame_glob='*.jpg'"]).data.frame_glob == "*.jpg"


# ---------------------------------------------------------------- dump -> load

def test_dump_load_round_trip_of_defaults(tmp_path):
    cfg = Config()
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_dump_load_round_trip_of_awkward_values(tmp_path):
    """Strings that YAML 1.2 would read as numbers or bools must come back as strings (quoted on dump)."""
    cfg = load_config(None, ["optim.lr=3.0e-5", "optim.weight_decay=1e-12", "diffusion.snr_gamma=5",
                             "data.cond_keys=[speed]", "diffusion.cond_dropout=0.1",
                             "unet.block_out_channels=[64, 128]", "unet.attention=[false, true]"])
    cfg.logging.name = "1e5"
    cfg.logging.wandb.tags = ["1e-4", ".", "yes", "1.", ".5", "null", "~", "0x10", "", "a: b", "-"]
    cfg.data.sidecar_dir = "."
    cfg.data.frame_glob = "*.jpg"
    assert cfg.validate() == []
    dump_config(cfg, tmp_path / "resolved.yaml")
    back = load_config(tmp_path / "resolved.yaml")
    assert back == cfg
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
    assert type(back.diffusion.snr_gamma) is float


# ---------------------------------------------------------------- zero and negative sizes (issue 16 item 7)

def _scalar_fields(cls, prefix: str = ""):
    """(dotted key, type) of every int or float field of the schema, recursively."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _scalar_fields(hints[f.name], f"{prefix}{f.name}.")
        elif hints[f.name] in (int, float):
            yield f"{prefix}{f.name}", hints[f.name]


@pytest.mark.parametrize("overrides, key", [
    (["unet.norm_num_groups=0"], "unet.norm_num_groups"),
    (["unet.norm_num_groups=-8"], "unet.norm_num_groups"),
    (["unet.attention_head_dim=0"], "unet.attention_head_dim"),
    (["unet.attention_head_dim=-8"], "unet.attention_head_dim"),
    (["unet.block_out_channels=[-32, 64]", "unet.attention=[false, false]"], "unet.block_out_channels[0]"),
    (["unet.block_out_channels=[64, 0]", "unet.attention=[false, false]"], "unet.block_out_channels[1]"),
    (["train.grad_accum_steps=0"], "train.grad_accum_steps"),
    (["train.grad_accum_steps=-2"], "train.grad_accum_steps"),
])
def test_zero_or_negative_sizes_are_config_problems_naming_the_key(overrides, key, capsys):
    """Were a ZeroDivisionError inside validation (0) or accepted until the model was built (negative)."""
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert any(p.startswith(f"{key}:") and "must be >= 1" in p for p in info.value.problems), info.value.problems
    import train_video_pred
    assert train_video_pred.main(["--dry-run", "--set", *overrides]) == 2
    err = capsys.readouterr().err
    assert f"{key}:" in err and "Traceback" not in err


@pytest.mark.parametrize("value", [0, -1])
def test_no_number_in_the_schema_breaks_validation(value):
    """Every int or float field set to 0 gives a Config or a ConfigError naming it, never another exception; no
    field takes -1 (no size, count, rate or seed of this schema is negative)."""
    for key, _ in _scalar_fields(Config):
        try:
            load_config(None, [f"{key}={value}"])
        except ConfigError as e:
            assert any(key in p for p in e.problems), (key, e.problems)
        else:
            assert value == 0, f"{key}={value} was accepted"
