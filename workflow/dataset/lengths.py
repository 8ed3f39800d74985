"""The rows' token counts against the lengths the later stages allow, checked by the ingest stage.

Where the base model's tokenizer can be had before the model stage (a local folder, or a hub id's tokenizer
files), each split's prompts are rendered by its chat template (what vLLM and Serve do; LLaMA-Factory's
template renders the same prompt ids: ``prompts/guard.py``) and counted.
"""

from __future__ import annotations

from ..config import Recipe
from ..core.console import say
from ..core.errors import WorkflowError

# LLaMA-Factory 0.9.5's default cutoff_len.
DEFAULT_CUTOFF_LEN = 2048


def model_tokenizer_before_the_model_stage(recipe: Recipe):
    """The base model's tokenizer where it can be had without the model stage (a local folder, or a hub id's
    tokenizer files), with why not otherwise."""
    model = recipe.model
    if model.is_tiny:
        return None, "model.source: tiny is built by the model stage, from the ingested data"
    if "://" in model.source:
        return None, f"model.source {model.source} is read by the model stage"
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model.source, revision=model.revision), ""
    except Exception as err:  # noqa: BLE001 - offline, gated, or no tokenizer files: the check is then skipped
        return None, f"no tokenizer for {model.source} here ({type(err).__name__})"


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    """Each text's token count, encoded in one batch (``prompts.guard.chat_template_prompt_ids`` one by one is
    several times slower on a dataset of thousands of rows)."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def check_prompt_lengths(recipe: Recipe, splits: dict[str, list[dict]]) -> None:
    """Token counts of the rows against the lengths the later stages allow (the chat template's rendering).

    Training rows longer than ``train.llamafactory.cutoff_len`` are truncated by LLaMA-Factory; an evaluated
    prompt longer than the evaluate engine's ``max_model_len`` becomes an error row, and one that leaves less
    than ``sampling_params.max_tokens`` has its answer cut short. Each is said in one line; a split whose every
    prompt is too long for the engine fails (nothing of it could be evaluated).
    """
    from ..prompts.messages import expected_output, row_messages

    limits = []
    if recipe.train is not None and "train" in splits:
        limits.append(("train", "train.llamafactory.cutoff_len",
                       int(recipe.train.llamafactory.get("cutoff_len", DEFAULT_CUTOFF_LEN)), True))
    evaluate = recipe.evaluate
    engine = (evaluate.processor.get("engine_kwargs") or {}) if evaluate is not None and not evaluate.endpoint else {}
    if engine.get("max_model_len") and evaluate.split in splits:
        limits.append((evaluate.split, "evaluate.processor.engine_kwargs.max_model_len", int(engine["max_model_len"]),
                       False))
    if not limits:
        return
    tokenizer, why_not = model_tokenizer_before_the_model_stage(recipe)
    if tokenizer is None:
        say(f"[ingest] prompt lengths: checked by the later stages ({why_not})")
        return
    where = str(recipe.path or "recipe")
    for split, key, limit, with_output in limits:
        rows = splits[split]
        lengths = token_counts(tokenizer, [tokenizer.apply_chat_template(row_messages(row), add_generation_prompt=True,
                                                                         tokenize=False) for row in rows])
        if with_output:  # the answer and the end-of-turn token after it
            answers = token_counts(tokenizer, [expected_output(row) or "" for row in rows])
            lengths = [n + a + 1 for n, a in zip(lengths, answers, strict=True)]
        over = [n for n in lengths if n > limit]
        what = "rows (prompt and answer)" if with_output else "prompts"
        if not with_output and over and len(over) == len(rows):
            raise WorkflowError(f"{where}: {key} is {limit} tokens and every prompt of the {split!r} split is longer "
                                f"(the shortest {min(lengths)}): the engine would answer none of them",
                                hint=f"raise {key}, or shorten the prompts (ingest.instruction)")
        if over:
            outcome = "LLaMA-Factory truncates them" if with_output else "the engine answers them with an error"
            say(f"[ingest] warning: {len(over)} of {len(rows)} {split!r} {what} are longer than {key} ({limit} "
                f"tokens; the longest {max(over)}): {outcome}")
        if not with_output:
            max_tokens = int(evaluate.sampling_params.get("max_tokens", 16))
            short = [n for n in lengths if n <= limit < n + max_tokens]
            if short:
                say(f"[ingest] warning: {len(short)} of {len(rows)} {split!r} prompts leave fewer than "
                    f"evaluate.sampling_params.max_tokens ({max_tokens}) tokens of {key} ({limit}) for the answer")
        say(f"[ingest] prompt lengths: {split!r} {what} up to {max(lengths)} tokens ({key} {limit})")
