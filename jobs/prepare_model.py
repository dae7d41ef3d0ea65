"""Prepare the embedded default model once (GGUF -> safetensors folder in the local cache).

Usage:
    python jobs/prepare_model.py [NAME]     # default: SmolLM2-135M-Instruct
"""

import sys

from runner.input import prepare_embedded_model

if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "SmolLM2-135M-Instruct"
    print(f"embedded model ready: {prepare_embedded_model(name)}")
