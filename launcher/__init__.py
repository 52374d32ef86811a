"""ftlaunch: fine-tune FLAN-T5 for dialogue summarization on one GPU, many GPUs or many nodes."""

__version__ = "0.1.0"
