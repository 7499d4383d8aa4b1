"""The embedded default model: a tiny FLUX-architecture text-to-image pipeline we train ourselves
on procedurally generated, captioned shape images (see scripts/train_tiny_model.py)."""
