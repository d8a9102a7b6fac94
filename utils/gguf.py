"""GGUF helpers for chapter 07: llama.cpp's converter and quantizer, greedy answers with llama-cpp-python, a Modelfile.

What the chapter teaches (``Llama(...)``, ``tokenize(..., special=True)``, ``create_completion``, reading a GGUF file
with ``gguf.GGUFReader``) is written in its cells; this module holds what is not the lesson: finding llama.cpp's
``convert_hf_to_gguf.py`` (it ships in the llama-cpp-python *source* package, not in the installed one), running it
and the quantizer with their logs kept out of the notebook, the generation loop over many prompts, and the text of
an Ollama Modelfile.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.metrics import Generation
from utils.prompts import ASSISTANT, END, ENDOFTEXT, SYSTEM, USER

PACKAGE = "llama-cpp-python"
CONVERTER = "convert_hf_to_gguf.py"
# What the converter needs from llama.cpp's tree: the script, its model classes, its own copy of the gguf package.
CONVERTER_PARTS = (CONVERTER, "conversion", "gguf-py", "LICENSE")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # the converter's --outtype choices used here
STOPS = (END, ENDOFTEXT)


@dataclass(frozen=True)
class GGUFFile:
    """One GGUF file written by llama.cpp's converter or quantizer: where, which type, the command, the time."""

    path: Path
    kind: str
    command: str
    seconds: float


# --- the converter ----------------------------------------------------------------------------------------------

def installed_version() -> str:
    """The installed llama-cpp-python's version (the converter must come from the same llama.cpp)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        raise ModuleNotFoundError(f"{PACKAGE} is not installed: pip install -r requirements-deploy.txt "
                                  "(it builds llama.cpp from source: several minutes)") from None


def converter_folder(cache: str | Path, version: str | None = None) -> Path:
    """The folder that holds llama.cpp's ``convert_hf_to_gguf.py`` for ``version`` (default: the installed one).

    ``pip install llama-cpp-python`` installs the bindings and the compiled library, not llama.cpp's Python tools;
    they are in its source package under ``vendor/llama.cpp/``. The first call fetches that package with ``pip
    download --no-deps --no-binary llama-cpp-python llama-cpp-python==VERSION`` (from pip's cache when the install
    left it there, else from the package index: about 77 MB) and keeps only the converter's parts in
    ``CACHE/llama.cpp-VERSION/``; later calls find them there. ``LLAMA_CPP_DIR`` (a llama.cpp checkout) overrides.
    """
    own = os.environ.get("LLAMA_CPP_DIR")
    if own:
        if not (Path(own) / CONVERTER).is_file():
            raise FileNotFoundError(f"LLAMA_CPP_DIR={own}: no {CONVERTER} there; point it at a llama.cpp checkout "
                                    "or unset it")
        return Path(own)
    version = version or installed_version()
    folder = Path(cache) / f"llama.cpp-{version}"
    if (folder / CONVERTER).is_file():
        return folder
    with tempfile.TemporaryDirectory(dir=_mkdir(Path(cache))) as tmp:
        pip = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", PACKAGE,
                              f"{PACKAGE}=={version}", "-d", tmp], capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("*.tar.gz"))
        if pip.returncode or not archives:
            last = (pip.stderr.strip().splitlines() or ["no source package found"])[-1]
            raise RuntimeError(f"could not download the {PACKAGE} {version} source package ({last}); download it "
                               f"by hand and run unpack_converter(ARCHIVE, {folder})")
        unpack_converter(archives[0], folder)
    return folder


def unpack_converter(archive: str | Path, folder: str | Path) -> Path:
    """Extract the converter's parts from a llama-cpp-python source archive into ``folder`` (written aside, renamed).

    Accepts a llama.cpp source archive too (the parts at its top level instead of under ``vendor/llama.cpp/``).
    """
    from utils.atomic import atomic_folder

    folder = Path(folder)
    with tarfile.open(archive) as tar, atomic_folder(folder) as staging:
        members = []
        for member in tar.getmembers():
            parts = Path(member.name).parts
            root = parts.index("llama.cpp") + 1 if "vendor" in parts and "llama.cpp" in parts else 1
            inner = parts[root:]
            if inner and inner[0] in CONVERTER_PARTS and (member.isfile() or member.isdir()):
                member.name = str(Path(*inner))
                members.append(member)
        if not any(m.name == CONVERTER for m in members):
            raise FileNotFoundError(f"{archive}: no {CONVERTER} inside; expected a llama-cpp-python or llama.cpp "
                                    "source archive")
        tar.extractall(staging, members=members, filter="data")
    return folder


def convert_command(script: str | Path, model_dir: str | Path, outfile: str | Path, outtype: str,
                    model_name: str | None = None) -> str:
    """The converter's command line (what :func:`convert_to_gguf` runs, to copy into a terminal)."""
    name = ["--model-name", model_name] if model_name else []
    return shlex.join(["python", str(script), str(model_dir), "--outfile", str(outfile), "--outtype", outtype, *name])


def model_name_for_llama_cpp(model_dir: str | Path) -> str:
    """A GGUF ``general.name`` under which llama.cpp splits Phi-3's chat tokens from the text as this folder's
    tokenizer does.

    Phi-3 Mini's tokenizer strips the whitespace after ``<|user|>``, ``<|end|>`` and the other chat tokens (their
    ``rstrip`` flag in tokenizer.json). GGUF has no field for that flag: llama.cpp strips for every model whose name
    contains "phi3" or "phi-3", and for no other. So the name says Phi-3 exactly when the tokenizer strips, as Phi-3's
    and the miniature's do.
    """
    model_dir = Path(model_dir)
    added = json.loads((model_dir / "tokenizer.json").read_text()).get("added_tokens", [])
    strips = any(t.get("rstrip") for t in added if t.get("content") in (USER, ASSISTANT, SYSTEM, END))
    words = re.sub(r"(?i)phi-?3", " ", model_dir.name).replace("_", " ").replace("-", " ").split()
    name = " ".join(words) or "model"
    return f"Phi-3 {name}" if strips else name


def convert_to_gguf(script: str | Path, model_dir: str | Path, outfile: str | Path, outtype: str = "f16",
                    model_name: str | None = None) -> GGUFFile:
    """Run llama.cpp's ``convert_hf_to_gguf.py`` on a Hugging Face folder; write ``outfile`` (aside, then renamed).

    The converter runs in its own Python (it puts its own ``gguf-py`` first on the module path); its log goes to
    ``OUTFILE_FOLDER/logs/OUTFILE_STEM.log``. Phi-3's converter needs the SentencePiece ``tokenizer.model`` in
    ``model_dir`` (see :func:`add_sentencepiece_model`). ``model_name`` defaults to
    :func:`model_name_for_llama_cpp`, so that llama.cpp reads prompts as transformers does.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    model_dir, outfile = Path(model_dir), Path(outfile)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir}/config.json is missing: convert a merged model folder "
                                "(saved with save_pretrained), not an adapter folder")
    if model_name is None and (model_dir / "tokenizer.json").exists():
        model_name = model_name_for_llama_cpp(model_dir)
    log_path = _log_path(outfile)
    partial = outfile.with_name(f".{outfile.name}.writing")
    start = time.perf_counter()
    with log_path.open("w") as log:
        done = subprocess.run([sys.executable, str(script), str(model_dir), "--outfile", str(partial),
                               "--outtype", outtype, *(["--model-name", model_name] if model_name else [])],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode or not partial.exists():
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{log_path}: the converter stopped (exit {done.returncode}): {_last_line(log_path)}")
    os.replace(partial, outfile)
    return GGUFFile(outfile, outtype, convert_command(script, model_dir, outfile, outtype, model_name),
                    time.perf_counter() - start)


def add_sentencepiece_model(model_dir: str | Path, base_dir: str | Path) -> Path:
    """Copy the base's SentencePiece ``tokenizer.model`` into a merged folder that lacks it; return its path.

    ``save_pretrained`` of a transformers 5 tokenizer writes ``tokenizer.json`` but not ``tokenizer.model``, which
    llama.cpp's Phi-3 converter reads. Merging LoRA changes no token, so the base's file is the merged model's.
    """
    target = Path(model_dir) / "tokenizer.model"
    if not target.exists():
        source = Path(base_dir) / "tokenizer.model"
        if not source.exists():
            raise FileNotFoundError(f"{source} is missing: llama.cpp's Phi-3 converter needs the base model's "
                                    "SentencePiece tokenizer.model (Phi-3 Mini ships one)")
        shutil.copyfile(source, target)
    return target


# --- the quantizer ----------------------------------------------------------------------------------------------

def quantize_command(source: str | Path, outfile: str | Path, kind: str) -> str:
    """llama.cpp's ``llama-quantize`` command line for what :func:`quantize_gguf` does."""
    return shlex.join(["llama-quantize", str(source), str(outfile), kind.upper()])


def quantize_gguf(source: str | Path, outfile: str | Path, kind: str = "Q4_K_M") -> GGUFFile:
    """Quantize a 16- or 32-bit GGUF file with llama.cpp's own quantizer (``llama_model_quantize``, the function the
    ``llama-quantize`` tool calls), through llama-cpp-python. ``kind`` is a ``LLAMA_FTYPE_MOSTLY_*`` name: Q8_0,
    Q4_K_M, Q4_0, ... The quantizer's log goes to ``OUTFILE_FOLDER/logs/OUTFILE_STEM.log``: it names every tensor
    whose rows could not take the asked type and the type used instead."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}", None)
    if ftype is None:
        prefix = "LLAMA_FTYPE_MOSTLY_"
        known = sorted(n.removeprefix(prefix) for n in dir(llama_cpp) if n.startswith(prefix))
        raise ValueError(f"quantization type {kind!r}: expected one of {', '.join(known)}")
    source, outfile = Path(source), Path(outfile)
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing: convert the model to GGUF first")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    log_path = _log_path(outfile)
    partial = outfile.with_name(f".{outfile.name}.writing")
    start = time.perf_counter()
    with log_path.open("w") as log, _llama_log_to(log):
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if status != 0 or not partial.exists():
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{log_path}: llama.cpp's quantizer stopped (status {status}): {_last_line(log_path)}")
    os.replace(partial, outfile)
    return GGUFFile(outfile, kind.upper(), quantize_command(source, outfile, kind), time.perf_counter() - start)


@contextlib.contextmanager
def _llama_log_to(log: Any) -> Iterator[None]:
    """Send llama.cpp's log lines (llama-cpp-python prints them on ``sys.stderr``) to ``log`` for the block."""
    import logging

    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stderr(log):
            yield
    finally:
        logger.setLevel(level)


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many of a GGUF file's tensors are stored in each type (``F16``, ``Q8_0``, ``Q4_K``, ...), read with
    ``gguf.GGUFReader``: what the quantizer really did, fallbacks included."""
    from collections import Counter

    from gguf import GGUFReader

    return dict(sorted(Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors).items()))


# --- running a GGUF file ----------------------------------------------------------------------------------------

def stop_ids(llm: Any, stops: Sequence[str] = STOPS) -> dict[str, int]:
    """The token ids of Phi-3's stop tokens in a loaded ``Llama`` (each must be one token)."""
    ids = {}
    for text in stops:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
        if len(tokens) != 1:
            raise ValueError(f"{text!r} is not one token in this GGUF file ({tokens}): was it converted from a "
                             "Phi-3 tokenizer?")
        ids[text] = tokens[0]
    return ids


def llama_tokens(llm: Any, prompt: str, max_new_tokens: int = 48) -> Iterator[int]:
    """Greedy token ids from a llama-cpp-python ``Llama`` for a prompt text already in the chat format, one at a time,
    the stop token (``<|end|>`` or ``<|endoftext|>``) included. The prompt is tokenized with special tokens parsed
    and without an added ``<s>``, as transformers reads it."""
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    stops = set(stop_ids(llm).values())
    for count, token in enumerate(llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True), start=1):
        yield token
        if token in stops or count >= max_new_tokens:
            return


def llama_stream(llm: Any, prompt: str, max_new_tokens: int = 48) -> Iterator[int]:
    """:func:`llama_tokens` without the stop token (for timing and streaming, as ``ort_stream``)."""
    stops = set(stop_ids(llm).values())
    for token in llama_tokens(llm, prompt, max_new_tokens):
        if token not in stops:
            yield token


def llama_generate(llm: Any, prompts: Sequence[str], max_new_tokens: int = 48) -> list[Generation]:
    """Greedy answers from a ``Llama`` for prompt texts, as :func:`utils.metrics.generate` gives them: each cut at
    the first stop token, ``stopped`` True when that token was ``<|end|>``."""
    ids = stop_ids(llm)
    answers = []
    for prompt in prompts:
        tokens = list(llama_tokens(llm, prompt, max_new_tokens))
        stopped = bool(tokens) and tokens[-1] == ids[END]
        text = llm.detokenize([t for t in tokens if t not in ids.values()]).decode("utf-8", errors="replace")
        answers.append(Generation(text.strip(), stopped))
    return answers


# --- Ollama -----------------------------------------------------------------------------------------------------

# Phi-3's chat format in Ollama's Go template language: each turn "<|role|>\nCONTENT<|end|>\n", then
# "<|assistant|>\n" after the last turn unless it is the assistant's: what Phi-3's Jinja template writes with
# add_generation_prompt=True.
OLLAMA_PHI3_TEMPLATE = (
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
    "<|{{ .Role }}|>\n"
    "{{ .Content }}<|end|>\n"
    "{{ if and $last (ne .Role \"assistant\") }}<|assistant|>\n"
    "{{ end }}\n"
    "{{- end }}")


def ollama_modelfile(gguf_name: str, system: str | None = None, temperature: float = 0.0,
                     num_ctx: int = 4096, stops: Sequence[str] = (END, ENDOFTEXT, USER, ASSISTANT, SYSTEM)) -> str:
    """An Ollama Modelfile for a Phi-3 GGUF file in the same folder: ``FROM``, Phi-3's ``TEMPLATE``, stop tokens.

    ``ollama create NAME -f Modelfile`` (in that folder) builds the model; ``ollama run NAME`` chats with it.
    """
    if "/" in gguf_name or "\\" in gguf_name:
        raise ValueError(f"{gguf_name!r}: give the GGUF file's name; the Modelfile is written beside it")
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{OLLAMA_PHI3_TEMPLATE}"""', ""]
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER temperature {temperature:g}", f"PARAMETER num_ctx {num_ctx}", ""]
    return "\n".join(lines)


def write_modelfile(gguf_path: str | Path, text: str | None = None) -> Path:
    """Write ``Modelfile`` beside a GGUF file (default text: :func:`ollama_modelfile` for it); return its path."""
    from utils.atomic import atomic_write

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path} is missing: the Modelfile's FROM line would point at nothing")
    return atomic_write(gguf_path.parent / "Modelfile", text or ollama_modelfile(gguf_path.name))


# --- small helpers ----------------------------------------------------------------------------------------------

def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log_path(outfile: Path) -> Path:
    return _mkdir(outfile.parent / "logs") / f"{outfile.stem}.log"


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"
