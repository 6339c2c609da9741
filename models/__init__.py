"""Models the project compiles and evaluates (built from locally installed weights, no downloads)."""
