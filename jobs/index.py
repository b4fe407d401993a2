"""Job: fit each method's operator and build its FAISS index (attribution.methods, index.kind) over store.path."""

from _job import run

if __name__ == "__main__":
    run(["index", "--quiet"])
