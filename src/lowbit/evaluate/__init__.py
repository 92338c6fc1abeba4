"""Evaluation: perplexity, multiple choice, Elo tournaments, quantization-error reports, and offline text."""

from lowbit.evaluate.data import reference_text
from lowbit.evaluate.elo import (
    EloTable,
    Match,
    bootstrap_elo,
    elo_ratings,
    generate_answers,
    human_judge,
    likelihood_judge,
    model_judge,
    play_tournament,
    read_answers,
    read_prompts,
    write_answers,
)
from lowbit.evaluate.error_report import ErrorReport, LayerError, error_report_for, quantization_error_report
from lowbit.evaluate.multiple_choice import MCQuestion, MCResult, evaluate_multiple_choice, load_mc_jsonl
from lowbit.evaluate.perplexity import perplexity

__all__ = [
    "EloTable",
    "ErrorReport",
    "LayerError",
    "MCQuestion",
    "MCResult",
    "Match",
    "bootstrap_elo",
    "elo_ratings",
    "error_report_for",
    "evaluate_multiple_choice",
    "generate_answers",
    "human_judge",
    "likelihood_judge",
    "load_mc_jsonl",
    "model_judge",
    "perplexity",
    "play_tournament",
    "quantization_error_report",
    "read_answers",
    "read_prompts",
    "reference_text",
    "write_answers",
]
