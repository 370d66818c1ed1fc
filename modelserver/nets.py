"""The torch networks of the reference models and how their weights are made.

Both share ``Encoder``: tokens are grouped into patches of ``patch`` letters (one embedding row per letter and
offset, summed), then ``layers`` residual 1-D convolutions, then a mean over the sequence's own patches. The
cost is linear in the length (no attention), and a padded position is zeroed after every layer, so a
sequence's result does not depend on the batch it runs in (beyond how the kernels group their sums). ``init_weights`` fills every parameter from one
``torch.Generator`` in sorted-name order, so a seed gives the same weights on every machine.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modelserver.sequences import VOCAB_SIZE

PROMOTER_CLASSES = ("non_promoter", "promoter")
LUCAONE_CLASSES = ("coding", "non_coding", "regulatory", "structural")
LUCAONE_PROPERTIES = ("stability", "solubility", "expression")


class Encoder(nn.Module):
    def __init__(self, dim: int, patch: int, layers: int, kernel: int) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Embedding(VOCAB_SIZE * patch, dim)
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, kernel, padding=kernel // 2) for _ in range(layers))
        self.offsets: torch.Tensor
        self.register_buffer("offsets", torch.arange(patch) * VOCAB_SIZE, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, dim): the mean over each sequence's patches of ``tokens`` (batch, length), 0 padding;
        length must be a multiple of ``patch``."""
        batch, length = tokens.shape
        grouped = tokens.view(batch, length // self.patch, self.patch)
        letters = (grouped != 0).unsqueeze(-1)
        x = (self.embed(grouped + self.offsets) * letters).sum(2).transpose(1, 2)
        mask = letters.any(2).transpose(1, 2).to(x.dtype)
        x = x * mask
        for conv in self.convs:
            x = (x + torch.tanh(conv(x))) * mask
        return x.sum(2) / mask.sum(2).clamp(min=1)


class PromoterNet(nn.Module):
    """DNABERT2-style promoter prediction: one logit, a promoter's probability after a sigmoid."""

    def __init__(self, dim: int = 64, patch: int = 4, layers: int = 3, kernel: int = 5) -> None:
        super().__init__()
        self.encoder = Encoder(dim, patch, layers, kernel)
        self.head = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.encoder(tokens)).squeeze(1))


class LucaOneNet(nn.Module):
    """LucaOne-style: an embedding of ``embedding_dim`` from which class probabilities, properties and a
    property confidence are read."""

    def __init__(self, dim: int = 64, patch: int = 4, layers: int = 3, kernel: int = 5,
                 embedding_dim: int = 768) -> None:
        super().__init__()
        self.encoder = Encoder(dim, patch, layers, kernel)
        self.project = nn.Linear(dim, embedding_dim)
        self.classify = nn.Linear(embedding_dim, len(LUCAONE_CLASSES))
        self.properties = nn.Linear(embedding_dim, len(LUCAONE_PROPERTIES))
        self.certainty = nn.Linear(embedding_dim, 1)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = torch.tanh(self.project(self.encoder(tokens)))
        return {
            "embedding": embedding,
            "class_probabilities": torch.softmax(self.classify(embedding), dim=1),
            "properties": self.properties(embedding),
            "property_confidence": torch.sigmoid(self.certainty(embedding).squeeze(1)),
        }


def init_weights(model: nn.Module, seed: int) -> None:
    """Fill every parameter from ``torch.Generator().manual_seed(seed)``, in sorted-name order: embeddings
    N(0, 1), weights N(0, gain/fan_in), biases N(0, 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("bias"):
                std = 0.1
            elif param.dim() == 2 and name.startswith("encoder.embed"):
                std = 1.0
            else:
                fan_in = param[0].numel()
                # Heads get a larger gain so the probabilities spread instead of sitting at 0.5.
                std = (4.0 if name.startswith(("head", "classify", "certainty")) else 1.0) / math.sqrt(fan_in)
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * std)


def _random_dna(generator: torch.Generator, length: int) -> str:
    return "".join("ACGT"[i] for i in torch.randint(0, 4, (length,), generator=generator).tolist())


def synthetic_promoters(generator: torch.Generator, count: int) -> tuple[list[str], torch.Tensor]:
    """``count`` random DNA sequences, half of them given promoter motifs (a GC box, a CAAT box and a TATA
    box before the end), with labels 1 (promoter) and 0."""
    sequences, labels = [], []
    for i in range(count):
        length = int(torch.randint(120, 400, (1,), generator=generator))
        seq = _random_dna(generator, length)
        if i % 2:
            seq = seq[:-80] + "GGGCGG" + seq[-74:-60] + "CCAAT" + seq[-55:-32] + "TATAAA" + seq[-26:]
        sequences.append(seq)
        labels.append(float(i % 2))
    return sequences, torch.tensor(labels, dtype=torch.float64)


def calibrate(model: nn.Module, seed: int) -> None:
    """Fit the heads, after ``init_weights``, on synthetic data drawn from ``seed``, in closed form:
    PromoterNet's head by ridge regression of a logit of +-3 on motif-bearing against random sequences;
    LucaOneNet's projection bias so the embeddings of random DNA and protein are centred."""
    from modelserver.sequences import PROTEIN, encode

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        if isinstance(model, PromoterNet):
            sequences, labels = synthetic_promoters(generator, 256)
            pooled = model.double().encoder(encode(sequences, pad_to=model.encoder.patch))
            x = torch.cat([pooled, torch.ones(len(sequences), 1, dtype=torch.float64)], dim=1)
            target = (labels * 2 - 1) * 3
            solution = torch.linalg.solve(x.T @ x + 1e-2 * torch.eye(x.shape[1], dtype=torch.float64), x.T @ target)
            model.head.weight.copy_(solution[:-1].unsqueeze(0))
            model.head.bias.copy_(solution[-1:])
        elif isinstance(model, LucaOneNet):
            dna = [_random_dna(generator, 200) for _ in range(64)]
            protein = ["".join(PROTEIN[i] for i in torch.randint(0, 20, (150,), generator=generator).tolist())
                       for _ in range(64)]
            tokens = encode(dna + protein, [False] * 64 + [True] * 64, pad_to=model.encoder.patch)
            model.double()
            model.project.bias.sub_(model.project(model.encoder(tokens)).mean(0))
        model.float()


def build(model_type: str, architecture: dict[str, int]) -> nn.Module:
    """The (untrained, unfilled) network of ``model_type`` with ``architecture``'s sizes."""
    if model_type == "dnabert2":
        return PromoterNet(**architecture)
    if model_type == "lucaone":
        return LucaOneNet(**architecture)
    raise ValueError(f"no network for model type {model_type!r}")
