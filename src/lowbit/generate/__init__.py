"""Decoding: greedy, sampling (temperature, top-k, top-p, repetition penalty), beam search; chat and streaming.

    text = lowbit.generate.generate(model, tokenizer, "Once upon a time", max_new_tokens=40)
    for piece in lowbit.generate.stream(model, tokenizer, prompt, GenerateConfig(do_sample=True, seed=0)):
        print(piece, end="", flush=True)
"""

from lowbit.generate.beam import beam_search
from lowbit.generate.chat import ChatSession, FewShotTemplate, chat_loop, load_few_shot, render_chat
from lowbit.generate.config import GenerateConfig
from lowbit.generate.decode import KVDecoder, generate, generate_ids, iter_tokens, stream, stream_ids
from lowbit.generate.logits import process_scores, repetition_penalty, temperature, top_k_filter, top_p_filter
from lowbit.generate.stopping import TextStream

__all__ = [
    "ChatSession",
    "FewShotTemplate",
    "chat_loop",
    "load_few_shot",
    "render_chat",
    "GenerateConfig",
    "KVDecoder",
    "TextStream",
    "beam_search",
    "generate",
    "generate_ids",
    "iter_tokens",
    "process_scores",
    "repetition_penalty",
    "stream",
    "stream_ids",
    "temperature",
    "top_k_filter",
    "top_p_filter",
]
