"""The WEMoE model files: configuration, modeling and kernels.

These modules import only the standard library, torch, transformers and each other (relative imports), because
`save_pretrained` copies them into every saved folder and Hub repo, where they run without this package.
"""
