"""Run configuration: validation, JSON round trip, presets and the content hash."""

import dataclasses

import pytest

from eqdiff.config import (
    METHOD_PRESETS,
    FrequencyConfig,
    LossConfig,
    MaskConfig,
    MethodConfig,
    RRAConfig,
    RunConfig,
    SampleConfig,
    StorageConfig,
    TrainConfig,
    config_hash,
    from_dict,
    from_json,
    method_preset,
    to_dict,
    to_json,
    with_overrides,
)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: FrequencyConfig(p_low=0.5, p_high=0.5, p_full=0.5), "sum to 1"),
        (lambda: FrequencyConfig(low_cutoff=0.01, high_cutoff=0.1), "inverted"),
        (lambda: FrequencyConfig(low_cutoff=1.5), "low_cutoff"),
        (lambda: FrequencyConfig(filter_shape="triangle"), "filter_shape"),
        (lambda: FrequencyConfig(band_output="imag"), "band_output"),
        (lambda: FrequencyConfig(p_low=-0.1, p_high=0.3, p_full=0.8), "p_low"),
        (lambda: TrainConfig(steps=-5), "train.steps"),
        (lambda: TrainConfig(steps=0), "train.steps"),
        (lambda: TrainConfig(learning_rate=0.0), "learning_rate"),
        (lambda: TrainConfig(resolution=500), "multiple of 8"),
        (lambda: TrainConfig(placeholder_token="two words"), "placeholder_token"),
        (lambda: TrainConfig(precision="fp8"), "precision"),
        (lambda: SampleConfig(guidance_scale=0.5), "guidance_scale"),
        (lambda: SampleConfig(scheduler="magic"), "scheduler"),
        (lambda: SampleConfig(images_per_prompt=0), "images_per_prompt"),
        (lambda: MaskConfig(dilation_kernel=4), "odd"),
        (lambda: MaskConfig(extractor="photoshop"), "extractor"),
        (lambda: RRAConfig(blocks=("mid", "sideways")), "blocks"),
        (lambda: RRAConfig(blocks=()), "at least one"),
        (lambda: RRAConfig(timestep_gap=-1), "timestep_gap"),
        (lambda: LossConfig(xattn_weight=-1.0), "xattn_weight"),
        (lambda: LossConfig(rra_loss_form="per-head"), "rra_loss_form"),
        (lambda: LossConfig(instance_normalisation="per-pixel"), "instance_normalisation"),
        (lambda: RRAConfig(reference_prompt="class"), "reference_prompt"),
        (lambda: RRAConfig(gate_gradient="everywhere"), "gate_gradient"),
        (lambda: FrequencyConfig(band_init="quarter"), "band_init"),
        (lambda: MethodConfig(name="x", rra=False, rra_loss=True), "rra_loss needs rra"),
        (lambda: MethodConfig(name="../evil"), "method.name"),
        (lambda: StorageConfig(url="ftp://host/x"), "scheme"),
        (lambda: RunConfig(methods=()), "at least one"),
        (lambda: RunConfig(methods=(METHOD_PRESETS["eqdiff"], METHOD_PRESETS["eqdiff"])),
         "repeat"),
    ],
)
def test_invalid_values_raise_clear_errors(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_configs_are_frozen():
    config = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 10  # type: ignore[misc]


def test_json_round_trip_is_exact():
    config = RunConfig(methods=tuple(METHOD_PRESETS.values()),
                       frequency=FrequencyConfig(filter_shape="gaussian", band_output="abs"),
                       train=TrainConfig(steps=7, learning_rate=1.25e-4),
                       rra=RRAConfig(blocks=("up",)))
    restored = from_json(RunConfig, to_json(config))
    assert restored == config
    assert isinstance(restored.rra.blocks, tuple)
    assert config_hash(restored) == config_hash(config)


def test_unknown_keys_are_errors_with_their_path():
    data = to_dict(RunConfig())
    data["train"]["stepz"] = 3
    with pytest.raises(ValueError, match=r"train\.stepz"):
        from_dict(RunConfig, data)


def test_wrong_types_are_errors():
    data = to_dict(RunConfig())
    data["train"]["steps"] = "many"
    with pytest.raises(ValueError, match="train.steps"):
        from_dict(RunConfig, data)


def test_methods_by_preset_name():
    config = from_dict(RunConfig, {"methods": ["eqdiff", "custom-diffusion"]})
    assert [m.name for m in config.methods] == ["eqdiff", "custom-diffusion"]
    assert config.method("custom-diffusion") == METHOD_PRESETS["custom-diffusion"]
    with pytest.raises(ValueError, match="unknown method 'dreambooth'"):
        from_dict(RunConfig, {"methods": ["dreambooth"]})


def test_presets_switch_the_documented_parts():
    eqdiff = method_preset("eqdiff")
    assert eqdiff.fdte and eqdiff.mgdp and eqdiff.rra and eqdiff.train_kv
    assert not method_preset("eqdiff-no-fdte").fdte
    assert not method_preset("eqdiff-no-mgdp").mgdp
    assert not method_preset("eqdiff-no-rra").rra
    custom = method_preset("custom-diffusion")
    assert custom.train_kv and not (custom.fdte or custom.mgdp or custom.rra)
    ti = method_preset("textual-inversion")
    assert not (ti.train_kv or ti.fdte or ti.mgdp or ti.rra)


def test_hash_is_stable_and_tracks_result_changing_fields():
    base = RunConfig()
    assert config_hash(base) == config_hash(RunConfig())
    assert len(config_hash(base)) == 16
    assert config_hash(with_overrides(base, {"train.steps": 601})) != config_hash(base)
    assert config_hash(with_overrides(base, {"frequency.low_cutoff": 0.2})) != config_hash(base)
    for override in ({"losses.rra_loss_form": "per-layer"},
                     {"losses.instance_normalisation": "per-element"},
                     {"rra.reference_prompt": "learned"}, {"rra.gate_gradient": "inside"},
                     {"frequency.band_init": "half"}):  # the released-code switches
        assert config_hash(with_overrides(base, override)) != config_hash(base), override


def test_hash_ignores_speed_and_bookkeeping_fields():
    base = RunConfig()
    for override in ({"sample.batch_size": 1}, {"train.checkpoint_every": 7},
                     {"storage.url": "s3://bucket/prefix"}, {"train.precision": "fp32"}):
        assert config_hash(with_overrides(base, override)) == config_hash(base), override


def test_hash_of_sections_combines_parts():
    train = TrainConfig()
    method = method_preset("eqdiff")
    assert config_hash(train, method) != config_hash(train, method_preset("eqdiff-no-rra"))
    assert config_hash(train, method) != config_hash(method, train)


def test_overrides_reject_unknown_keys():
    with pytest.raises(ValueError, match="unknown config key 'train.nope'"):
        with_overrides(RunConfig(), {"train.nope": 1})
    with pytest.raises(ValueError, match="sum to 1"):
        with_overrides(RunConfig(), {"frequency.p_full": 0.5})


def test_models_are_local_only_until_the_one_override_allows_downloads():
    from flows.params import CustomizeParams

    assert RunConfig().model.local_files_only
    assert CustomizeParams().run_config(base_model="org/model").model.local_files_only
    allowed = CustomizeParams(overrides={"model.local_files_only": False})
    assert not allowed.run_config(base_model="org/model").model.local_files_only
    assert config_hash(allowed.run_config(base_model="org/model")) == config_hash(
        CustomizeParams().run_config(base_model="org/model"))  # a bookkeeping switch
