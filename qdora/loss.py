"""The training objective: next-token cross-entropy over the answer tokens only, with the output
head applied in chunks so the float32 logits of a whole sequence never exist at once."""

from __future__ import annotations

import torch


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int = 1024) -> torch.Tensor:
    """Sum of next-token cross-entropy over labelled (answer) tokens.

    The output head is applied only to labelled positions, `chunk` rows at a time under activation
    checkpointing, so fp32 logits for the whole sequence never exist at once.
    """
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    decoder, head = getattr(model, "model", None), model.get_output_embeddings()
    if decoder is None or head is None or getattr(model.config, "final_logit_softcapping", None):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="sum")
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    hidden, targets = hidden[:, :-1][keep], labels[keep]

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(h).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    # At least one (possibly empty) chunk, so a batch without labels still gives a loss connected to
    # every parameter: under FSDP2 each rank must run the same backward (and reduce-scatters).
    for i in range(0, max(hidden.shape[0], 1), chunk):
        total = total + torch.utils.checkpoint.checkpoint(piece, hidden[i:i + chunk], targets[i:i + chunk],
                                                          use_reentrant=False)
    return total
