"""The reference model service: one process serves one model type (``dnabert2``, ``lucaone`` or ``evo2``)
behind seed 000's inference API. ``python -m modelserver`` runs it; ``python -m modelserver.weights`` makes
the deterministic weights and the golden probes it is checked against. docs/MODELSERVER.md is the guide."""
