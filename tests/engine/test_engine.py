"""Engine end to end on tiny random-weight pipelines (CPU, bf16 / fp8 / int8), routing and errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from diffquant import Engine, GenerationOutput, SamplingParams
from diffquant.quantization import QuantLinear
from diffquant.quantization.weight_storage import is_fp8_stored
from tests.engine.conftest import sampling_for

PIPELINES = ["flux1-dev", "flux2-klein", "qwen-image", "z-image", "wan2.2-t2v-a14b"]
# slower on a CPU (long padded text sequences): one method each
EXTRA_RUNS = [("hunyuanimage", "int8"), ("hunyuanvideo-1.5", "fp8")]
TRANSFORMERS = {"wan2.2-t2v-a14b": ["transformer", "transformer_2"]}
VIDEO = ("wan", "hunyuanvideo")


def _qlinears(module: nn.Module) -> list[QuantLinear]:
    return [m for m in module.modules() if isinstance(m, QuantLinear)]


@pytest.mark.parametrize("name,method", [(n, m) for n in PIPELINES for m in (None, "fp8", "int8")] + EXTRA_RUNS)
def test_generate(tiny_pipeline, name, method):
    engine = Engine(model=tiny_pipeline(name), quantization=method, device="cpu")
    out = engine.generate("a red circle on a white table", sampling_for(name))
    assert isinstance(out, GenerationOutput) and out.seed == 0
    if name.startswith(VIDEO):
        assert out.images == [] and len(out.frames) == 1 and len(out.frames[0]) == 5
        assert out.frames[0][0].size == (16, 16)
    else:
        assert out.frames is None and len(out.images) == 1 and out.images[0].size == (32, 32)
    assert {"load_s", "quantize_s", "generate_s", "encode_s", "denoise_s", "decode_s"} <= set(out.timings)
    assert out.timings.get("steps", 2) == 2 and out.peak_memory_bytes > 0  # HunyuanVideo-1.5 has no step callback
    if method is None:
        assert out.quantization == {} and not _qlinears(engine.pipe.transformer)
        return
    transformers = TRANSFORMERS.get(name, ["transformer"])
    assert sorted(out.quantization) == transformers  # default scope: the diffusion transformer(s) only
    for component in transformers:
        report = out.quantization[component]
        assert report.method == method and report.quantized and report.kept
        assert all("kept high precision by default" in r.reason for r in report.kept)
        layers = _qlinears(getattr(engine.pipe, component))
        assert len(layers) == len(report.quantized) - report.merged and layers[0].scheme.method == method
    for other in ("text_encoder", "vae"):
        assert not any(is_fp8_stored(m) for m in getattr(engine.pipe, other).modules())


@pytest.mark.parametrize("name", ["flux1-dev", "wan2.2-t2v-a14b"])
def test_text_encoders_and_vae_fp8_at_rest(tiny_pipeline, name):
    encoders = ["text_encoder", "text_encoder_2", "vae"] if name == "flux1-dev" else ["text_encoder", "vae"]
    config = {"transformer": {"method": "fp8"}, **{c: "fp8" for c in encoders}}
    engine = Engine(model=tiny_pipeline(name), quantization_config=config, device="cpu")
    for component in encoders:
        module = getattr(engine.pipe, component)
        stored = [m for m in module.modules() if is_fp8_stored(m)]
        assert stored and len(stored) == len(engine.reports[component].quantized)
        assert all(m.weight is None and m.weight_fp8.dtype == torch.float8_e4m3fn for m in stored)
        assert engine.reports[component].method == "fp8_weight_storage"
    out = engine.generate("a red circle", sampling_for(name))
    assert (out.images or out.frames[0])
    assert all(m.weight is None for c in encoders for m in getattr(engine.pipe, c).modules() if is_fp8_stored(m))


def test_reference_api_blocks(tiny_pipeline):
    folder = tiny_pipeline("qwen-image")
    engine = Engine(model=folder, quantization="fp8")
    assert engine.hints() and "img_mlp" in engine.hints()[0]  # recommended, not forced
    assert not any(r.reason.startswith("ignored_layers") for r in engine.reports["transformer"].layers)
    skipping = Engine(model=folder, quantization_config={"method": "fp8", "ignored_layers": ["img_mlp"]})
    kept = {r.name for r in skipping.reports["transformer"].kept if r.reason == "ignored_layers 'img_mlp'"}
    assert kept == {"transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.0.img_mlp.net.2"}
    assert not skipping.hints()
    out = skipping.generate("A cat sitting on a windowsill", SamplingParams(num_inference_steps=2, height=32, width=32,
                                                                            negative_prompt="blurry"))
    assert len(out.images) == 1
    combined = Engine(model=folder, quantization="int8", quantization_config={"ignored_layers": ["img_mlp"]})
    assert combined.reports["transformer"].method == "int8"


def test_component_routing_default_and_none(tiny_pipeline):
    engine = Engine(model=tiny_pipeline("wan2.2-t2v-a14b"),
                    quantization_config={"default": "int8", "transformer_2": None, "vae": None})
    assert sorted(engine.reports) == ["transformer"] and engine.reports["transformer"].method == "int8"
    assert not _qlinears(engine.pipe.transformer_2)


def test_seed_reproducible_and_batched_outputs(tiny_pipeline):
    engine = Engine(model=tiny_pipeline("flux1-dev"), quantization="fp8")
    a = engine.generate("a red circle", sampling_for("flux1-dev", seed=7)).images[0]
    b = engine.generate("a red circle", sampling_for("flux1-dev", seed=7)).images[0]
    assert a.tobytes() == b.tobytes()
    many = engine.generate(["a red circle", "a blue square"], sampling_for("flux1-dev", num_outputs_per_prompt=2))
    assert len(many.images) == 4 and many.prompts == ["a red circle", "a blue square"]


def test_compile_wraps_the_transformers(tiny_pipeline):
    engine = Engine(model=tiny_pipeline("wan2.2-t2v-a14b"), quantization="fp8", compile=True)
    assert engine.pipe.transformer._compiled_call_impl is not None
    assert engine.pipe.transformer_2._compiled_call_impl is not None


def test_compile_mode_is_passed_to_torch_compile(tiny_pipeline, monkeypatch):
    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw.get("mode")))
    Engine(model=tiny_pipeline("flux1-dev"), quantization="fp8", compile="reduce-overhead")
    Engine(model=tiny_pipeline("flux1-dev"), quantization="fp8", compile=True)
    assert modes == ["reduce-overhead", None]


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune", "default"])
def test_cuda_graph_modes_copy_transformer_outputs(mode, monkeypatch):
    """Under a CUDA-graph mode the graph's output buffer is reused by the next replay: the engine's
    wrapper starts a new graph-tree step per call and hands the pipeline a copy (CFG keeps the first
    prediction across the second call)."""
    from diffquant.engine.engine import compile_transformer

    owned = torch.randn(2, 3)  # stands for a graph-owned output buffer
    steps = []

    def fake_compile(self, **kw):
        self._compiled_call_impl = lambda *a, **k: (owned, {"x": owned})

    monkeypatch.setattr(torch.nn.Module, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    module = torch.nn.Linear(3, 3)
    compile_transformer(module, mode)
    out, extra = module(torch.randn(1, 3))
    graphs = mode != "default"
    assert torch.equal(out, owned) and torch.equal(extra["x"], owned)
    assert (out.data_ptr() != owned.data_ptr()) == graphs and (extra["x"].data_ptr() != owned.data_ptr()) == graphs
    assert len(steps) == int(graphs)


def test_default_compile_on_cuda_hints_cuda_graphs(tiny_pipeline, monkeypatch):
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: None)
    hint = "compile='reduce-overhead' replays CUDA graphs"
    for method, mode, device, hinted in [("int8", True, "cuda", True), ("int8", "reduce-overhead", "cuda", False),
                                         ("fp8", True, "cuda", True), ("int8", True, "cpu", False),
                                         ("fp8", False, "cuda", False)]:
        engine = Engine(model=tiny_pipeline("flux1-dev"), quantization=method, compile=mode, device="cpu")
        engine.device = torch.device(device)  # the hint's logic only; the run stays on the CPU
        assert any(hint in h for h in engine.hints()) == hinted, (method, mode, device)


def test_unknown_compile_mode_is_one_line_error(tiny_pipeline):
    with pytest.raises(ValueError) as err:
        Engine(model=tiny_pipeline("flux1-dev"), quantization="fp8", compile="reduce_overhead")
    assert _one_line(err.value) == ("unknown compile mode 'reduce_overhead'; valid: True, False or a torch.compile "
                                    "mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs")


def test_fp8_attention_engine_on_the_embedded_model():
    """attention_quantization="fp8" on the CPU (the kernel's emulation): every attention call of
    the embedded transformer takes it, the summary says so, the picture stays >= 25 dB from bf16."""
    from diffquant.quantization.metrics import psnr_db

    params = SamplingParams(seed=0)
    ref = Engine(model=None, device="cpu").generate("a red circle", params).images[0]
    engine = Engine(model=None, quantization="fp8", attention_quantization="fp8", device="cpu")
    assert "FP8 attention in transformer" in engine.summary()
    out = engine.generate("a red circle", params).images[0]
    patch = engine.attention["transformer"]
    assert patch.fp8_calls == 48 and patch.kept_calls == 0  # 8 steps x 6 blocks
    patch_px = 2 * engine.pipe.vae_scale_factor  # a 2x2 latent patch per token
    image_tokens = (out.width // patch_px) * (out.height // patch_px)
    assert patch.max_tokens == image_tokens + engine.pipe.tokenizer.model_max_length
    pixels = [torch.tensor(list(im.getdata()), dtype=torch.float64) for im in (ref, out)]
    assert psnr_db(*pixels) >= 25.0


def test_fp8_attention_hints_short_sequences_on_cuda():
    from diffquant.quantization.attention import SHORT_SEQUENCE, AttentionPatch, short_sequence_hint

    patch = AttentionPatch(fp8_calls=3, max_tokens=4608)
    hint = short_sequence_hint(patch, "cuda")
    assert "up to 4608 tokens" in hint and "0.81x at 4608 tokens" in hint and "1.24x at 32760 tokens" in hint
    assert short_sequence_hint(patch, "cpu") is None  # the CPU emulation is not the measured kernel
    assert short_sequence_hint(AttentionPatch(fp8_calls=3, max_tokens=SHORT_SEQUENCE), "cuda") is None
    assert short_sequence_hint(AttentionPatch(kept_calls=3), "cuda") is None  # no FP8 call, nothing to say


def test_fp8_attention_checks_method_and_device():
    from diffquant.quantization.attention import check_fp8_attention_device

    with pytest.raises(ValueError) as err:
        Engine(model=None, attention_quantization="int8")
    assert _one_line(err.value) == "unknown attention quantization 'int8'; valid: fp8"
    with pytest.raises(ValueError, match="needs an SM90\\+ GPU \\(Hopper\\); this device is SM89"):
        check_fp8_attention_device("transformer", 128, (8, 9))
    with pytest.raises(ValueError, match="supports head dims 64, 128; transformer has 32"):
        check_fp8_attention_device("transformer", 32, (9, 0))
    check_fp8_attention_device("transformer", 32, None)  # CPU: the emulation takes any head dim


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_errors_are_clear_one_liners(tiny_pipeline, tmp_path):
    folder = tiny_pipeline("z-image")
    with pytest.raises(ValueError, match="unknown quantization method 'fp9'") as e:
        Engine(model=None, quantization="fp9")  # the embedded model
    _one_line(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        Engine(model=tmp_path / "missing")
    _one_line(e.value)
    with pytest.raises(ValueError, match="not a diffusers pipeline folder") as e:
        Engine(model=tmp_path)
    _one_line(e.value)
    with pytest.raises(ValueError, match=r"component 'text_encoder_2'.*its components: scheduler, text_encoder, "
                                         r"tokenizer, transformer, vae") as e:
        Engine(model=folder, quantization_config={"text_encoder_2": "fp8"})
    _one_line(e.value)
    with pytest.raises(ValueError, match="unknown quantization method 'fp9'; valid methods: .*fp8.*int8"):
        Engine(model=folder, quantization="fp9")
    with pytest.raises(ValueError, match="'tokenizer' has no weights"):
        Engine(model=folder, quantization_config={"tokenizer": "fp8"})
    with pytest.raises(ValueError, match="only 'fp8'"):
        Engine(model=folder, quantization_config={"vae": "int8"})
    with pytest.raises(ValueError, match="fp8 weight-only storage takes only ignored_layers; activation_scheme"):
        Engine(model=folder, quantization_config={"text_encoder": {"method": "fp8", "activation_scheme": "static",
                                                                   "input_scales": {"x": 1.0}}})
    with pytest.raises(ValueError, match="disagrees"):
        Engine(model=folder, quantization="int8", quantization_config={"method": "fp8"})
    with pytest.raises(NotImplementedError, match="cache_backend"):
        Engine(model=folder, cache_backend="tea_cache")
    with pytest.raises(ValueError, match="'img_mpl' matches no linear layer"):
        Engine(model=folder, quantization_config={"method": "fp8", "ignored_layers": ["img_mpl"]})


def test_bad_sampling_params(tiny_pipeline):
    engine = Engine(model=tiny_pipeline("z-image"))
    with pytest.raises(ValueError, match="num_frames is not a parameter of ZImagePipeline"):
        engine.generate("x", SamplingParams(num_frames=5))
    with pytest.raises(ValueError, match="prompt"):
        engine.generate([], SamplingParams())
    with pytest.raises(ValueError, match="num_inference_steps must be a positive int"):
        SamplingParams(num_inference_steps=0)
    with pytest.raises(ValueError, match="num_outputs_per_prompt must be a positive int"):
        SamplingParams(num_outputs_per_prompt=0)


def test_broken_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Engine(model=tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="no diffusion transformer component"):
        Engine(model=tmp_path, quantization="fp8")


def test_unknown_architecture_runs_with_generic_defaults_and_one_warning(tiny_pipeline):
    folder = tiny_pipeline("pixart-sigma")  # PixArt-Sigma: no diffquant profile
    with pytest.warns(UserWarning, match="no architecture profile for PixArtSigmaPipeline") as record:
        engine = Engine(model=folder, quantization="fp8")
    assert len([w for w in record if "architecture profile" in str(w.message)]) == 1
    assert engine.profile.name == "generic"
    report = engine.reports["transformer"]
    kept = {r.name for r in report.kept}
    assert {"adaln_single.linear", "caption_projection.linear_1", "proj_out"} <= kept
    assert "transformer_blocks.0.attn1.to_q" in {r.name for r in report.quantized}
    out = engine.generate("a red circle", sampling_for("pixart-sigma"), use_resolution_binning=False)
    assert out.images[0].size == (32, 32)


def test_user_step_callback_is_chained(tiny_pipeline):
    engine = Engine(model=tiny_pipeline("flux1-dev"), device="cpu")
    seen = []

    def callback(pipe, step, timestep, kwargs):
        seen.append(step)
        return kwargs

    out = engine.generate("x", SamplingParams(num_inference_steps=2, height=32, width=32, seed=0),
                          callback_on_step_end=callback)
    assert seen == [0, 1] and out.timings.get("steps") == 2


def test_vae_runs_in_float32_on_cpu(tiny_pipeline):
    """bf16 convolutions are slow on CPU, so a VAE with force_upcast runs in float32 there: weights
    float32, bf16 latents accepted by decode, encode hands bf16 latents back to the pipeline."""
    engine = Engine(model=tiny_pipeline("flux1-dev"), device="cpu")
    vae = engine.pipe.vae
    assert vae.config.force_upcast and vae.dtype == torch.float32
    assert engine.pipe.transformer.dtype == torch.bfloat16
    z = torch.randn(1, vae.config.latent_channels, 4, 4, dtype=torch.bfloat16)
    image = vae.decode(z).sample
    assert image.dtype == torch.float32 and image.shape[-1] == 4 * 2 ** (len(vae.config.block_out_channels) - 1)
    dist = vae.encode(image.to(torch.bfloat16)).latent_dist
    assert dist.mean.dtype == torch.bfloat16 and dist.sample().dtype == torch.bfloat16
    # not when the VAE itself is quantized, nor in float32
    assert "decode" not in vars(Engine(model=tiny_pipeline("flux1-dev"), quantization_config={"vae": "fp8"},
                                       device="cpu").pipe.vae)
    assert "decode" not in vars(Engine(model=tiny_pipeline("flux1-dev"), dtype=torch.float32, device="cpu").pipe.vae)
