"""Evaluation of generated images: prompt accuracy on the synthetic shapes (shapes.py, prompts.py), FID
(fid.py), CLIP score (clip_score.py) and the FID-CLIP curve over guidance scales (fid_clip.py, run_eval.py)."""
