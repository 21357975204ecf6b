"""Diffusion math: noise schedules, parameterizations, samplers, guidance, losses."""
