"""What the tests and the benchmarks share: ``net`` (free ports, waiting for a listener), ``poll`` (waiting
for a condition, sync and async), ``pg`` (a throwaway PostgreSQL cluster), ``procs`` (a deployment as real
processes) and ``served`` (a hub served in process on a real port). Each helper exists once, here."""
