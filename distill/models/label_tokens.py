"""Label tokens: each class label as one token of the model's vocabulary.

A classification student that distill trains gets one added token per label, whose text is the
label itself; its answer to a prompt is that token. P(label | prompt) is then the softmax over the
label tokens' logits at the answer position: one forward pass over the prompt, whatever the number
of labels, instead of scoring every label's full answer after it.

The tokens are added as special tokens, so a label name (or a control token) inside a data row is
tokenized as plain text (prompts.py tokenizes user content with `split_special_tokens`) and a row
cannot produce a new label token. A label whose text is already one token of the vocabulary (SmolLM2
has `delivery` and `login`, for example) keeps that token, since a tokenizer gives one text one id:
its row is shared with the word, which a data row can still contain. Greedy decoding still prints the
label name: `tok.decode(ids)` shows it, and the GGUF exporter types the tokens as user-defined so
llama.cpp prints them too. Their embedding (and, when untied, output) rows start as the mean of the
rows of the label text's own tokens, so the student starts out knowing what each label says.

A label must not be one of the tokenizer's own added tokens (`check_label_collisions`): a label
`<|im_end|>` would become the end-of-turn id, and a label equal to another added token would share its row.
"""
from __future__ import annotations

import logging

import torch

from distill.errors import UsageError

log = logging.getLogger(__name__)


def end_of_turn_id(tok):
    """The id that ends an assistant turn: the chat markers of the common templates, else end of sequence."""
    for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None and i >= 0:
            return i
    return tok.eos_token_id


def control_tokens(tok) -> dict[str, str]:
    """The tokenizer's own control tokens, text -> what it is: its special tokens (bos, eos, pad, unk and
    the extra ones), the end-of-turn token, and every added token its chat template writes."""
    out = {t: "a special token" for t in tok.all_special_tokens}
    template = getattr(tok, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates
        template = " ".join(map(str, template.values()))
    for t in tok.added_tokens_decoder.values():
        if t.content in template:
            out.setdefault(t.content, "a token of the chat template")
    eot = end_of_turn_id(tok)
    if eot is not None:
        out[tok.convert_ids_to_tokens(eot)] = "the end-of-turn token"
    return out


def check_label_collisions(tok, labels: list[str]) -> None:
    """Refuse labels that are tokens of the tokenizer's own: a control token (as a label token it would be
    the end of turn, or the padding), or, when the labels are not all label tokens already (a model that
    distill gave label tokens has one added token per label), any added token, whose row the label's
    token would share."""
    controls = control_tokens(tok)
    for lab in labels:
        if lab in controls:
            raise UsageError(f"label {lab!r} is {controls[lab]} of the tokenizer (id "
                             f"{tok.convert_tokens_to_ids(lab)}); as a label it would be read as that control "
                             "token: rename the label")
    added = {t.content: i for i, t in tok.added_tokens_decoder.items()}
    shared = [lab for lab in labels if lab in added]
    if shared and len(shared) < len(labels):
        raise UsageError(f"label {shared[0]!r} is already a token of the tokenizer (added token id {added[shared[0]]}) "
                         "and its label token would share that token's row: rename the label")


def label_token_ids(tok, labels: list[str]) -> list[int] | None:
    """The ids of the label tokens when the tokenizer has one added token for every label, else None.
    Labels that collide with the tokenizer's own tokens are refused (`check_label_collisions`)."""
    check_label_collisions(tok, labels)
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
