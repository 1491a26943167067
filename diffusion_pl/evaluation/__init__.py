"""diffusion_pl.evaluation"""
