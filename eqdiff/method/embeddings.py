"""The placeholder token and its frequency-decomposed embeddings (docs/method.md §3).

A placeholder token (``<eqd>``) is added to the tokenizer. Its own embedding row is never
trained; instead learned vectors — S_LF and S_HF with FDTE, a single vector without — replace
the placeholder's *input* token embedding through a forward hook installed on *this* text
encoder's token-embedding module. Which vectors a sample gets is a per-sample mix:
low band → S_LF, high band → S_HF, full band → S_LF + S_HF.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from eqdiff.config import BandInit

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "eqdiff_token."
BAND_MIX = {"low": (1.0, 0.0), "high": (0.0, 1.0), "full": (1.0, 1.0)}


class PlaceholderEmbeddings(nn.Module):
    """Learned vectors for one placeholder token.

    ``vectors`` is (V, D) float32: V = 2 (rows S_LF, S_HF) with FDTE, V = 1 without. The
    single vector starts at the initializer's embedding ``e``; S_LF and S_HF start each at
    ``e`` (``band_init="each-full"``, released: the full-band token starts at 2e) or each at
    ``e / 2`` (``"half"``: it starts at e) (docs/method.md §3).
    """

    def __init__(self, initial: torch.Tensor, *, frequency_decomposed: bool,
                 band_init: BandInit = "each-full") -> None:
        super().__init__()
        count = 2 if frequency_decomposed else 1
        start = initial.detach().float().reshape(1, -1)
        if frequency_decomposed and band_init == "half":
            start = start / 2
        self.vectors = nn.Parameter(start.repeat(count, 1))
        self._mix: torch.Tensor | None = None
        self.injecting = True  # off within :meth:`table_row`
        # mixes by band tuple, made once on the vectors' device (no host copy per step)
        self._mix_cache: dict[tuple[str, ...], torch.Tensor] = {}

    @property
    def frequency_decomposed(self) -> bool:
        return self.vectors.shape[0] == 2

    def mix_for_bands(self, bands: Sequence[str]) -> torch.Tensor:
        """Per-sample mixing weights (B, V) float32 for band names ``low``/``high``/``full``.

        Each distinct band tuple is built once on the vectors' device and reused (a training
        step then copies nothing from the host); treat the result as read-only.
        """
        key = tuple(str(band) for band in bands)
        cached = self._mix_cache.get(key)
        if cached is not None and cached.device == self.vectors.device:
            return cached
        if not self.frequency_decomposed:
            mix = torch.ones(len(key), 1, device=self.vectors.device)
        else:
            try:
                rows = [BAND_MIX[band] for band in key]
            except KeyError as err:
                raise ValueError(f"unknown band {err.args[0]!r}; expected one of "
                                 f"{list(BAND_MIX)}") from None
            mix = torch.tensor(rows, device=self.vectors.device)
        self._mix_cache[key] = mix
        return mix

    def inference_vector(self) -> torch.Tensor:
        """The token used at inference: S_LF + S_HF (or the single vector). Shape (D,)."""
        return self.vectors.detach().sum(dim=0)

    @contextmanager
    def mixing(self, mix: torch.Tensor) -> Iterator[None]:
        """Within the block, text-encoder calls give sample b the vector ``mix[b] @ vectors``.

        ``mix`` is (B, V). Outside any block the inference vector is used for every sample.
        """
        if mix.ndim != 2 or mix.shape[1] != self.vectors.shape[0]:
            raise ValueError(f"mix must be (batch, {self.vectors.shape[0]}), got "
                             f"{tuple(mix.shape)}")
        previous, self._mix = self._mix, mix
        try:
            yield
        finally:
            self._mix = previous

    @contextmanager
    def table_row(self) -> Iterator[None]:
        """Within the block no learned vector is injected: the placeholder keeps its own table
        row, the initializer's embedding (RRA's released reference prompt, §5)."""
        previous, self.injecting = self.injecting, False
        try:
            yield
        finally:
            self.injecting = previous

    def vectors_for_batch(self, batch_size: int) -> torch.Tensor:
        """(B, D) vectors for the current mix (inference vector when no mix is set)."""
        if self._mix is None:
            return self.vectors.sum(dim=0, keepdim=True).expand(batch_size, -1)
        if self._mix.shape[0] != batch_size:
            raise ValueError(f"mix is for {self._mix.shape[0]} samples but the text encoder got "
                             f"{batch_size}")
        return self._mix.to(self.vectors.dtype) @ self.vectors

    def learned_tensors(self) -> dict[str, torch.Tensor]:
        return {TOKEN_PREFIX + "vectors": self.vectors.detach().clone()}


@dataclass
class EmbeddingHandle:
    """Undoes :func:`install_placeholder_embeddings`' hook (the token stays in the tokenizer)."""

    hook: torch.utils.hooks.RemovableHandle

    def remove(self) -> None:
        self.hook.remove()


def add_placeholder_token(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                          placeholder: str, initializer: str) -> tuple[int, torch.Tensor]:
    """Add ``placeholder`` to the tokenizer and grow the embedding matrix by one row.

    The new row holds the initializer word's embedding (the mean of its token embeddings when
    the word splits into several BPE tokens, as the released default "ktn" does), so the
    model behaves as with that word until learned vectors are injected. Returns
    (placeholder id, initial vector (D,)). Rows of existing tokens are copied unchanged.
    """
    init_ids = tokenizer.encode(initializer, add_special_tokens=False)
    if not init_ids:
        raise ValueError(f"initializer word {initializer!r} gives no tokens")
    if placeholder in tokenizer.get_vocab():
        raise ValueError(f"placeholder {placeholder!r} is already a token of this tokenizer; "
                         "choose another")
    tokenizer.add_tokens([placeholder])
    token_id = tokenizer.convert_tokens_to_ids(placeholder)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        initial = table[init_ids].mean(dim=0)
        table[token_id] = initial
    return token_id, initial.detach().clone()


def install_placeholder_embeddings(text_encoder: CLIPTextModel, token_id: int,
                                   embeddings: PlaceholderEmbeddings) -> EmbeddingHandle:
    """Inject ``embeddings`` at every position of ``token_id`` in this text encoder's input.

    The hook lives on this instance's token-embedding module only; the embedding table itself
    is not modified, so every row stays bit-identical.
    """
    module = text_encoder.get_input_embeddings()

    def replace_placeholder(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not embeddings.injecting:
            return output
        input_ids = args[0]
        where = input_ids == token_id  # (B, L); rows without the token keep ``output``
        vectors = embeddings.vectors_for_batch(input_ids.shape[0]).to(output.dtype)  # (B, D)
        return torch.where(where.unsqueeze(-1), vectors.unsqueeze(1), output)

    return EmbeddingHandle(module.register_forward_hook(replace_placeholder))


def write_token_row(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, placeholder: str,
                    vector: torch.Tensor) -> int:
    """Add ``placeholder`` (if needed) and write ``vector`` into its embedding row.

    This is how a trained concept reaches a plain diffusers pipeline: no hook, just a row.
    """
    if placeholder not in tokenizer.get_vocab():
        tokenizer.add_tokens([placeholder])
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    token_id = tokenizer.convert_tokens_to_ids(placeholder)
    table = text_encoder.get_input_embeddings().weight
    if vector.shape != table.shape[1:]:
        raise ValueError(f"token vector has shape {tuple(vector.shape)} but this text encoder's "
                         f"embeddings are {tuple(table.shape[1:])}")
    with torch.no_grad():
        table[token_id] = vector.to(table.dtype)
    return token_id
