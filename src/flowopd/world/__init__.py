"""The embedded synthetic world: 32x32 flat shapes and bitmap text with exact scorers.

- ``spec``    the vocabulary: shapes, palette, GenEval tags and relations, ``relative_position``
- ``prompts`` deterministic GenEval-schema and OCR records per split, JSONL I/O
- ``render``  ground-truth renders (``render_batch(records, seed) -> (B, 3, 32, 32)``)
- ``font``    the 3x5 bitmap font of the text task

The scorers live in ``flowopd.rewards.toy`` (``toy_geneval``, ``toy_geneval_strict``,
``toy_ocr``, ``toy_quality``, ``geneval_metric``). Submodules are imported explicitly so
that reading prompts does not import torch.
"""
