"""``python -m common.models convert-smollm2 --cache-dir data/lm/models``: the GGUF conversion.

The pipeline runs it as a stage so the dequantized safetensors copy lives in the DVC cache and every
extraction reuses it.
"""

import argparse

from common.models.loading import DEFAULT_CACHE_DIR, convert_smollm2

parser = argparse.ArgumentParser(prog="python -m common.models", description=__doc__)
sub = parser.add_subparsers(dest="command", required=True)
convert = sub.add_parser("convert-smollm2", help="dequantize SmolLM2-135M-Instruct Q4_1 once")
convert.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
args = parser.parse_args()
print(f"SmolLM2 (Q4_1-dequantized) at {convert_smollm2(args.cache_dir)}")
