"""The three Stable Diffusion networks as pure functions: unet, autoencoder, text_encoder."""
