"""The `ftlaunch` process on the login/head node: command line, recipe resolution, pre-launch checks,
rendering, launching and supervising ranks, sweeps, estimates. Imports no torch/transformers/
deepspeed/datasets at module import; rank modules only inside functions, for in-process commands."""
