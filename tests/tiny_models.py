"""Tiny random decoder models built in the tests (nothing is downloaded)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TINY_KWARGS = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

EXTRA = {
    "gemma": dict(head_dim=8),
    "gemma2": dict(head_dim=8, query_pre_attn_scalar=8),
    "qwen3": dict(head_dim=8),
}


def assert_checkpointing_matches_plain_backward(build, ids, clusters) -> None:
    """Gradients of LM + balancing loss are identical with and without (non-reentrant)
    gradient checkpointing; ``build()`` returns a fresh upcycled model."""
    from moce_plugin.model.upcycle import aux_loss_of, pop_last_routing

    def grads(gc: bool) -> dict:
        model = build().train()
        if gc:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        out = model(input_ids=ids, labels=ids, moce_cluster_ids=clusters)
        (out.loss + aux_loss_of(pop_last_routing(model))).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], msg=name)


def tiny_causal_lm(model_type: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kwargs = {**TINY_KWARGS, **EXTRA.get(model_type, {}), **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A small byte-level BPE tokenizer trained on ``texts`` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_model_dir(path, texts: list[str], model_type: str = "llama", seed: int = 0):
    """Write a tokenizer + tiny random model folder that axolotl can load as base_model."""
    tokenizer = train_tiny_tokenizer(texts)
    tokenizer.save_pretrained(path)
    model = tiny_causal_lm(
        model_type, seed=seed, vocab_size=len(tokenizer), max_position_embeddings=1024,
        pad_token_id=3, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        # A wider init than HF's 0.02: with a frozen random lm_head of std 0.02 the logits
        # can hardly move, so adapter-only training could not show a falling loss.
        initializer_range=0.2,
    )
    model.save_pretrained(path)
    return path
