"""Phi-3 LoRA Lab: small, tested helpers shared by the notebooks.

Modules are grouped by what they are about: ``config`` (paths and settings), ``prompts`` (chat template and
special tokens), ``data`` (loading and checking chat JSONL), ``miniature`` (the offline miniature Phi-3),
``models`` (hardware report and model loading), ``training`` (the shared TRL recipe), ``metrics``
(evaluation) and ``plots``.
"""
