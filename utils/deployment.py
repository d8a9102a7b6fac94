"""Deployment helpers for chapter 07: ONNX Runtime GenAI export and generation, timing, a chat widget, a model card.

What chapter 07 teaches (the builder's options, ``og.Model``, ``og.Generator``, adapters) is written in its cells;
this module holds what the chapter repeats or what is not the lesson: running the builder in-process with its log
kept out of the notebook, the generation loop as a function for 120 prompts, token timing, folder sizes, the chat
widget's plumbing, the model card's text and the answer checks of the exercises.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import shlex
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.atomic import DiskFull, atomic_folder
from utils.metrics import Generation
from utils.prompts import END, Conversation, Message

BUILDER_MODULE = "onnxruntime_genai.models.builder"
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "int4")


@dataclass(frozen=True)
class Export:
    """One model exported by the ONNX Runtime GenAI builder: where it is, how, and how long it took."""

    folder: Path
    precision: str
    command: str
    seconds: float


def builder_command(source: str | Path, output: str | Path, precision: str, execution_provider: str = "cpu",
                    extra_options: dict[str, str] | None = None) -> str:
    """The builder's command line for these settings (what :func:`export_onnx` runs, to copy into a terminal)."""
    parts = ["python", "-m", BUILDER_MODULE, "-i", str(source), "-o", str(output), "-p", precision,
             "-e", execution_provider]
    if extra_options:
        parts += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    return shlex.join(parts)


def export_onnx(source: str | Path, output: str | Path, precision: str, execution_provider: str = "cpu",
                extra_options: dict[str, str] | None = None, cache_dir: str | Path | None = None,
                one_weight_at_a_time: bool = True) -> Export:
    """Run the ONNX Runtime GenAI model builder on a Hugging Face folder, in this process.

    The builder writes into a hidden sibling folder, which replaces ``output`` whole when it is done: an export cut
    short leaves the previous one (or none), and no file of an earlier export (a model card) stays beside the new.
    Same as :func:`builder_command`'s command line, without starting a new Python (the builder imports torch and
    transformers, several seconds each time). The builder's own log goes to ``OUTPUT_PARENT/logs/OUTPUT_NAME.log``,
    outside the model folder, so that it is neither uploaded nor listed in the model card.

    The builder's model object (the loaded weights and the graph built from them) sits in reference cycles that
    Python frees only at its next full garbage collection, often cells later: a second export would stack on top of
    the first. So the export ends with ``gc.collect()``: measured on the 2-layer Phi-3-Mini-shaped stand-in, it
    returned 1.8 GB to the system.

    For int4 the builder serializes the whole graph in fp32 before quantizing it (24 GiB of host RAM for Phi-3
    Mini); with ``one_weight_at_a_time`` (the default) :mod:`utils.onnx_quantize` gives the same quantizer one weight
    at a time and writes the same files, byte for byte.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    source, output = Path(source), Path(output)
    if not (source / "config.json").exists():
        raise FileNotFoundError(f"{source}/config.json is missing: export a merged model folder "
                                f"(saved with save_pretrained), not an adapter folder")
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    from utils.onnx_quantize import builder_quantizes_one_weight_at_a_time

    output.parent.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else output.parent / ".builder_cache"
    options = [f"{k}={v}" for k, v in (extra_options or {}).items()]
    log_path = output.parent / "logs" / f"{output.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    quant_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level, quant_logger.level = quant_logger.level, logging.WARNING
    start = time.perf_counter()
    try:
        with (atomic_folder(output) as staging, log_path.open("w") as log, contextlib.redirect_stdout(log),
              contextlib.redirect_stderr(log)):
            parsed = parse_extra_options(None, str(source), str(staging), precision, execution_provider, str(cache),
                                         options)
            streaming = builder_quantizes_one_weight_at_a_time() if one_weight_at_a_time else contextlib.nullcontext()
            with streaming:
                create_model(None, str(source), str(staging), precision, execution_provider, str(cache), **parsed)
    except DiskFull:
        raise
    except Exception as err:
        raise RuntimeError(f"{log_path}: the builder stopped ({type(err).__name__}: {err}); its log is in that "
                           f"file") from err
    finally:
        quant_logger.level = level
        gc.collect()
    return Export(output, precision, builder_command(source, output, precision, execution_provider, extra_options),
                  time.perf_counter() - start)


def folder_size(path: str | Path, pattern: str = "*") -> int:
    """Bytes in the files under ``path`` whose names match ``pattern`` (the size a download would be)."""
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


def megabytes(n_bytes: int) -> float:
    """Bytes as megabytes (10**6), the unit model hubs show."""
    return n_bytes / 1e6


def _ort_tokens(model: Any, tokenizer: Any, messages: Conversation, max_new_tokens: int, adapters: Any | None,
                adapter: str | None) -> Iterator[int]:
    import onnxruntime_genai as og

    prompt = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
    generator = og.Generator(model, params)
    if adapters is not None and adapter is not None:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(ids)
    stops = {int(i) for i in tokenizer.eos_token_ids}
    while not generator.is_done():
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        yield token
        if token in stops:
            return


def ort_stream(model: Any, tokenizer: Any, messages: Conversation, max_new_tokens: int = 48,
               adapters: Any | None = None, adapter: str | None = None) -> Iterator[int]:
    """Greedy token ids from an ``onnxruntime_genai`` model for a chat, one at a time, without the stop token.

    The prompt is the model folder's chat template applied by ``og.Tokenizer.apply_chat_template``; generation
    stops at any of ``genai_config.json``'s ``eos_token_id`` (``<|end|>`` and ``<|endoftext|>`` for Phi-3).
    """
    stops = {int(i) for i in tokenizer.eos_token_ids}
    for token in _ort_tokens(model, tokenizer, messages, max_new_tokens, adapters, adapter):
        if token not in stops:
            yield token


def ort_generate(model: Any, tokenizer: Any, prompts: Sequence[Conversation], max_new_tokens: int = 48,
                 adapters: Any | None = None, adapter: str | None = None) -> list[Generation]:
    """Greedy answers from an ``onnxruntime_genai`` model, as :func:`utils.metrics.generate` gives them.

    Each answer is cut at the first stop token; ``stopped`` is True when that token was ``<|end|>``.
    """
    end_id = int(tokenizer.to_token_id(END))
    stops = {int(i) for i in tokenizer.eos_token_ids}
    answers = []
    for messages in prompts:
        tokens = list(_ort_tokens(model, tokenizer, messages, max_new_tokens, adapters, adapter))
        stopped = bool(tokens) and tokens[-1] == end_id
        text = tokenizer.decode([t for t in tokens if t not in stops]).strip()
        answers.append(Generation(text, stopped))
    return answers


@dataclass(frozen=True)
class TokenTiming:
    """Median first-token latency and decoding speed over a few repeats."""

    first_token_s: float
    tokens_per_s: float
    tokens: int


def time_tokens(stream: Callable[[], Iterable[Any]], repeats: int = 3) -> TokenTiming:
    """Time a token stream: seconds to the first token, and tokens/s after it (medians of ``repeats`` runs).

    ``stream`` starts one generation and yields as each token is produced; one warm-up run is not counted.
    """
    for _ in stream():
        pass
    firsts, rates, counts = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        stamps = [time.perf_counter() for _ in stream()]
        if not stamps:
            raise ValueError("the stream produced no token: nothing to time")
        firsts.append(stamps[0] - start)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan"))
        counts.append(len(stamps))
    return TokenTiming(statistics.median(firsts), statistics.median(rates), int(statistics.median(counts)))


def hf_stream(model: Any, tokenizer: Any, messages: Conversation, max_new_tokens: int = 48) -> Iterator[int]:
    """Greedy token ids from a transformers model, yielded as ``generate`` produces them (a streamer in a thread)."""
    import queue
    import threading

    from transformers.generation.streamers import BaseStreamer

    from utils.prompts import render_prompt

    class _Ids(BaseStreamer):
        def __init__(self) -> None:
            self.q: queue.Queue = queue.Queue()
            self.prompt_seen = False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                self.q.put(token)

        def end(self) -> None:
            self.q.put(None)

    inputs = tokenizer(render_prompt(tokenizer, messages), return_tensors="pt", add_special_tokens=False)
    streamer = _Ids()
    kwargs = dict(**inputs.to(model.device), max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                  pad_token_id=tokenizer.pad_token_id)
    thread = threading.Thread(target=model.generate, kwargs=kwargs)
    thread.start()
    while (token := streamer.q.get()) is not None:
        yield token
    thread.join()


def diff_table(requests: Sequence[str], left: Sequence[str], right: Sequence[str],
               names: tuple[str, str] = ("transformers", "onnx")) -> list[dict[str, str]]:
    """Rows (index, request, both answers) where two lists of answers differ, for a table of disagreements."""
    return [{"#": str(i), "request": r, names[0]: a, names[1]: b}
            for i, (r, a, b) in enumerate(zip(requests, left, right)) if a != b]


# --- runtime adapters -------------------------------------------------------------------------------------------

LORA_MODULES: dict[str, tuple[str, ...]] = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
                                            "mlp": ("gate_proj", "up_proj", "down_proj")}


def lora_matmul_nodes(num_layers: int) -> list[str]:
    """The builder's names for the LoRA ``MatMul`` nodes of a Phi-3 export made with ``adapter_path``.

    Passed as the extra option ``nodes_to_exclude``, they keep LoRA's matrices in float in an int4 export, where
    they can become inputs of the graph. The builder splits Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` into
    q/k/v and gate/up parts; names of modules an adapter does not target are simply not found.
    """
    return [f"/model/layers.{layer}/{block}/{module}/lora_{matrix}/MatMul" for layer in range(num_layers)
            for block, modules in LORA_MODULES.items() for module in modules for matrix in "AB"]


# --- chat window ------------------------------------------------------------------------------------------------

Reply = Callable[[list[Message]], Iterable[str]]


@dataclass
class ChatSession:
    """A chat's memory and its reply function, with no user interface: what the widget calls, and what tests drive.

    ``reply`` gets the whole conversation (system prompt first, if any) and yields the answer in pieces.
    """

    reply: Reply
    system: str | None = None
    history: list[Message] = field(default_factory=list)

    def messages(self) -> list[Message]:
        """The conversation as the model sees it: system prompt (if any), then every turn so far."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + list(self.history)

    def send(self, text: str, on_piece: Callable[[str], None] | None = None) -> str:
        """Add the user's turn, collect the model's answer piece by piece, store it and return it."""
        if not text.strip():
            return ""
        self.history.append({"role": "user", "content": text.strip()})
        answer = ""
        for piece in self.reply(self.messages()):
            answer += piece
            if on_piece is not None:
                on_piece(answer)
        self.history.append({"role": "assistant", "content": answer.strip()})
        return answer.strip()

    def clear(self) -> None:
        """Forget the conversation (a new chat)."""
        self.history.clear()


def transcript_html(history: Sequence[Message], pending: str | None = None) -> str:
    """The conversation as small HTML for an ``ipywidgets.HTML`` (text escaped), with a half-written answer."""
    import html

    rows = [f"<div><b>{'you' if m['role'] == 'user' else 'model'}:</b> <code>{html.escape(m['content'])}</code></div>"
            for m in history if m["role"] in ("user", "assistant")]
    if pending is not None:
        rows.append(f"<div><b>model:</b> <code>{html.escape(pending)}</code> …</div>")
    return "".join(rows) or "<i>Type a request and press Send.</i>"


def chat_widget(session: ChatSession, placeholder: str = "Book cedar room for 4 people on Friday at 3pm") -> Any:
    """An ipywidgets chat window (text box, Send and New chat buttons, transcript) on a :class:`ChatSession`.

    Works in JupyterLab, classic Notebook and Colab (no server, no browser tab). The widget's ``send`` attribute
    is the Send button's handler, so a test can call it without a browser.
    """
    import ipywidgets as widgets

    box = widgets.Text(placeholder=placeholder, layout=widgets.Layout(width="70%"))
    send_button = widgets.Button(description="Send", button_style="primary")
    new_button = widgets.Button(description="New chat")
    transcript = widgets.HTML(transcript_html(session.history))

    def send(_: Any = None) -> None:
        text, box.value = box.value, ""
        session.send(text, on_piece=lambda partial: setattr(transcript, "value",
                                                           transcript_html(session.history, partial)))
        transcript.value = transcript_html(session.history)

    def new_chat(_: Any = None) -> None:
        session.clear()
        transcript.value = transcript_html(session.history)

    send_button.on_click(send)
    new_button.on_click(new_chat)
    box.on_submit(send)
    ui = widgets.VBox([transcript, widgets.HBox([box, send_button, new_button])])
    ui.box, ui.transcript, ui.send, ui.new_chat = box, transcript, send, new_chat
    return ui


# --- model card -------------------------------------------------------------------------------------------------

def _table(rows: Sequence[tuple[str, Any]]) -> str:
    return "\n".join(["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def model_card(*, title: str, base: str, base_details: dict[str, Any] | None, data_card: str,
               training: dict[str, Any], lora: dict[str, Any], scores: dict[str, dict[str, float]],
               files: Sequence[str], intended_use: str, limits: str, parity: dict[str, str] | None = None) -> str:
    """A model card (README.md, with the hub's YAML header) from the run's own files, as text.

    ``scores`` maps a variant to its held-out scores (chapter 06's ``results.json``); ``data_card`` is the data
    card's text, of which the first paragraph is quoted.
    """
    summary = next((p.strip() for p in data_card.split("\n\n") if p.strip() and not p.startswith("#")), "")
    metrics = sorted({k for s in scores.values() for k, v in s.items() if isinstance(v, (int, float))})
    score_rows = ["| variant | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    score_rows += [f"| {name} | " + " | ".join(f"{s[m]:.3f}" if m in s else "" for m in metrics) + " |"
                   for name, s in scores.items()]
    lora_keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type", "peft_type")
    parts = [
        "---", f"base_model: {base}", "library_name: peft" if lora else "library_name: onnxruntime-genai",
        "tags: [phi3, lora, onnxruntime-genai, phi3-lora-lab]", "---", "", f"# {title}", "",
        f"Fine-tuned from **{base}** with LoRA by the Phi-3 LoRA Lab notebooks (chapters 03, 04 and 07).", "",
        "## Base model", "",
        _table(sorted((base_details or {"model": base}).items())), "",
        "## Data", "", summary, "", "See the project's `data/DATA_CARD.md` for the whole data card.", "",
        "## Training", "", _table(sorted(training.items())), "",
        "## LoRA settings", "", _table([(k, lora[k]) for k in lora_keys if k in lora]), "",
        "## Held-out scores (chapter 06)", "", *score_rows, "",
    ]
    if parity:
        parts += ["## Export parity (chapter 07)", "", _table(sorted(parity.items())), ""]
    parts += ["## Files", "", *(f"- `{f}`" for f in files), "",
              "## Intended use", "", intended_use, "", "## Limits", "", limits, ""]
    return "\n".join(parts)


def write_model_card(folder: str | Path, text: str) -> Path:
    """Write ``text`` as ``FOLDER/README.md`` (the file a model hub shows) and return its path."""
    from utils.atomic import atomic_write

    return atomic_write(Path(folder) / "README.md", text)


def upload_plan(folder: str | Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file ``upload_folder`` would send from ``folder``, hidden files excluded."""
    root = Path(folder)
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


# --- exercise checks --------------------------------------------------------------------------------------------

def check_export(folder: str | Path, precision: str) -> str:
    """Exercise check: is ``folder`` an ONNX Runtime GenAI export whose weights are stored at ``precision``?"""
    import onnx

    folder = Path(folder)
    if not (folder / "genai_config.json").exists():
        return f"not yet: {folder}/genai_config.json is missing; run the builder with -o {folder}"
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    bits = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    want = {"int4": {4}, "int8": {8}}.get(precision, set())
    if bits == want:
        return f"right: {folder.name} stores its matrices as {precision}" + (
            f" (MatMulNBits, bits={want.pop()})" if want else " (plain MatMul)")
    found = f"MatMulNBits with bits={sorted(bits)}" if bits else "plain float MatMul"
    return f"not yet: {folder.name} holds {found}; export it with -p {precision}"


def check_agreement(count: int, answers: Sequence[str], reference: Sequence[str]) -> str:
    """Exercise check: is ``count`` the number of answers identical to the reference answers?"""
    if len(answers) != len(reference):
        return f"not yet: {len(answers)} answers against {len(reference)} references; answer the same prompts"
    same = sum(a == b for a, b in zip(answers, reference))
    if count == same:
        return f"right: {same} of {len(reference)} answers agree"
    return (f"not yet: you counted {count}; compare the answers pairwise with == (after the same .strip()) "
            f"and count the equal pairs")
