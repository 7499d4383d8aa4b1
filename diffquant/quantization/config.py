"""Quantization configs: one frozen dataclass per method, and `build_quant_config`.

Every field is validated in `__post_init__`; list-valued fields are stored as tuples so configs
stay hashable. `to_dict()` / `from_dict()` round-trip losslessly (the dict carries `method` and
`version`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from diffquant.quantization.kernels import METHOD_BACKENDS
from diffquant.quantization.registry import canonical_method, config_class, method_names, register_method

CONFIG_VERSION = 1
_METHOD_KEYS = ("method", "quant_method")


def _choices(*values: Any) -> dict[str, Any]:
    return {"choices": values}


def _check(fn) -> dict[str, Any]:
    return {"check": fn}


def _str_list(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in (p.strip() for p in value.split(",")) if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def _block_size(name: str, value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    if not ok:
        raise ValueError(f"{name} must be None or [block_n, block_k] of positive ints, got {value!r}")
    return (value[0], value[1])


def _scale_map(name: str, value: Any) -> tuple[tuple[str, float], ...] | None:
    """`input_scales`: {layer name or pattern: positive float}. Stored as sorted pairs (hashable)."""
    if value is None:
        return None
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = tuple((str(k), float(v)) for k, v in items)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must map layer names to positive floats, got {value!r}") from None
    bad = [k for k, v in pairs if not (v > 0 and v < float("inf"))]
    if bad:
        raise ValueError(f"{name}: scale for {bad[0]!r} must be a positive finite float")
    return pairs


@dataclass(frozen=True)
class QuantizationConfig:
    """Base of every method config. `method` is set by `register_method`."""

    method: ClassVar[str] = ""
    version: ClassVar[int] = CONFIG_VERSION
    implemented: ClassVar[bool] = True

    ignored_layers: tuple[str, ...] = field(default=(), metadata=_check(_str_list))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "check" in f.metadata:
                object.__setattr__(self, f.name, f.metadata["check"](f.name, value))
            elif "choices" in f.metadata and value not in f.metadata["choices"]:
                valid = ", ".join(repr(c) for c in f.metadata["choices"])
                raise ValueError(f"{self.method}: {f.name}={value!r} is not valid; valid values: {valid}")
            elif "type" in f.metadata and not isinstance(value, f.metadata["type"]):
                raise ValueError(f"{self.method}: {f.name} must be {f.metadata['type'].__name__}, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses override."""

    @classmethod
    def parameter_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> QuantizationConfig:
        unknown = sorted(set(params) - set(cls.parameter_names()))
        if unknown:
            raise ValueError(
                f"unknown parameter {unknown[0]!r} for method {cls.method!r}; "
                f"valid parameters: {', '.join(cls.parameter_names())}"
            )
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "version": self.version}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "input_scales" and value is not None:
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> QuantizationConfig:
        return build_quant_config(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


@register_method("fp8", aliases=("fp8_w8a8", "w8a8_fp8", "float8", "float8_e4m3fn"))
@dataclass(frozen=True)
class Fp8Config(QuantizationConfig):
    """FP8 E4M3 W8A8 (see DESIGN "Default numerics")."""

    activation_scheme: str = field(default="dynamic", metadata=_choices("dynamic", "static"))
    weight_block_size: tuple[int, int] | None = field(default=None, metadata=_check(_block_size))
    weight_granularity: str | None = field(default=None, metadata=_choices(None, "per_channel", "per_tensor"))
    activation_granularity: str | None = field(default=None, metadata=_choices(None, "per_token", "per_tensor"))
    input_scales: tuple[tuple[str, float], ...] | None = field(default=None, metadata=_check(_scale_map))
    backend: str = field(default="auto", metadata=_choices("auto", *METHOD_BACKENDS["fp8"]))
    # Move GELUs that feed a quantized linear into its activation quantization (quantization/fusion.py).
    fuse_activations: bool = field(default=True, metadata={"type": bool})
    # One GEMM for the quantized q/k/v projections of attention modules whose diffusers processor
    # supports it (quantization/qkv.py): None = wherever supported, True = required, False = never.
    fuse_qkv: bool | None = field(default=None, metadata=_choices(None, True, False))
    # FLUX.1 / FLUX.2 attention's q/k RMSNorm + token concatenation + RoPE as one op (quantization/qk_rope.py):
    # None = wherever the module matches what the op computes, True = required, False = never.
    fuse_qk_norm_rope: bool | None = field(default=None, metadata=_choices(None, True, False))

    def validate(self) -> None:
        static = self.activation_scheme == "static"
        if static and self.activation_granularity == "per_token":
            raise ValueError("fp8: activation_scheme='static' uses one scale per layer; "
                             "activation_granularity must be 'per_tensor' (or unset)")
        if static and not self.input_scales:
            raise ValueError("fp8: activation_scheme='static' needs input_scales={layer name: scale}")
        if not static and self.input_scales:
            raise ValueError("fp8: input_scales is only used with activation_scheme='static'")
        if self.weight_block_size is not None:
            if self.weight_granularity is not None:
                raise ValueError("fp8: weight_block_size sets block-wise weight scales; "
                                 "leave weight_granularity unset")
            if static or self.activation_granularity is not None:
                raise ValueError("fp8: weight_block_size uses dynamic per-token-group activation scales; "
                                 "leave activation_scheme 'dynamic' and activation_granularity unset")

    @property
    def resolved_weight_granularity(self) -> str:
        if self.weight_block_size is not None:
            return "block"
        return self.weight_granularity or "per_channel"

    @property
    def resolved_activation_granularity(self) -> str:
        if self.activation_scheme == "static":
            return "static"
        if self.weight_block_size is not None:
            return "per_token_group"
        return self.activation_granularity or "per_token"


@register_method("int8", aliases=("int8_w8a8", "w8a8_int8", "w8a8"))
@dataclass(frozen=True)
class Int8Config(QuantizationConfig):
    """Int8 symmetric W8A8: per-channel weights, dynamic per-token activations."""

    activation_scheme: str = field(default="dynamic", metadata=_choices("dynamic", "static"))
    is_checkpoint_int8_serialized: bool = field(default=False, metadata={"type": bool})
    backend: str = field(default="auto", metadata=_choices("auto", *METHOD_BACKENDS["int8"]))
    fuse_activations: bool = field(default=True, metadata={"type": bool})  # as Fp8Config's
    fuse_qkv: bool | None = field(default=None, metadata=_choices(None, True, False))  # as Fp8Config's
    fuse_qk_norm_rope: bool | None = field(default=None, metadata=_choices(None, True, False))  # as Fp8Config's

    def validate(self) -> None:
        if self.activation_scheme == "static":
            raise ValueError("int8: activation_scheme='static' is not supported; only 'dynamic' "
                             "(online per-token activation scales) is")
        if self.is_checkpoint_int8_serialized:
            raise NotImplementedError("int8: loading serialized Int8 checkpoints "
                                      "(is_checkpoint_int8_serialized=True) is not implemented yet")


def _planned(name: str, aliases: tuple[str, ...]) -> None:
    """Register a method a later issue implements: building it raises NotImplementedError."""

    @register_method(name, aliases=aliases)
    @dataclass(frozen=True)
    class _Planned(QuantizationConfig):
        implemented: ClassVar[bool] = False

    _Planned.__name__ = _Planned.__qualname__ = f"Planned_{name.replace('-', '_')}"


for _name, _aliases in (
    ("mxfp8", ("mxfp8_w8a8",)),
    ("mxfp4", ("mxfp4_w4a4",)),
    ("mxfp4_dualscale", ("mxfp4_dual_scale",)),
    ("modelopt", ("modelopt_fp8", "nvidia_modelopt")),
    ("gguf", ()),
    ("auto-round", ("autoround", "intel_auto_round")),
    ("msmodelslim", ("ms_model_slim",)),
):
    _planned(_name, _aliases)


@dataclass(frozen=True)
class ComponentQuantizationConfig:
    """Per-component routing: {"transformer": cfg, "text_encoder": cfg, "vae": None, "default": cfg}.

    `default` applies to components not named; None means "leave in high precision".
    """

    components: tuple[tuple[str, QuantizationConfig | None], ...]
    default: QuantizationConfig | None = None
    version: ClassVar[int] = CONFIG_VERSION

    def for_component(self, name: str) -> QuantizationConfig | None:
        return dict(self.components).get(name, self.default)

    @property
    def component_names(self) -> list[str]:
        return [name for name, _ in self.components]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {n: (c.to_dict() if c is not None else None) for n, c in self.components}
        if self.default is not None:
            out["default"] = self.default.to_dict()
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ComponentQuantizationConfig:
        cfg = build_quant_config(data)
        if not isinstance(cfg, ComponentQuantizationConfig):
            raise ValueError("expected a per-component dict such as {'transformer': 'fp8', 'vae': None}")
        return cfg


AnyQuantConfig = QuantizationConfig | ComponentQuantizationConfig


def build_quant_config(spec: Any = None, **kwargs: Any) -> AnyQuantConfig | None:
    """Build a validated config from any accepted form.

    spec: None / "none"; a method name ("fp8", "FP8", "auto-round"); {"method": ..., **params}
    (`quant_method` is an alias of `method`); a per-component dict {"transformer": ..., "vae": None,
    "default": ...}; or an existing config (returned as is). kwargs are merged into the method's
    parameters and override the dict's.
    """
    if isinstance(spec, (QuantizationConfig, ComponentQuantizationConfig)):
        if kwargs:
            if isinstance(spec, ComponentQuantizationConfig):
                raise ValueError("keyword parameters cannot be merged into a per-component config")
            return _build_method(spec.method, {**_params_of(spec), **kwargs})
        return spec
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "none"):
        if kwargs:
            raise ValueError(f"parameters {sorted(kwargs)} given without a quantization method; "
                             f"valid methods: {', '.join(method_names())}")
        return None
    if isinstance(spec, str):
        return _build_method(spec, kwargs)
    if isinstance(spec, dict):
        if any(k in spec for k in _METHOD_KEYS):
            return _build_method(_method_of(spec), {**_strip_method(spec), **kwargs})
        if kwargs:
            raise ValueError("keyword parameters cannot be merged into a per-component config")
        return _build_components(spec)
    raise ValueError(
        f"unsupported quantization spec of type {type(spec).__name__}; expected None, a method name, "
        f"a dict with 'method', a per-component dict or a QuantizationConfig"
    )


def _params_of(cfg: QuantizationConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _method_of(spec: dict[str, Any]) -> str:
    given = {k: spec[k] for k in _METHOD_KEYS if k in spec}
    names = {canonical_method(v) for v in given.values()}
    if len(names) > 1:
        raise ValueError(f"'method' and 'quant_method' disagree: {given['method']!r} vs {given['quant_method']!r}")
    return names.pop()


def _strip_method(spec: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in spec.items() if k not in _METHOD_KEYS}
    version = out.pop("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ValueError(f"unsupported config version {version!r}; this diffquant reads version {CONFIG_VERSION}")
    return out


def _build_method(name: str, params: dict[str, Any]) -> QuantizationConfig:
    cls = config_class(name)
    if not cls.implemented:
        raise NotImplementedError(f"quantization method {cls.method!r} is not implemented yet in diffquant")
    return cls.from_params(params)


def _build_components(spec: dict[str, Any]) -> ComponentQuantizationConfig:
    components: list[tuple[str, QuantizationConfig | None]] = []
    default = None
    for name, value in spec.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"component names must be non-empty strings, got {name!r}")
        if value is not None and not isinstance(value, (str, dict, QuantizationConfig)):
            raise ValueError(
                f"component {name!r}: expected a method name, a dict with 'method', a config or None, "
                f"got {type(value).__name__} {value!r} (a method config needs a 'method' key)"
            )
        if isinstance(value, dict) and not any(k in value for k in _METHOD_KEYS):
            raise ValueError(f"component {name!r}: its dict needs a 'method' key; "
                             f"valid methods: {', '.join(method_names())}")
        cfg = build_quant_config(value)
        if name == "default":
            default = cfg
        else:
            components.append((name, cfg))
    return ComponentQuantizationConfig(components=tuple(components), default=default)


__all__ = [
    "AnyQuantConfig",
    "ComponentQuantizationConfig",
    "Fp8Config",
    "Int8Config",
    "QuantizationConfig",
    "build_quant_config",
    "canonical_method",
]
