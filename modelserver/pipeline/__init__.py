"""Seed 001's feature pipeline as three job steps run inside the reference model image.

``convert`` (UniProt-style TSV -> JSONL), ``features`` (JSONL -> the features JSON, computed by
``modelserver.features`` in batches, or by a running evo2 service) and ``enhance`` (JSONL + features -> the
enhanced JSONL), each ``python -m modelserver.pipeline.<step> --input ... --output ...``; ``run`` chains the
three in one process and ``dataset`` writes a synthetic input. Every step streams its input, writes its output
atomically (a temporary file renamed into place), and reports progress on stdout and in
``$MMANAGER_PROGRESS_FILE``.
"""
