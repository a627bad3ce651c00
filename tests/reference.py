"""Independent references: tiny random Hugging Face models and transformers' own generate."""

from __future__ import annotations

from pathlib import Path

import torch



def byte_level_tokenizer():
    """A 259-token byte-level tokenizer (3 specials + 256 bytes), enough to encode any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny_model(folder: Path, config, model_cls, seed: int = 0) -> Path:
    """Random weights of ``config`` saved as a Hugging Face folder with a byte-level tokenizer.

    Weights are drawn wider than the usual 0.02 so greedy choices are not near-ties that float
    rounding differences could flip.
    """
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The reference: transformers' own greedy generate, EOS ignored."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()
