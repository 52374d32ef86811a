"""Reading a run's results: ROUGE, scoring predictions, the report, the model card. Imports core only."""
