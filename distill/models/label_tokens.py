"""Label tokens: each class label as one token of the model's vocabulary.

A classification student that distill trains gets one added token per label, whose text is the
label itself; its answer to a prompt is that token. P(label | prompt) is then the softmax over the
label tokens' logits at the answer position: one forward pass over the prompt, whatever the number
of labels, instead of scoring every label's full answer after it.

The tokens are added as special tokens, so a label name (or a control token) inside a data row is
tokenized as plain text (prompts.py tokenizes user content with `split_special_tokens`) and a row
cannot produce a new label token. A label whose text is already one token of the vocabulary (SmolLM2
has `delivery` and `login`, for example) keeps that token, since a tokenizer gives one text one id:
its row is shared with the word, which a data row can still contain. Greedy decoding still prints the label name: `tok.decode(ids)` shows it, and the
GGUF exporter types the tokens as user-defined so llama.cpp prints them too. Their embedding (and,
when untied, output) rows start as the mean of the rows of the label text's own tokens, so the
student starts out knowing what each label says.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def label_token_ids(tok, labels: list[str]) -> list[int] | None:
    """The ids of the label tokens when the tokenizer has one added token for every label, else None."""
    added = {t.content: i for i, t in tok.added_tokens_decoder.items()}
    ids = [added.get(lab) for lab in labels]
    return None if any(i is None for i in ids) else ids


def add_label_tokens(model, tok, labels: list[str]) -> list[int]:
    """Add a token for every label the tokenizer lacks (rows initialised from the label text) and
    return all the label token ids. Labels already present (a student cut from a label-token
    teacher) keep their trained rows."""
    from tokenizers import AddedToken

    existing = label_token_ids(tok, labels)
    if existing is not None:
        if model.get_input_embeddings().weight.shape[0] < len(tok):  # a base reloaded for a label-token tokenizer
            model.resize_token_embeddings(len(tok), mean_resizing=False)
        return existing
    have = {t.content for t in tok.added_tokens_decoder.values()}
    new = [lab for lab in labels if lab not in have]
    sources = {lab: tok(lab, add_special_tokens=False).input_ids for lab in new}  # before the tokens exist
    tok.add_tokens([AddedToken(lab, special=True, normalized=False) for lab in new], special_tokens=True)
    ids = label_token_ids(tok, labels)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tok):
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    _init_rows(model, {tok.convert_tokens_to_ids(lab): src for lab, src in sources.items()})
    log.info("label tokens: %d added to the tokenizer (%d labels), rows initialised from the label text",
             len(new), len(labels))
    return ids


@torch.no_grad()
def _init_rows(model, sources: dict[int, list[int]]) -> None:
    """Row `new` of the input embedding (and of an untied output layer) := the mean of rows `src`."""
    matrices = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(out.weight)
    for w in matrices:
        for new, src in sources.items():
            w[new] = w[torch.tensor(src)].mean(0)
