"""Configuration, torch-free: what every key of `config/*.yaml` means, and the one check run before any job.

`schema` (the JSON schema, `ConfigError`, a variant's merged train block), `model` (the model and training settings,
declared once), `functions` (function sets), `datasets` (layouts and splits), `downstream`, `demo` (the demo world's
specs), `backbones` (the widths and depths known before any model loads), `check` (`check(config)`, called once by the
Snakefile). Stages import these; nothing here imports a stage
beyond the image-layout registry and the download item checks.
"""
