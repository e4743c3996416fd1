"""The WEMoE model files: configuration, modeling and kernels.

These modules import only the standard library, torch, transformers and each other (relative imports), because
`save_pretrained` copies them into every saved folder and Hub repo, where they run without this package.
"""

# transformers is loaded before any model module starts: the package registers the Auto classes as soon as
# transformers has loaded, which imports the model modules, and none of them may then be half-imported.
import transformers  # noqa: F401
