"""`make bench`: every benchmark, one after the other, each printing ratios measured in the same run."""

from bench import bench_append, bench_canonical, bench_ledger, bench_verify


def main() -> None:
    bench_canonical.main()
    bench_append.main()
    bench_verify.main()
    bench_ledger.main()


if __name__ == "__main__":
    main()
