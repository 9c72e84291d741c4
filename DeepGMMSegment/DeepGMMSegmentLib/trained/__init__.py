"""Trained models (torch): the model file, inference with a trained network, multi-image training, DDP."""
