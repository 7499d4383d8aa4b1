"""Quality tools: compare a reference and a candidate run of one diffusion pipeline."""
