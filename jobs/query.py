"""Job: attribute the query section's inputs (or split) to training rows; writes query.out (Parquet)."""

from _job import parse, require


def main() -> None:
    config, args = parse(__doc__)
    import tdastore

    store = tdastore.open_store(require(config.store.path, "store.path"))
    q = config.query
    overrides = {"attribution": config.attribution.__dict__, "index": config.index.__dict__}
    table = store.query(
        q.method,
        split=None if q.inputs else q.split,
        inputs=q.inputs,
        top_k=q.top_k,
        kind=q.kind,
        out=q.out,
        overrides=overrides,
    )
    print(f"{table.num_rows} rows written to {q.out}")


if __name__ == "__main__":
    main()
