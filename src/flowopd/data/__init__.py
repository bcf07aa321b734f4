"""Prompt data: readers of the published prompt formats and the GenEval training-set generator.

- ``text.read_text_lines``: a text file's lines, with one-line errors for binary / non-UTF-8 files;
- ``prompts.read_prompt_file``: GenEval metadata JSONL, OCR ``.txt`` (quoted targets), plain
  prompt ``.txt`` (PickScore, DrawBench) or prompt-record JSONL, told apart by content;
- ``geneval_train``: GenEval's own prompt generator, and training metadata disjoint from the
  GenEval test prompts (``flowopd data geneval-train``).

Submodules are imported explicitly (``from flowopd.data.prompts import ...``): the rewards import
``text`` without pulling in the readers that import the rewards.
"""
