"""What runs in each rank under `accelerate launch`: distributed setup, data batches, model, the
training loop and its neighbours, checkpoints saved, generation, the final export."""
