"""Chapter 07's GGUF helpers: llama.cpp's converter and quantizer on the shipped base, llama-cpp-python's answers
against transformers' on the held-out split, and the pure parts (archive unpacking, commands, the Modelfile)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from utils import config
from utils.gguf import (CONVERTER, GGUFFile, add_sentencepiece_model, convert_command, convert_to_gguf,
                        converter_folder, llama_generate, model_name_for_llama_cpp, ollama_modelfile, quantize_command,
                        quantize_gguf, stop_ids, tensor_types, unpack_converter, write_modelfile)


def heldout_prompts() -> list[list[dict]]:
    from utils.prompts import prompt_messages

    rows = [json.loads(line) for line in config.DATASET_TEST.read_text().splitlines() if line.strip()]
    return [prompt_messages(row["messages"]) for row in rows]


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, GGUFFile]:
    """The shipped base converted by llama.cpp's own converter at f16, then quantized to Q8_0 and Q4_K_M."""
    folder = tmp_path_factory.mktemp("gguf")
    script = converter_folder(config.outputs_dir() / "tools") / CONVERTER
    f16 = convert_to_gguf(script, config.miniature_dir(), folder / "base-f16.gguf", "f16")
    return {"f16": f16, **{q: quantize_gguf(f16.path, folder / f"base-{q}.gguf", q) for q in ("Q8_0", "Q4_K_M")}}


def test_f16_file_answers_like_transformers_on_the_heldout_split(base_gguf: dict[str, GGUFFile]):
    """The goal of chapter 07's GGUF section: the 16-bit file gives transformers' greedy answer on >= 98% of the
    held-out requests, reading every prompt as the same tokens."""
    from llama_cpp import Llama

    from utils.metrics import generate
    from utils.models import load_model, load_tokenizer
    from utils.prompts import render_prompt

    prompts = heldout_prompts()
    tokenizer = load_tokenizer(str(config.miniature_dir()))
    reference = generate(load_model(str(config.miniature_dir())), tokenizer, prompts, max_new_tokens=48)
    texts = [render_prompt(tokenizer, p) for p in prompts]
    llm = Llama(model_path=str(base_gguf["f16"].path), n_ctx=512, verbose=False)
    same_tokens = sum(llm.tokenize(t.encode(), add_bos=False, special=True)
                      == tokenizer(t, add_special_tokens=False).input_ids for t in texts)
    answers = llama_generate(llm, texts, max_new_tokens=48)
    same = sum(a.text == r.text for a, r in zip(answers, reference))
    assert len(prompts) >= 100 and same_tokens == len(prompts)
    assert same >= 0.98 * len(prompts), f"{same} of {len(prompts)} answers equal transformers'"
    assert sum(a.stopped == r.stopped for a, r in zip(answers, reference)) >= 0.98 * len(prompts)


def test_quantized_files_are_smaller_and_hold_what_the_quantizer_wrote(base_gguf: dict[str, GGUFFile]):
    sizes = {k: g.path.stat().st_size for k, g in base_gguf.items()}
    assert sizes["Q4_K_M"] < sizes["Q8_0"] < sizes["f16"]
    f16, q8 = tensor_types(base_gguf["f16"].path), tensor_types(base_gguf["Q8_0"].path)
    assert set(f16) == {"F16", "F32"} and "Q8_0" in q8 and "F16" not in q8
    q4 = tensor_types(base_gguf["Q4_K_M"].path)
    assert "F16" not in q4 and set(q4) - {"F32"}  # every matrix quantized, to whatever type its rows allow
    assert base_gguf["Q4_K_M"].command.endswith("Q4_K_M") and base_gguf["Q4_K_M"].kind == "Q4_K_M"
    log = (base_gguf["Q4_K_M"].path.parent / "logs" / "base-Q4_K_M.log").read_text()
    assert "q4_K" in log or "Q4_K" in log  # the quantizer's own report, kept out of the notebook


def test_stop_tokens_are_single_tokens_and_answers_say_whether_they_stopped(base_gguf: dict[str, GGUFFile]):
    from llama_cpp import Llama

    llm = Llama(model_path=str(base_gguf["Q8_0"].path), n_ctx=512, verbose=False)
    ids = stop_ids(llm)
    assert len(set(ids.values())) == 2
    with pytest.raises(ValueError, match="not one token"):
        stop_ids(llm, ["two words"])
    answers = llama_generate(llm, ["<|user|>\nhello<|end|>\n<|assistant|>\n"], max_new_tokens=3)
    assert len(answers) == 1 and isinstance(answers[0].text, str)


def test_quantizer_and_converter_refuse_what_they_cannot_do(tmp_path: Path):
    with pytest.raises(ValueError, match="Q4_K_M"):
        quantize_gguf(tmp_path / "x.gguf", tmp_path / "y.gguf", "Q3_XYZ")
    with pytest.raises(FileNotFoundError, match="convert the model to GGUF first"):
        quantize_gguf(tmp_path / "missing.gguf", tmp_path / "y.gguf", "Q8_0")
    (tmp_path / "adapter").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        convert_to_gguf("convert.py", tmp_path / "adapter", tmp_path / "out.gguf")
    with pytest.raises(ValueError, match="q4"):
        convert_to_gguf("convert.py", tmp_path / "adapter", tmp_path / "out.gguf", "q4")


def test_a_failing_converter_leaves_no_file_and_names_its_log(tmp_path: Path):
    script = tmp_path / "convert.py"
    script.write_text("import sys\nprint('ValueError: Missing tokenizer.model', file=sys.stderr)\nsys.exit(1)\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match=r"out\.log: the converter stopped \(exit 1\): ValueError: Missing"):
        convert_to_gguf(script, tmp_path / "model", tmp_path / "out" / "out.gguf")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["logs"]


def test_commands_are_the_command_lines():
    assert convert_command("llama.cpp/convert_hf_to_gguf.py", "outputs/lora merged", "m.gguf", "q8_0") == (
        "python llama.cpp/convert_hf_to_gguf.py 'outputs/lora merged' --outfile m.gguf --outtype q8_0")
    assert quantize_command("m-f16.gguf", "m-q4.gguf", "q4_k_m") == "llama-quantize m-f16.gguf m-q4.gguf Q4_K_M"


def _archive(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_unpack_keeps_only_the_converters_parts(tmp_path: Path):
    root = "llama_cpp_python-9.9.9/vendor/llama.cpp"
    archive = _archive(tmp_path / "src.tar.gz", {
        f"{root}/{CONVERTER}": "print('convert')", f"{root}/conversion/phi.py": "",
        f"{root}/gguf-py/gguf/__init__.py": "",
        f"{root}/LICENSE": "MIT", f"{root}/src/llama.cpp": "// big", "llama_cpp_python-9.9.9/llama_cpp/llama.py": ""})
    folder = unpack_converter(archive, tmp_path / "llama.cpp-9.9.9")
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == sorted([
        "LICENSE", CONVERTER, "conversion/phi.py", "gguf-py/gguf/__init__.py"])
    # a llama.cpp source archive has the parts at its top level
    plain = unpack_converter(_archive(tmp_path / "plain.tar.gz", {f"llama.cpp-b1/{CONVERTER}": ""}), tmp_path / "p")
    assert (plain / CONVERTER).is_file()
    with pytest.raises(FileNotFoundError, match="no convert_hf_to_gguf.py inside"):
        unpack_converter(_archive(tmp_path / "other.tar.gz", {"x/README": ""}), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_converter_folder_is_found_in_the_cache_or_in_LLAMA_CPP_DIR(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cached = tmp_path / "tools" / "llama.cpp-1.2.3"
    cached.mkdir(parents=True)
    (cached / CONVERTER).write_text("")
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    assert converter_folder(tmp_path / "tools", "1.2.3") == cached  # no download when it is there
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path / "checkout"))
    with pytest.raises(FileNotFoundError, match="LLAMA_CPP_DIR=.*no convert_hf_to_gguf.py"):
        converter_folder(tmp_path / "tools")
    monkeypatch.setenv("LLAMA_CPP_DIR", str(cached))
    assert converter_folder(tmp_path / "elsewhere") == cached


def test_sentencepiece_model_is_copied_only_when_missing(tmp_path: Path):
    base, merged = tmp_path / "base", tmp_path / "merged"
    base.mkdir()
    merged.mkdir()
    with pytest.raises(FileNotFoundError, match="needs the base model's SentencePiece tokenizer.model"):
        add_sentencepiece_model(merged, base)
    (base / "tokenizer.model").write_bytes(b"spm")
    assert add_sentencepiece_model(merged, base).read_bytes() == b"spm"
    (base / "tokenizer.model").write_bytes(b"changed")
    assert add_sentencepiece_model(merged, base).read_bytes() == b"spm"


def test_modelfile_points_at_the_file_beside_it_with_phi3s_format(tmp_path: Path):
    text = ollama_modelfile("lora-Q4_K_M.gguf", system="Answer with one ticket line.")
    lines = text.splitlines()
    assert lines[0] == "FROM ./lora-Q4_K_M.gguf"
    assert {f'PARAMETER stop "{s}"' for s in ("<|end|>", "<|endoftext|>", "<|user|>")} <= set(lines)
    assert "<|{{ .Role }}|>\n{{ .Content }}<|end|>\n" in text and "<|assistant|>\n{{ end }}" in text
    assert 'SYSTEM """Answer with one ticket line."""' in lines and "PARAMETER temperature 0" in lines
    with pytest.raises(ValueError, match="give the GGUF file's name"):
        ollama_modelfile("outputs/x.gguf")
    with pytest.raises(FileNotFoundError, match="FROM line would point at nothing"):
        write_modelfile(tmp_path / "missing.gguf")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    path = write_modelfile(tmp_path / "m.gguf")
    assert path == tmp_path / "Modelfile" and path.read_text().startswith("FROM ./m.gguf\n")


def test_the_gguf_name_says_phi3_exactly_when_the_tokenizer_strips_after_chat_tokens(tmp_path: Path):
    """llama.cpp strips the whitespace after Phi-3's chat tokens for models named phi3/phi-3, and only for them."""
    def folder(name: str, rstrip: bool) -> Path:
        path = tmp_path / name
        path.mkdir()
        added = [{"id": 1, "content": "<|endoftext|>", "rstrip": False},
                 {"id": 2, "content": "<|user|>", "rstrip": rstrip}]
        (path / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
        return path

    assert model_name_for_llama_cpp(folder("phi3-miniature", False)) == "miniature"
    assert model_name_for_llama_cpp(folder("lora_merged", True)) == "Phi-3 lora merged"
    assert model_name_for_llama_cpp(folder("Phi-3", False)) == "model"
    # The shipped base strips after its chat tokens, as Phi-3 does, so llama.cpp must be told it is a Phi-3.
    assert "phi-3" in model_name_for_llama_cpp(config.miniature_dir()).lower()
    assert convert_command("c.py", "m", "o.gguf", "f16", "Phi-3 x").endswith("--model-name 'Phi-3 x'")
