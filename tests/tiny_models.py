"""Tiny random decoder models built in the tests (nothing is downloaded)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Shared with bench/cluster_agreement.py; re-exported for the tests.
from bench.tiny_tokenizer import CHAT_TEMPLATE, train_tiny_tokenizer  # noqa: F401

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


def save_tiny_model_dir(path, texts: list[str], model_type: str = "llama", seed: int = 0,
                        **overrides):
    """Write a tokenizer + tiny random model folder that axolotl can load as base_model."""
    tokenizer = train_tiny_tokenizer(texts)
    tokenizer.save_pretrained(path)
    model = tiny_causal_lm(
        model_type, seed=seed, vocab_size=len(tokenizer), max_position_embeddings=1024,
        pad_token_id=3, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        # A wider init than HF's 0.02: with a frozen random lm_head of std 0.02 the logits
        # can hardly move, so adapter-only training could not show a falling loss.
        initializer_range=0.2, **overrides,
    )
    model.save_pretrained(path)
    return path
