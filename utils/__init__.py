"""Phi-3 LoRA Lab: small, tested helpers shared by the notebooks.

Modules are grouped by what they are about: ``config`` (paths, settings and their checks, offline switches),
``prompts`` (chat template and special tokens), ``data`` (loading and checking chat JSONL), ``convert`` (other
formats to chat JSONL), ``skills`` and ``miniature`` (the shipped miniature Phi-3's corpus and build), ``models``
(hardware report and model loading), ``training`` (the shared recipe dictionaries and run bookkeeping), ``adapters``
and ``atomic`` (adapters that know their base, saves that are never half-written), ``metrics`` and ``evaluation``
(scoring), ``quantization`` (QLoRA), ``loralib_tools`` (chapter 02), ``deployment`` (chapter 07), ``experiments``
(chapter 08), ``exercises`` (answer checks) and ``plots``.
"""
