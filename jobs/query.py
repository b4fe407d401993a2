"""Job: attribute the query section's inputs (or split) to training rows of store.path; writes query.out."""

from _job import run

if __name__ == "__main__":
    run(["query", "--quiet"])
