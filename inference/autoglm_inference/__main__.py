"""``python -m autoglm_inference --model-name NAME --model-uri URI ...``: ``autoglm serve`` alone."""

from autoglm_inference.cli import main

main()
