"""Pretrained diffusers / transformers checkpoints in jaxdiff: configs -> modules, weights -> parameters."""
