"""Model loading, specs and the bundled toy models."""

DEFAULT_MODEL = "glide-small"  # what the CLI serves and generates with when no --model is given
