"""lm-eval task files (YAML) and the functions they name; pass this folder as ``--include_path``."""
