"""Serving: ONNX export, a Triton Inference Server for txt2img (through PyTriton), and a
standard Triton model repository for a Triton of one's own.

onnx_export.py writes the four ONNX graphs (edge module shells over the same params) and
pipeline.json; requests.py turns Triton requests into pipeline calls (validation, limits,
grouping by settings, per-image seeds) for both servers; serve.py is the PyTriton server
run_serve.py starts; repository.py writes the model repository run_export.py
--triton_repo makes, and backend_model.py is the python-backend model it serves.
"""
