"""Reading diffusers-format Stable Diffusion folders: weights, tokenizer, scheduler, layout."""
