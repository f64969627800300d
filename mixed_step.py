"""One forward pass over the serving engine's decoding rows and one prompt's next chunk: chunked prefill beside
decoding, as Sarathi-Serve (Agrawal et al. 2024) and vLLM schedule it.

A decode step over a few rows costs mostly the reading of every weight, and so does a short chunk of a prompt.
Run apart, an iteration that prefills reads the weights twice, and the decoding rows wait for both passes; run
together, the feed-forward layers (most of each block's weights) read theirs once, over the decoding rows' tokens
and the chunk's side by side in one sequence. So a chunk can be short, and the gap between a decoding row's
tokens with it, at little cost in throughput. Attention runs apart for each part (each reads its own cache rows,
at its own positions). Every layer is called as model.Transformer.forward calls it, so every swapped-in form,
quantized cache and tensor-parallel hook applies as it does there.
"""
import torch
from torch import Tensor

from model import Transformer


def mixed_logits(model: Transformer, tokens: Tensor, positions: Tensor, attended: int, chunk: Tensor,
                 chunk_positions: Tensor, chunk_row: int, chunk_attended: int) -> tuple:
    """The logits of the decoding rows' tokens (rows, 1), row i at cache slot positions[i] (rows, 1) of cache row
    i, and of the last of a prompt's chunk (1, length), written into cache row chunk_row at chunk_positions
    (length,): (rows, vocab) and (1, vocab). attended, chunk_attended: the cache slots each part's attention
    reads (model.ForwardOptions.attended_slots)."""
    rows = tokens.shape[0]
    rope, mask = model.rope_and_mask(positions)
    chunk_rope, chunk_mask = model.rope_and_mask(chunk_positions)
    mask, chunk_mask = mask[..., :attended], chunk_mask[..., :chunk_attended]
    x, chunk_x = model.tok_embeddings(tokens), model.tok_embeddings(chunk)  # (rows, 1, dim), (1, length, dim)
    for layer in model.layers:  # model.TransformerBlock.forward, attention apart, the feed-forward together
        x = x + layer.attention(layer.attention_norm(x), rope, mask, positions)
        chunk_x = chunk_x + layer.attention(layer.attention_norm(chunk_x), chunk_rope, chunk_mask, chunk_positions,
                                            chunk_row)
        h = torch.cat([x.view(1, rows, -1), chunk_x], dim=1)  # (1, rows + length, dim)
        h = h + layer.feed_forward(layer.ffn_norm(h))
        x, chunk_x = h[:, :rows].view(rows, 1, -1), h[:, rows:]
    last = torch.cat([x.view(1, rows, -1), chunk_x[:, -1:]], dim=1)  # (1, rows + 1, dim)
    logits = model.output(model.norm(last))[0]
    return logits[:rows], logits[rows:]
