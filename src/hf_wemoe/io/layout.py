"""The file names of a model folder, as hf-wemoe reads and writes it: one home for every name."""

from __future__ import annotations

CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
# A PEFT adapter folder (read as an expert: `hf_wemoe.io.adapters`).
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_SAFETENSORS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"
CARD_NAME = "README.md"
MERGE_CONFIG_NAME = "merge_config.yaml"
EVAL_RESULTS_NAME = "eval_results.json"
ROUTING_PLOT_NAME = "routing.png"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
# Tokenizer files of a CLIP checkpoint (transformers 4 and 5 layouts); a folder has whichever its tokenizer uses.
TOKENIZER_FILES = (
    TOKENIZER_CONFIG_NAME,
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_PICKLE_NAME",
    "ADAPTER_SAFETENSORS_NAME",
    "CARD_NAME",
    "CONFIG_NAME",
    "EVAL_RESULTS_NAME",
    "MERGE_CONFIG_NAME",
    "PICKLE_INDEX_NAME",
    "PICKLE_NAME",
    "PREPROCESSOR_NAME",
    "ROUTING_PLOT_NAME",
    "SAFETENSORS_INDEX_NAME",
    "SAFETENSORS_NAME",
    "TOKENIZER_CONFIG_NAME",
    "TOKENIZER_FILES",
]
