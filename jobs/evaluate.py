"""Job: compare attribution.methods with the gold standard; writes the report to groundtruth.output/evaluation."""

from _job import run

if __name__ == "__main__":
    run(["evaluate"])
