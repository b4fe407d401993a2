"""Job: fit each method's operator and build its FAISS index (attribution.methods, index.kind) over store.path."""

from _job import parse, require


def main() -> None:
    config, args = parse(__doc__)
    import tdastore
    from tdastore.index.faiss_index import build_index
    from tdastore.precond.projected import fit_or_load, operator_key
    from tdastore.query import QueryContext

    store = tdastore.open_store(require(config.store.path, "store.path"))
    for method in config.attribution.methods:
        ctx = QueryContext(
            store,
            method,
            {"attribution": {**config.attribution.__dict__, "path": "projected"}, "index": config.index.__dict__},
        )
        if ctx.method.projected is None:
            print(f"{method}: no projected path, nothing to index")
            continue
        op = ctx.method.operator("projected")
        operator = fit_or_load(store, op, ctx.config.attribution, ctx)
        handle = build_index(
            store,
            ctx.method,
            operator,
            operator_key(op, ctx.config.attribution),
            config.index.kind,
            ctx.config.index,
            progress=False,
        )
        print(f"{method}: {handle.directory} ({len(handle.shards)} shard(s))")


if __name__ == "__main__":
    main()
