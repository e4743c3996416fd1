"""Small helpers shared by every layer above the model files: stdlib only, so any module may import them."""
