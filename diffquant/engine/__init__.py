"""Engine: load a diffusers pipeline folder, quantize per component while loading, generate."""

from diffquant.engine.engine import Engine, GenerationOutput, SamplingParams
from diffquant.engine.models import PROFILES, ArchitectureProfile, detect_profile

__all__ = ["PROFILES", "ArchitectureProfile", "Engine", "GenerationOutput", "SamplingParams", "detect_profile"]
