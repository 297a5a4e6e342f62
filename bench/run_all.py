"""`make bench`: every benchmark, one after the other, each printing ratios measured in the same run.

The read models run here at 100,000 events (a few minutes); `python -m bench.bench_read_models 1000000` is the
1M-event figure in RESULTS.md (about 7 minutes).
"""

from bench import (
    bench_append,
    bench_canonical,
    bench_demo,
    bench_ledger,
    bench_projections,
    bench_read_models,
    bench_verify,
    bench_verify_since,
)


def main() -> None:
    bench_canonical.main()
    bench_append.main()
    bench_verify.main()
    bench_verify_since.main()
    bench_ledger.main()
    bench_projections.main(20000)
    bench_read_models.main(100_000)
    bench_demo.main(300)


if __name__ == "__main__":
    main()
