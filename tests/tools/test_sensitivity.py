"""Layer sensitivity on a tiny FLUX pipeline with one deliberately fragile layer group.

The fragile group is transformer_blocks.0.ff: hidden unit 0 of ff.net.0 is forced to GELU(-100) = 0
and ff.net.2 gets a 1e6 outlier in input column 0. The bf16 output does not see the outlier (it
multiplies a zero activation), but per-output-channel int8 quantization of ff.net.2 scales every
row by 1e6/127, so all its other weights round to zero. "ff" must rank first, and the greedy
ignored_layers for a 40 dB target must be exactly ["ff"].
"""

from __future__ import annotations

import json

import pytest
import torch

from diffquant.cli import main
from diffquant.engine import Engine, SamplingParams
from diffquant.quantization import build_quant_config
from diffquant.quantization.tools.runs import output_array
from diffquant.quantization.tools.sensitivity import (
    layer_groups,
    layer_sensitivity,
    name_key,
    prune_redundant,
    split_block,
)

PARAMS = SamplingParams(num_inference_steps=1, height=16, width=16, seed=0)
FLUX_NAMES = ["time_text_embed.timestep_embedder.linear_1", "transformer_blocks.0.attn.to_q",
              "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.add_k_proj",
              "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
              "transformer_blocks.1.ff_context.net.2", "single_transformer_blocks.0.proj_mlp",
              "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.attn.to_q", "proj_out"]


def test_group_names():
    assert split_block("transformer_blocks.3.attn.to_q") == ("transformer_blocks.3", ["attn", "to_q"])
    assert split_block("proj_out") == (None, ["proj_out"])
    assert [name_key(n) for n in FLUX_NAMES[1:]] == [
        "attn.to_q", "attn.to_out", "attn.add_k_proj", "ff", "ff", "ff_context", "proj_mlp", "proj_out", "attn.to_q",
        "proj_out"]
    groups = {g.pattern: g for g in layer_groups(FLUX_NAMES)}
    assert groups["ff"].layers == ("transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2")
    assert groups["attn.to_q"].layers == ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_q")
    assert groups["transformer_blocks.1"].kind == "blocks"
    assert groups["transformer_blocks.1"].layers == ("transformer_blocks.1.ff_context.net.2",)
    assert "single_transformer_blocks.0.proj_out" in groups["single_transformer_blocks.0"].layers
    assert {g.kind for g in layer_groups(FLUX_NAMES, ("blocks",))} == {"blocks"}


def test_prune_redundant_groups():
    layers = {"transformer_blocks.1": {"b1.ff", "b1.q"}, "ff": {"b0.ff", "b1.ff"}, "transformer_blocks.0": {"b0.ff"},
              "attn.to_q": {"b1.q"}}
    assert prune_redundant(["transformer_blocks.1", "ff", "transformer_blocks.0"], layers) == [
        "transformer_blocks.1", "transformer_blocks.0"]
    assert prune_redundant(["ff", "attn.to_q"], layers) == ["ff", "attn.to_q"]
    assert prune_redundant(["transformer_blocks.1", "ff", "transformer_blocks.0", "attn.to_q"], layers) == [
        "ff", "attn.to_q"]


@pytest.fixture(scope="module")
def fragile_engine(tiny_flux):
    engine = Engine(tiny_flux, device="cpu")
    ff = engine.pipe.transformer.transformer_blocks[0].ff
    with torch.no_grad():
        ff.net[0].proj.weight[0].zero_()
        ff.net[0].proj.bias[0] = -100.0  # hidden unit 0: GELU(-100) == 0
        ff.net[2].weight.mul_(30)  # make the block's MLP matter for the (random-weight) output
        ff.net[2].weight[:, 0] = 1e6  # outlier column that only multiplies that zero unit
    return engine


def test_fragile_group_ranks_first_and_greedy_ignores_it(fragile_engine):
    reference = output_array(fragile_engine.generate("a red circle", PARAMS), "t2i")
    result = layer_sensitivity(fragile_engine, build_quant_config("int8"), reference, "a red circle", PARAMS,
                               target_psnr=40.0, kinds=("names",))
    ranking = result["ranking"]
    assert ranking[0]["pattern"] == "ff", ranking[:3]
    assert ranking[0]["psnr_db"] < 30 and ranking[1]["psnr_db"] > 40
    greedy = result["greedy"]
    assert greedy["reached"] and greedy["ignored_layers"] == ["ff"]
    assert greedy["steps"][0]["psnr_db"] < 30 and greedy["steps"][-1]["psnr_db"] >= 40
    # the engine's own transformer is untouched (variants are quantized copies)
    assert not any(type(m).__name__ == "QuantLinear" for m in fragile_engine.pipe.transformer.modules())


def test_sensitivity_through_the_cli(tiny_flux, tmp_path, capsys):
    out = tmp_path / "s.json"
    rc = main(["compare", "--model", str(tiny_flux), "--candidate-quantization", "int8", "--num-inference-steps", "1",
               "--height", "16", "--width", "16", "--sensitivity", "--sensitivity-groups", "blocks",
               "--target-psnr", "200", "--output-json", str(out)])
    assert rc == 0
    sens = json.loads(out.read_text())["sensitivity"]
    assert sorted(r["pattern"] for r in sens["ranking"]) == ["single_transformer_blocks.0", "transformer_blocks.0"]
    greedy = sens["greedy"]  # 200 dB is out of reach: every group gets ignored, nothing is left to quantize
    assert greedy["steps"][0]["ignored_layers"] == [] and "nothing left to quantize" in greedy["steps"][-1]["note"]
    assert not greedy["reached"] and greedy["ignored_layers"] is None
    printed = capsys.readouterr().out
    assert "sensitivity (int8, each group quantized alone; worst first):" in printed
    assert "target psnr_db 200 not reached while quantizing any layer group" in printed
