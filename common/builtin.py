"""Built-in tiny models, made in code: the embedded default for the demo and the tests.

`builtin:tiny-llama` is a 4-block Llama (d_model 64) with random weights from a fixed seed and a
byte-level BPE tokenizer trained in code on a short fixed text, so that nothing is downloaded
and every build is identical. Its outputs are noise: it exercises the machinery, not the science.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PREFIX = "builtin:"

_CORPUS = (
    "The game starts with one hundred dollars. Each round the player may bet or stop.\n"
    "Current balance: $130. Current round: 4. Win rate: 30%. A win pays 3.0x the bet.\n"
    "Round 1: Bet $10, Win, Balance $120. Round 2: Bet $20, Loss, Balance $100.\n"
    "Choose: 1) Bet (choose $5-$100) 2) Stop. Choice: 2\n"
    "Question: a shop sells 12 apples for 3 dollars; how much do 40 apples cost? Answer: 10\n"
    "The quick brown fox jumps over the lazy dog while the river runs to the sea.\n"
    "First set your own target amount, then make decisions based on that goal.\n"
)

_SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}


def tiny_llama_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (about 400 tokens) trained on _CORPUS; prepends <s> like Llama's."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(_SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer)
    bos = _SPECIAL["bos"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=_SPECIAL["bos"],
        eos_token=_SPECIAL["eos"],
        pad_token=_SPECIAL["pad"],
        padding_side="right",
    )


def tiny_llama_config() -> LlamaConfig:
    tokenizer = tiny_llama_tokenizer()
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def tiny_llama_model(dtype: torch.dtype = torch.float32, attn_implementation: str = "eager") -> LlamaForCausalLM:
    config = tiny_llama_config()
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


# name -> (tokenizer factory, config factory, model factory)
BUILTIN = {
    "tiny-llama": (tiny_llama_tokenizer, tiny_llama_config, tiny_llama_model),
}
