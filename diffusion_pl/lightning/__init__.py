"""diffusion_pl.lightning"""
