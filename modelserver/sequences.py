"""Alphabets, validation and encoding of the sequences a request carries.

Every sequence the models see went through ``check()``: upper-cased, not empty, at most the configured number
of characters, and every letter in its model's alphabet. ``encode()`` turns a list of checked sequences into
one right-padded token tensor (0 is padding, never a letter), which is what keeps a sequence's result the same
alone and in any batch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from modelserver.errors import InvalidSequence, SequenceTooLong

DNA = "ACGTN"
PROTEIN = "ACDEFGHIKLMNPQRSTVWYX"
# Token ids: 0 pads; nucleotides and amino acids get ids of their own (an A in DNA is not an alanine).
DNA_TOKENS = {letter: i + 1 for i, letter in enumerate(DNA)}
PROTEIN_TOKENS = {letter: i + 1 + len(DNA) for i, letter in enumerate(PROTEIN)}
VOCAB_SIZE = 1 + len(DNA) + len(PROTEIN)

_DNA_SET = frozenset(DNA)
# The first letter outside an alphabet, in either case (literal letters only: "ı" is no "i").
_NOT_DNA = re.compile(f"[^{DNA}{DNA.lower()}]")
_NOT_PROTEIN = re.compile(f"[^{DNA}{PROTEIN}{DNA.lower()}{PROTEIN.lower()}]")
_DNA_BYTES = (DNA + DNA.lower()).encode("ascii")
_PROTEIN_BYTES = (DNA + PROTEIN + DNA.lower() + PROTEIN.lower()).encode("ascii")


def is_dna(sequence: str) -> bool:
    """Whether an upper-cased sequence is nucleotides only (``ACGTN``); such a sequence is read as DNA."""
    return _DNA_SET.issuperset(sequence)


def check(sequence: str, max_chars: int, protein: bool, where: str = "sequence") -> str:
    """``sequence`` upper-cased, or a refusal saying which rule it broke (``where`` names it in the message).

    ``protein`` admits the 20 standard amino acids and X besides DNA's ``ACGTN``."""
    if len(sequence) > max_chars:
        raise SequenceTooLong(f"{where} has {len(sequence)} characters; the limit is {max_chars}")
    if not sequence:
        raise InvalidSequence(f"{where} is empty")
    # Checked before upper-casing, case-insensitively: some non-ASCII letters upper-case to ASCII ones. An ASCII
    # sequence is in its alphabet when deleting the alphabet's bytes leaves nothing (one C pass); the pattern
    # finds the first letter outside it only for a refusal's message.
    if sequence.isascii() and not sequence.encode("ascii").translate(None, _PROTEIN_BYTES if protein else _DNA_BYTES):
        return sequence.upper()
    bad = (_NOT_PROTEIN if protein else _NOT_DNA).search(sequence)
    if bad is not None:
        kind = "DNA (ACGTN) or protein (ACDEFGHIKLMNPQRSTVWY, X)" if protein else "DNA (ACGTN)"
        raise InvalidSequence(f"{where} has {bad.group()!r} at position {bad.start()} (0-based); expected {kind}")
    return sequence.upper()


def _table(tokens: dict[str, int]) -> torch.Tensor:
    table = torch.zeros(256, dtype=torch.long)
    for letter, token in tokens.items():
        table[ord(letter)] = token
    return table


_DNA_TABLE = _table(DNA_TOKENS)
_PROTEIN_TABLE = _table(PROTEIN_TOKENS)


def encode(sequences: Sequence[str], protein: Sequence[bool] | None = None, pad_to: int = 1) -> torch.Tensor:
    """(batch, length) token ids of checked sequences, right-padded with 0 to a multiple of ``pad_to``.

    ``protein[i]`` says whether sequence i is read with the protein alphabet (default: all DNA)."""
    longest = max((len(s) for s in sequences), default=0)
    length = -(-longest // pad_to) * pad_to
    raw = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            raw[i, : len(seq)] = torch.frombuffer(bytearray(seq.encode("ascii")), dtype=torch.uint8).long()
    if protein is None or not any(protein):
        return _DNA_TABLE[raw]
    use_protein = torch.tensor(list(protein), dtype=torch.bool).unsqueeze(1)
    return torch.where(use_protein, _PROTEIN_TABLE[raw], _DNA_TABLE[raw])
