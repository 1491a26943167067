"""diffusion_pl.diffusion"""
