"""Wall and CPU seconds of chapter 07's GGUF section alone, on the outputs of chapters 01-04:

    .venv/bin/python bench/gguf_section_time.py

The chapter's steps in the chapter's order: llama.cpp's converter to f16 (its own Python), the quantizer to Q8_0
and Q4_K_M, then for each file the held-out prompts tokenized by llama.cpp and answered greedily (48 new tokens at
most). CPU seconds (this process and its children) do not grow with other work on the machine; wall seconds do,
so the machine's load average is printed beside them. Writes into ``outputs/bench/gguf/``.
"""

from __future__ import annotations

import os
import resource
import time


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    from llama_cpp import Llama

    from utils import config
    from utils.data import load_splits
    from utils.gguf import add_sentencepiece_model, convert_to_gguf, converter_folder, llama_generate, quantize_gguf
    from utils.models import load_tokenizer, require_output
    from utils.prompts import prompt_messages, render_prompt

    out = config.outputs_dir() / "bench" / "gguf"
    merged = require_output(config.adapter_dir("lora_merged"), "04_qlora_finetuning.ipynb")
    tokenizer = load_tokenizer(str(merged))
    texts = [render_prompt(tokenizer, prompt_messages(r["messages"])) for r in load_splits(config.split_dir())["test"]]
    marks = [(time.perf_counter(), cpu_seconds())]
    script = converter_folder(config.outputs_dir() / "tools") / "convert_hf_to_gguf.py"
    add_sentencepiece_model(merged, config.miniature_dir())
    f16 = convert_to_gguf(script, merged, out / "lora-f16.gguf")
    marks.append((time.perf_counter(), cpu_seconds()))
    files = [f16.path, *(quantize_gguf(f16.path, out / f"lora-{q}.gguf", q).path for q in ("Q8_0", "Q4_K_M"))]
    marks.append((time.perf_counter(), cpu_seconds()))
    for path in files:
        llm = Llama(model_path=str(path), n_ctx=512, verbose=False)
        for text in texts:
            llm.tokenize(text.encode(), add_bos=False, special=True)
        llama_generate(llm, texts, 48)
        del llm
    marks.append((time.perf_counter(), cpu_seconds()))
    steps = ["convert to f16", "quantize Q8_0 + Q4_K_M", f"3 files x {len(texts)} prompts"]
    for name, (w0, c0), (w1, c1) in zip(steps, marks, marks[1:]):
        print(f"{name:28s} {w1 - w0:6.1f} s wall {c1 - c0:6.1f} s CPU")
    print(f"{'total':28s} {marks[-1][0] - marks[0][0]:6.1f} s wall {marks[-1][1] - marks[0][1]:6.1f} s CPU; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
