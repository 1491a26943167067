"""diffusion_pl.models"""
