"""What both sides share: the recipe schema, the run directory and its files (checkpoints, logs,
metrics), model facts, dialogue files, errors. Imports nothing from host, rank or results, and no
torch/transformers/deepspeed/datasets at import."""
