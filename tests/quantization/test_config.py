"""build_quant_config: every accepted form of reference/overview.txt, and every bad input."""

from __future__ import annotations

import pytest

from diffquant.quantization import (
    ComponentQuantizationConfig,
    Fp8Config,
    Int8Config,
    QuantizationConfig,
    build_quant_config,
    method_names,
)

ALL_METHODS = ["fp8", "int8", "mxfp8", "mxfp4", "mxfp4_dualscale", "modelopt", "gguf", "auto-round", "msmodelslim"]
PLANNED = sorted(set(ALL_METHODS) - {"fp8", "int8"})


def test_every_method_of_the_overview_is_registered():
    assert sorted(method_names()) == sorted(ALL_METHODS)


@pytest.mark.parametrize("spec", ["fp8", "FP8", " Fp8 ", "fp8-w8a8", "float8"])
def test_fp8_names_case_and_dash_insensitive(spec):
    assert isinstance(build_quant_config(spec), Fp8Config)


@pytest.mark.parametrize("spec", ["int8", "INT8", "int8_w8a8", "W8A8-INT8"])
def test_int8_names(spec):
    assert isinstance(build_quant_config(spec), Int8Config)


@pytest.mark.parametrize("name", PLANNED + ["AutoRound", "auto_round", "MXFP4-DualScale"])
def test_planned_methods_raise_not_implemented_naming_the_method(name):
    with pytest.raises(NotImplementedError, match="not implemented"):
        build_quant_config(name)


def test_overview_python_api_examples():
    assert isinstance(build_quant_config("fp8"), Fp8Config)
    static = build_quant_config({"method": "fp8", "activation_scheme": "static", "input_scales": {"to_q": 0.5}})
    assert static.activation_scheme == "static" and static.resolved_activation_granularity == "static"
    with pytest.raises(NotImplementedError, match="auto-round"):
        build_quant_config("auto-round", bits=4, group_size=128)
    with pytest.raises(NotImplementedError, match="gguf"):
        build_quant_config({"method": "gguf", "gguf_model": "/path/to/model.gguf"})
    routed = build_quant_config({"transformer": {"method": "fp8"}, "vae": None})
    assert isinstance(routed, ComponentQuantizationConfig)
    assert isinstance(routed.for_component("transformer"), Fp8Config)
    assert routed.for_component("vae") is None and routed.for_component("text_encoder") is None
    assert build_quant_config(None) is None and build_quant_config("none") is None


def test_quant_method_alias_and_agreement():
    assert isinstance(build_quant_config({"quant_method": "int8"}), Int8Config)
    assert isinstance(build_quant_config({"method": "fp8", "quant_method": "FP8"}), Fp8Config)
    with pytest.raises(ValueError, match="disagree"):
        build_quant_config({"method": "fp8", "quant_method": "int8"})


def test_kwargs_merge_and_override():
    cfg = build_quant_config({"method": "fp8", "ignored_layers": ["a"]}, ignored_layers=["b", "c"])
    assert cfg.ignored_layers == ("b", "c")
    cfg2 = build_quant_config(cfg, weight_granularity="per_tensor")
    assert cfg2.weight_granularity == "per_tensor" and cfg2.ignored_layers == ("b", "c")


def test_existing_config_returned_as_is():
    cfg = Fp8Config(ignored_layers=["x"])
    assert build_quant_config(cfg) is cfg
    routed = build_quant_config({"transformer": cfg})
    assert build_quant_config(routed) is routed


def test_component_dict_with_default_and_config_objects():
    routed = build_quant_config({"transformer": Int8Config(), "text_encoder": "fp8", "default": "fp8"})
    assert isinstance(routed.for_component("transformer"), Int8Config)
    assert isinstance(routed.for_component("anything_else"), Fp8Config)
    assert routed.component_names == ["transformer", "text_encoder"]


@pytest.mark.parametrize(
    "cfg",
    [
        Fp8Config(),
        Fp8Config(ignored_layers=["img_mlp", "re:blocks\\.0\\."], weight_granularity="per_tensor",
                  activation_granularity="per_tensor", backend="emulated"),
        Fp8Config(weight_block_size=[128, 64]),
        Fp8Config(activation_scheme="static", input_scales={"to_q": 0.25, "to_k": 2.0}),
        Int8Config(ignored_layers=["proj_out"]),
    ],
)
def test_to_dict_from_dict_round_trip(cfg):
    data = cfg.to_dict()
    assert data["method"] == cfg.method and data["version"] == 1
    back = QuantizationConfig.from_dict(data)
    assert back == cfg and back.to_dict() == data
    import json

    assert QuantizationConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_component_round_trip():
    routed = build_quant_config({"transformer": {"method": "fp8", "ignored_layers": ["img_mlp"]},
                                 "vae": None, "default": "int8"})
    assert ComponentQuantizationConfig.from_dict(routed.to_dict()) == routed


def test_configs_are_frozen_and_hashable():
    cfg = Fp8Config(ignored_layers=["a"])
    with pytest.raises(AttributeError):
        cfg.activation_scheme = "static"
    assert hash(cfg) == hash(Fp8Config(ignored_layers=("a",)))


BAD_INPUTS = [
    ("fp9", {}, ValueError, r"unknown quantization method 'fp9'; valid methods: auto-round, fp8, gguf"),
    ({"method": 8}, {}, ValueError, "method must be a string"),
    ({"method": "fp8", "ignore_layers": ["x"]}, {}, ValueError, "unknown parameter 'ignore_layers'.*ignored_layers"),
    ("fp8", {"activation_scheme": "sometimes"}, ValueError, "activation_scheme='sometimes'.*'dynamic', 'static'"),
    ("fp8", {"activation_scheme": "static"}, ValueError, "needs input_scales"),
    ("fp8", {"input_scales": {"a": 1.0}}, ValueError, "only used with activation_scheme='static'"),
    ("fp8", {"activation_scheme": "static", "input_scales": {"a": -1.0}}, ValueError, "positive finite"),
    ("fp8", {"weight_block_size": [128]}, ValueError, r"\[block_n, block_k\]"),
    ("fp8", {"weight_block_size": [128, 0]}, ValueError, "positive ints"),
    ("fp8", {"weight_block_size": [128, 128], "weight_granularity": "per_tensor"}, ValueError, "leave weight_gran"),
    ("fp8", {"weight_granularity": "per_row"}, ValueError, "per_channel"),
    ("fp8", {"ignored_layers": 5}, ValueError, "list of non-empty strings"),
    ("fp8", {"ignored_layers": ["ok", ""]}, ValueError, "list of non-empty strings"),
    ("fp8", {"backend": "cutlass"}, ValueError, "backend='cutlass'.*'scaled_mm'"),
    ("int8", {"activation_scheme": "static"}, ValueError, "static' is not supported"),
    ("int8", {"is_checkpoint_int8_serialized": "yes"}, ValueError, "must be bool"),
    ({"transformer": 5}, {}, ValueError, "component 'transformer'"),
    ({"transformer": {"ignored_layers": ["x"]}}, {}, ValueError, "needs a 'method' key"),
    ({"ignored_layers": ["img_mlp"]}, {}, ValueError, "component 'ignored_layers'.*'method' key"),
    ({"method": "fp8", "version": 99}, {}, ValueError, "unsupported config version 99"),
    (3.5, {}, ValueError, "unsupported quantization spec"),
    (None, {"ignored_layers": ["x"]}, ValueError, "without a quantization method"),
]


@pytest.mark.parametrize("spec,kwargs,exc,pattern", BAD_INPUTS)
def test_bad_input_is_a_clear_error(spec, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        build_quant_config(spec, **kwargs)
    assert "\n" not in str(info.value)


def test_ignored_layers_accepts_comma_string():
    assert Fp8Config(ignored_layers="img_mlp, txt_mlp").ignored_layers == ("img_mlp", "txt_mlp")
