"""Registry of the networks the pipeline compiles (placeholder: filled in by the models work)."""
