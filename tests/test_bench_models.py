"""The model service's benchmarks in small: their own code, on a few records and seconds, so that they run
and check what they claim to (the service's features equal to the per-record maths; the same answer
batched and alone). Correctness only, no timing."""

from __future__ import annotations

from bench import model_batching, model_features


def test_the_feature_benchmark_checks_the_service_against_the_per_record_maths() -> None:
    result = model_features.measure(records_count=250, clients=2, baseline_records=250, min_length=300,
                                    max_length=900, rounds=1)
    assert result["records"] == 250 and result["batch"] == 100
    assert result["service_records_per_s"] > 0 and result["python_records_per_s"] > 0


def test_the_batching_benchmark_sees_batches_and_equal_answers() -> None:
    result = model_batching.measure(clients=8, seconds=1, rounds=1, length=120, warmup=0.5)
    assert result["batched"]["requests_per_s"] > 0 and result["unbatched"]["requests_per_s"] > 0
    # Eight clients against one model thread: calls wait together and run as batches of more than one.
    assert result["mean_batch_size"] is not None and result["mean_batch_size"] > 1
