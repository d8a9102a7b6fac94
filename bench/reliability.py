"""Try the bad cases of issue 15 and classify each outcome: clear message, traceback, or silent (wrong) result.

    .venv/bin/python bench/reliability.py

Runs in one process on the shipped miniature, in a scratch folder under the output folder (removed afterwards);
takes a few seconds. "clear" means one of the project's own errors (``SettingsError``, ``DataError``,
``AdapterBaseMismatch``) or a ``PATH:LINE: reason`` problem; "traceback" any other exception; "silent" that the
bad input was accepted.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils import config  # noqa: E402
from utils.data import DataError, check_chat_jsonl, context_length, load_chat_jsonl  # noqa: E402


def line(user: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "ok"}]},
                      ensure_ascii=False)


def data_case(text: str, **kwargs) -> Callable[[Path], str]:
    def run(tmp: Path) -> str:
        path = tmp / "data.jsonl"
        path.write_text(text, encoding="utf-8")
        if check_chat_jsonl(path, **kwargs):
            return "clear"
        load_chat_jsonl(path)
        return "ok"
    return run


def main() -> int:
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from utils.adapters import AdapterBaseMismatch, check_adapter_base, record_base
    from utils.atomic import atomic_folder
    from utils.miniature import require_shipped_miniature
    from utils.models import require_miniature_or_model
    from utils.training import last_complete_checkpoint

    base = require_shipped_miniature()
    tokenizer = AutoTokenizer.from_pretrained(base)

    def setting(env: dict[str, str], call: Callable[[], object] = require_miniature_or_model) -> Callable[[Path], str]:
        def run(tmp: Path) -> str:
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update({k: v.replace("TMP", str(tmp)) for k, v in env.items()})
            try:
                call()
                return "silent"
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return run

    def prepare(tmp: Path, what: str) -> None:
        (tmp / "empty").mkdir(exist_ok=True)
        (tmp / "noconfig").mkdir(exist_ok=True)
        (tmp / "noconfig" / "x.bin").write_bytes(b"x")
        (tmp / "afile").write_text("x")

    def symlink_loop(tmp: Path) -> str:
        loop = tmp / "loop.jsonl"
        loop.symlink_to(loop)
        return "clear" if check_chat_jsonl(loop) else "silent"

    def wrong_base(tmp: Path) -> str:
        adapter, other = tmp / "adapter", tmp / "other"
        adapter.mkdir()
        record_base(adapter, base)
        shutil.copytree(base, other)
        tensors = load_file(str(other / "model.safetensors"))
        key = sorted(tensors)[0]
        tensors[key] = tensors[key] + 1e-3
        save_file(tensors, str(other / "model.safetensors"))
        check_adapter_base(adapter, other)
        return "silent"

    def smaller_vocab(tmp: Path) -> str:
        adapter, other = tmp / "adapter", tmp / "small"
        adapter.mkdir()
        tokenizer.save_pretrained(adapter)
        shutil.copytree(base, other)
        cfg = json.loads((other / "config.json").read_text())
        cfg["vocab_size"] = len(tokenizer) // 2
        (other / "config.json").write_text(json.dumps(cfg))
        check_adapter_base(adapter, other)
        return "silent"

    def interrupted_save(tmp: Path) -> str:
        target = tmp / "merged"
        with atomic_folder(target) as staging:
            (staging / "w").write_text("v1")
        try:
            with atomic_folder(target) as staging:
                (staging / "w").write_text("half")
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
        return "clear" if (target / "w").read_text() == "v1" and [p.name for p in tmp.iterdir() if "merged" in p.name] == ["merged"] else "silent"

    def partial_checkpoint(tmp: Path) -> str:
        (tmp / "checkpoint-10").mkdir()
        (tmp / "checkpoint-20").mkdir()
        (tmp / "checkpoint-20" / "trainer_state.json").write_text("{}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = last_complete_checkpoint(tmp)
        return "clear" if found is None and len(caught) == 2 else "silent"

    def truncated_base(tmp: Path) -> str:
        copy = tmp / "phi3-miniature"
        shutil.copytree(base, copy)
        weights = copy / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
        require_shipped_miniature(copy)
        return "silent"

    long_text = " ".join(["word"] * 5000)
    cases: list[tuple[str, str, Callable[[Path], str]]] = [
        ("data", "U+2028 inside content", data_case(line("a\u2028b") + "\n")),
        ("data", "U+0085 / \\x0b / \\r inside content", data_case(line("a\u0085b\x0bc\rd") + "\n")),
        ("data", "lone surrogate escape", data_case(line("X").replace("X", "\\ud800") + "\n")),
        ("data", "symlink loop as data", symlink_loop),
        ("data", "conversation longer than the context", data_case(line(long_text) + "\n", tokenizer=tokenizer,
                                                                  max_tokens=context_length(str(base)))),
        ("settings", "PHI3_MODEL_ID missing folder", setting({"PHI3_MODEL_ID": "TMP/missing"})),
        ("settings", "PHI3_MODEL_ID empty folder", setting({"PHI3_MODEL_ID": "TMP/empty"})),
        ("settings", "PHI3_MODEL_ID folder without config.json", setting({"PHI3_MODEL_ID": "TMP/noconfig"})),
        ("settings", "hub id typo while offline", setting({"PHI3_MODEL_ID": "microsoft/Phi-3-mini-4k-instruc",
                                                           "HF_HUB_OFFLINE": "1"})),
        ("settings", "PHI3_LAB_OUTPUTS is a file", setting({"PHI3_LAB_OUTPUTS": "TMP/afile"}, config.check_outputs_dir)),
        ("adapters", "adapter on a rebuilt base", wrong_base),
        ("adapters", "base with a smaller vocabulary", smaller_vocab),
        ("saves", "interrupted merged-model save", interrupted_save),
        ("saves", "empty / partial checkpoints on resume", partial_checkpoint),
        ("saves", "truncated base weights", truncated_base),
    ]
    expected = {"U+2028 inside content": "ok", "U+0085 / \\x0b / \\r inside content": "ok"}
    counts: Counter[str] = Counter()
    print(f"{'area':<9} {'case':<42} outcome")
    with config.scratch_dir("reliability") as scratch:
        for i, (area, name, run) in enumerate(cases):
            tmp = scratch / str(i)
            tmp.mkdir()
            prepare(tmp, name)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    outcome = run(tmp)
            except (config.SettingsError, DataError, AdapterBaseMismatch) as err:
                outcome = "clear" if str(err).strip() else "traceback"
            except Exception as err:  # noqa: BLE001 - this is what the bench measures
                outcome = f"traceback ({type(err).__name__})"
            if name in expected:
                outcome = "accepted and loaded (correct)" if outcome == "ok" else outcome
            counts[outcome.split(" ")[0]] += 1
            print(f"{area:<9} {name:<42} {outcome}")
    print(f"\n{len(cases)} cases: {counts['clear']} clear one-line errors, {counts['accepted']} valid inputs accepted, "
          f"{counts['traceback']} tracebacks, {counts['silent'] + counts['ok']} silent results")
    return 0 if counts["traceback"] + counts["silent"] + counts["ok"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
