"""Text tasks on a tiny GPT-2 built from a config and saved locally, with a tokenizer trained here.

Hook-based factored gradients (Conv1D layers) against dense torch.func gradients projected with the same
matrices; padding and batch invariance; a Ray build, FAISS index and prompt queries end to end by local
path; K-FAC / EK-FAC in the factored space against independent computations; bad input.
"""

import json

import numpy as np
import pytest
import torch
from helpers import assert_same_top_k, ranked_atol, served_table
from torch.func import functional_call, grad, vmap

import tdastore
from tdastore.attribution import Attributor
from tdastore.config import ModelConfig, TaskConfig, config_to_dict, load_config
from tdastore.distributed.build import build_store
from tdastore.errors import ConfigError, DataError, GradientError, StoreError
from tdastore.grads.computer import make_gradient_computer
from tdastore.grads.factored import FactoredLinearGradients, is_conv1d, module_dims
from tdastore.tasks import make_task

MODULES = ["*.c_attn", "*.c_proj", "*.c_fc"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tdastore.demo_text import make_tiny_lm

    root = tmp_path_factory.mktemp("tiny_lm")
    make_tiny_lm(root, n_layer=2, n_embd=64, n_head=4, vocab_size=384, n_positions=64, train_steps=30, documents=300)
    return root


def text_config(root, tmp_path=None, **sections):
    raw = {
        "task": {"dataset": str(root / "corpus.jsonl"), "kind": "causal_lm", "max_length": 48, "id_column": "id"},
        "model": {"name_or_path": str(root / "model")},
        "gradients": {"modules": MODULES, "batch_size": 16},
        "projection": {"kind": "factored", "factors": [8, 8], "module_factors": {"*.mlp.c_fc": [12, 6]}},
        "store": {"chunk_rows": 32, "shard_rows": 64},
        "build": {"workers": 2, "max_retries": 0},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return load_config(raw)


def dense_projected(task, model, computer, examples, scales=None) -> torch.Tensor:
    """Per-example gradients by torch.func (one example at a time, no padding), each module's [out, in+1]
    block (times scales[parameter], if given) projected with the computer's own P_out, P_in: [B, K]."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, x, y):
        return task.per_example_loss(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0)).squeeze(0)

    rows = []
    for i in range(len(examples)):
        one = examples.slice(i, i + 1)  # trimmed to its own length
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, one.inputs, one.targets)
        if scales is not None:
            g = {n: v * scales[n] if n in scales else v for n, v in g.items()}
        parts, modules = [], dict(model.named_modules())
        for (name, _, d_in), p_out, p_in in zip(computer.blocks, computer.p_out, computer.p_in):
            weight = g[f"{name}.weight"][0].double()  # a tied weight's gradient holds both of its uses
            weight = weight.T if is_conv1d(modules[name]) else weight  # [out, in]
            with_bias = d_in == weight.shape[1] + 1
            full = torch.cat([weight, g[f"{name}.bias"][0].double()[:, None]], 1) if with_bias else weight
            left = full if p_out is None else p_out.double().T @ full
            parts.append((left if p_in is None else left @ p_in.double()).reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def test_hook_factored_gradients_equal_dense_projected(tiny_lm):
    config = text_config(tiny_lm)
    task = make_task(config.task, config.model)
    model = task.make_model()
    computer = make_gradient_computer(model, task.per_example_loss, config.gradients, config.projection)
    assert isinstance(computer, FactoredLinearGradients)
    assert sum(is_conv1d(m) for _, m, _ in computer.modules) == 8  # 2 layers x (c_attn, attn c_proj, c_fc, mlp c_proj)
    assert computer.dims[2] == (12, 6) and computer.dims[0] == (8, 8)  # per-module dims from module_factors
    examples = task.examples("train").slice(0, 10)
    lengths = examples.inputs[:, 1].sum(1)
    assert lengths.min() < lengths.max()  # the batch really is padded
    rows, losses, sq_norms = computer(examples.inputs, examples.targets)
    expected = dense_projected(task, model, computer, examples)
    rel = float((rows.double() - expected).norm(dim=1).max() / expected.norm(dim=1).min())
    assert rel <= 1e-4, rel
    # the full-gradient norms the store records, from the same dense gradients
    params = {n: p for n, p in model.named_parameters()}
    one = examples.slice(3, 4)
    model.zero_grad()
    task.per_example_loss(model(one.inputs), one.targets).sum().backward()
    selected = [
        p.grad
        for n, p in params.items()
        if any(n == f"{name}.{w}" for name, _, _ in computer.modules for w in ("weight", "bias"))
    ]
    assert abs(float(sum(g.pow(2).sum() for g in selected)) - float(sq_norms[3])) <= 1e-4 * float(sq_norms[3])


@pytest.mark.parametrize("normalizer", [None, "adafactor"])
def test_modules_all_covers_embeddings_and_the_tied_head_exactly(tiny_lm, normalizer):
    """modules: all: the token and position embeddings and the LM head tied to the token embedding, one block per
    weight; rows equal the projected autograd gradient of every matrix (the tied weight's holds both uses), with
    the Adafactor normaliser too, and the norms are the full gradient's."""
    from tdastore.grads.normaliser import Normaliser

    config = text_config(tiny_lm, gradients={"modules": "all"}, projection={"factors": [8, 8], "module_factors": {}})
    task = make_task(config.task, config.model)
    model = task.make_model()
    moments = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(2)) + 0.1 for n, p in
               model.named_parameters()}  # fmt: skip
    normaliser = None if normalizer is None else Normaliser(normalizer, moments, 1e-8, "test").bind(model)
    computer = make_gradient_computer(model, task.per_example_loss, config.gradients, config.projection, normaliser)
    names = [name for name, _, _ in computer.blocks]
    assert names[:2] == ["model.transformer.wte", "model.transformer.wpe"] and "model.lm_head" not in names
    assert computer.tied == {"model.lm_head": "model.transformer.wte"} and computer.spec()["tied"] == computer.tied
    assert len(names) == 2 + 8  # embeddings + 4 layers per block; norm layers' vectors are not matrices
    examples = task.examples("train").slice(0, 6)
    rows, _, sq_norms = computer(examples.inputs, examples.targets)
    if normaliser is None:
        expected = dense_projected(task, model, computer, examples)
    else:  # project the gradient scaled by Adafactor's rank-one S, block by block, from the same dense gradients
        scaled = {n: normaliser.scale(n) for n in computer.param_shapes}
        expected = dense_projected(task, model, computer, examples, scaled)
    rel = float((rows.double() - expected).norm(dim=1).max() / expected.norm(dim=1).min())
    assert rel <= 1e-4, rel
    one = examples.slice(2, 3)
    model.zero_grad()
    task.per_example_loss(model(one.inputs), one.targets).sum().backward()
    full = sum(
        float((p.grad * (1 if normaliser is None else normaliser.scale(n))).pow(2).sum())
        for n, p in model.named_parameters()
        if n in computer.param_shapes
    )
    assert abs(full - float(sq_norms[2])) <= 1e-4 * full


def test_padding_and_batch_composition_do_not_change_rows(tiny_lm):
    config = text_config(tiny_lm)
    task = make_task(config.task, config.model)
    computer = make_gradient_computer(task.make_model(), task.per_example_loss, config.gradients, config.projection)
    train = task.examples("train")
    alone = torch.cat([computer(*_io(train.slice(i, i + 1)))[0] for i in range(8)])
    assert train._whole is None  # batches come from the Arrow table; the split is never padded as a whole
    batched = computer(*_io(train.slice(0, 8)))[0]
    reordered = computer(*_io(train.take(torch.tensor([7, 3, 0, 5, 1, 6, 2, 4]))))[0]
    padded_wide = train.take(torch.arange(8))
    wide_inputs = torch.nn.functional.pad(padded_wide.inputs, (0, 9))  # 9 more pad columns (mask 0)
    wide_targets = torch.nn.functional.pad(padded_wide.targets, (0, 9), value=-100)
    wide = computer(wide_inputs, wide_targets)[0]
    scale = float(alone.abs().max())
    assert float((batched - alone).abs().max()) <= 1e-5 * scale
    assert float((reordered - alone[[7, 3, 0, 5, 1, 6, 2, 4]]).abs().max()) <= 1e-5 * scale
    assert float((wide - alone).abs().max()) <= 1e-5 * scale


def _io(examples):
    return examples.inputs, examples.targets


def test_encoding_masks_packing_and_completion_only(tiny_lm, tmp_path):
    records = [{"id": 10 + i, "prompt": f"Question {i}:", "text": " the answer is to return a value"} for i in range(6)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    config = text_config(
        tiny_lm, task={"dataset": str(path), "prompt_column": "prompt", "completion_only": True, "test_fraction": 0.34}
    )
    task = make_task(config.task, config.model)
    tok = task.tokenizer
    train = task.examples("train")
    prompt_len = len(tok("Question 0:")["input_ids"])
    assert (train.targets[:, :prompt_len] == -100).all()
    n_tokens = int(train.inputs[0, 1].sum())
    assert (train.targets[0, prompt_len:n_tokens] == train.inputs[0, 0, prompt_len:n_tokens]).all()
    assert set(train.ids.tolist()) | set(task.examples("test").ids.tolist()) == {10, 11, 12, 13, 14, 15}

    packed = make_task(*_sections(text_config(tiny_lm, task={"packing": True, "max_length": 32})))
    blocks = packed.examples("train")
    assert (blocks.inputs[:, 1].sum(1)[:-1] == 32).sum() >= len(blocks) - 2  # full blocks, but the split's last
    assert tok.eos_token_id in blocks.inputs[:, 0].reshape(-1).tolist()


def _sections(config):
    return config.task, config.model


def test_end_to_end_build_index_query_by_local_path(ray_cluster, serve_url, tiny_lm, tmp_path, capsys):
    config = text_config(tiny_lm)
    store = build_store(config, tmp_path / "store", progress=False)
    task = make_task(config.task, config.model)
    train = task.examples("train")
    assert store.n_rows == len(train) and store.dim == 6 * 64 + 2 * 72
    left_out = len(task.examples("test"))  # test_fraction's documents are not in the store, and the build says so
    assert f"{left_out:,} of {left_out + len(train):,} documents" in capsys.readouterr().err
    meta = store.meta
    assert meta.column("text").to_pylist()[:3] == [str(t) for t in train.texts[:3]]
    # a training document queried against the store: its own row comes first
    docs = tmp_path / "docs.jsonl"
    picks = [0, 5, 17, 42, 99]
    docs.write_text("\n".join(json.dumps({"id": i, "text": str(train.texts[i])}) for i in picks))
    for method, kind in (("grad_cos", "flat"), ("grad_cos", None)):
        table = tdastore.query(store, method, inputs=str(docs), top_k=3, kind=kind)
        top = table.filter(table.column("rank").to_numpy() == 1)
        assert top.column("train_row").to_pylist() == picks
        assert top.column("train_text").to_pylist() == [str(train.texts[i]) for i in picks]
    # the task's own split object works as inputs too (Arrow-backed, not re-tokenised)
    table = tdastore.query(store, "grad_cos", inputs=task.examples("train").take(np.array(picks)), top_k=1)
    assert table.column("train_row").to_pylist() == picks
    split_rows = tdastore.query(store, "grad_cos", inputs=task.examples("test"), top_k=1)
    assert split_rows.num_rows == len(task.examples("test"))
    # a prompt (the start of a document) through the CLI, results with text in Parquet
    prompt = tmp_path / "prompts.jsonl"
    prompt.write_text(json.dumps({"text": " ".join(str(train.texts[42]).split()[:10])}))
    out = tmp_path / "top.parquet"
    from tdastore.cli import main

    assert (
        main(
            ["query", str(store.root), "--method", "ekfac", "--inputs", str(prompt), "--top-k", "5", "--out", str(out)]
        )
        == 0
    )
    import pyarrow.parquet as pq

    result = pq.read_table(out)
    assert result.num_rows == 5 and "train_text" in result.column_names and "test_text" in result.column_names
    assert (store.root / "precond").is_dir()  # the EK-FAC operator was fitted once and saved with the store
    # the query service answers prompts over a text store, with the documents' text, top-k and bottom-k
    from test_serve import deploy, post

    from tdastore.serve import application

    url = deploy(serve_url, application(str(store.root), methods=["grad_cos", "kfac"]), "text")
    prompts = [str(train.texts[i]) for i in picks[:3]]
    status, body = post(url, {"method": "grad_cos", "inputs": prompts, "top_k": 2, "bottom_k": 2})
    assert status == 200, body
    for key, ranked in (("top", "top_k"), ("bottom", "bottom_k")):
        expected = getattr(Attributor(store, "grad_cos", kind="flat"), ranked)(prompts, 2)
        hits = [hit for result in body["results"] for hit in result[key]]
        assert_same_top_k(served_table(expected, hits), expected, ranked_atol(expected, store.dim))  # its threads
        assert [h["train_text"] for h in hits] == [str(train.texts[h["train_row"]]) for h in hits]
    assert post(url, {"method": "kfac", "inputs": prompts[:1]})[0] == 200  # a factored store answers K-FAC
    # a request chooses its measurement: the answer equals the Python API's with that measurement
    status, body = post(url, {"method": "grad_cos", "inputs": prompts, "top_k": 2, "measurement": "margin"})
    assert status == 200 and body["measurement"] == "margin", body
    expected = Attributor(store, "grad_cos", {"attribution": {"measurement": "margin"}}, kind="flat").top_k(prompts, 2)
    hits = [hit for result in body["results"] for hit in result["top"]]
    assert_same_top_k(served_table(expected, hits), expected, ranked_atol(expected, store.dim))
    assert post(url, {"method": "grad_cos", "inputs": prompts[:1], "measurement": "os:system"})[0] == 422
    # token-level shares through the service equal the Python API's, and each side sums to the hit's score
    status, body = post(url, {"method": "grad_cos", "inputs": prompts[:2], "top_k": 2, "tokens": True})
    assert status == 200, body
    expected = Attributor(store, "grad_cos").token_scores(prompts[:2], k=2).to_pydict()
    served = [(h, share) for r in body["results"] for h in r["top"] for share in h["tokens"]]
    assert len(served) == len(expected["score"])
    np.testing.assert_allclose([s["score"] for _, s in served], expected["score"], rtol=1e-4, atol=1e-9)
    for hit in (h for r in body["results"] for h in r["top"]):
        for side in ("train", "test"):
            total = sum(s["score"] for s in hit["tokens"] if s["side"] == side)
            assert abs(total - hit["score"]) <= 1e-3 * abs(hit["score"]) + 1e-6
    assert post(url, {"method": "grad_cos", "inputs": prompts[:1], "tokens": "yes"})[0] == 422
    # and through the CLI: a folder gets the table, the HTML and the PNG
    assert main(["query", str(store.root), "--method", "grad_dot", "--inputs", str(prompt), "--top-k", "2",
                 "--tokens", str(tmp_path / "tokens"), "--quiet"]) == 0  # fmt: skip
    tokens = pq.read_table(tmp_path / "tokens" / "tokens.parquet")
    assert set(tokens.column("rank").to_pylist()) == {1, 2}
    page = (tmp_path / "tokens" / "tokens.html").read_text()
    assert "training document tokens" in page and "background:rgb(" in page
    assert (tmp_path / "tokens" / "tokens.png").stat().st_size > 1000
    assert post(url, {"method": "grad_cos", "inputs": [[1.0, 2.0]]})[0] == 422
    assert post(url, {"method": "grad_cos", "inputs": ["x"], "targets": [1]})[0] == 422
    assert post(url, {"method": "grad_cos", "inputs": ["   "]})[0] == 422
    from ray import serve

    serve.delete("text")


def test_kfac_operator_against_numpy(tiny_lm):
    """Factors from independent hooks (numpy, token by token) and (S (x) A + lambda I)^-1 solved densely."""
    from tdastore.precond.projected.kronecker import factored_covariances

    config = text_config(tiny_lm)
    task = make_task(config.task, config.model)
    model = task.make_model()
    computer = FactoredLinearGradients(
        model, task.per_example_loss, config.gradients.params, config.projection, config.gradients.modules
    )
    train = task.examples("train").slice(0, 24)
    covs = factored_covariances(computer, task, train, batch_size=7)
    index = 2  # layer 0's mlp.c_fc: a Conv1D with bias, both sides projected (12 x 6)
    name, module, _ = computer.modules[index]
    acts, outs = [], []

    def keep(_, args, output):
        acts.append(args[0].detach())
        outs.append(output)

    handle = module.register_forward_hook(keep)
    a_sum, s_sum, tokens = np.zeros((6, 6)), np.zeros((12, 12)), 0
    p_in, p_out = computer.p_in[index].double().numpy(), computer.p_out[index].double().numpy()
    for i in range(len(train)):
        one = train.slice(i, i + 1)
        acts.clear(), outs.clear()
        loss = task.per_example_loss(model(one.inputs), one.targets).sum()
        (d,) = torch.autograd.grad(loss, outs[0])
        a = np.concatenate([acts[0][0].double().numpy(), np.ones((acts[0].shape[1], 1))], 1)  # [T, in + 1]
        for t in range(a.shape[0]):
            at, dt = a[t] @ p_in, d[0, t].double().numpy() @ p_out
            a_sum += np.outer(at, at)
            s_sum += np.outer(dt, dt)
            tokens += 1
    handle.remove()
    np.testing.assert_allclose(covs[index][0], a_sum / tokens, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(covs[index][1], s_sum / len(train), rtol=1e-6, atol=1e-14)


def test_factored_ekfac_equals_exact_ekfac_on_an_mlp(ray_cluster, tmp_path):
    """With projections no narrower than the layers the factored space is the full gradient space (T = 1), so
    the projected EK-FAC must score exactly like the exact path's EK-FAC (tested against hand-built factors)."""
    from conftest import small_config

    from tdastore.attribution import Attributor
    from tdastore.methods import get_method
    from tdastore.precond.exact.scorer import ExactScorer
    from tdastore.precond.registry import FitInputs, operator_class

    config = small_config(tmp_path, model={"hidden": [8]}, projection={"kind": "factored", "factors": [64, 64]})
    tdastore.train(config, progress=False)
    store = build_store(config, tmp_path / "store", progress=False)
    ctx = Attributor(store, "grad_dot", {"attribution": {"damping_factor": 0.5}})
    inputs = FitInputs(store, ctx.config, ctx.model, ctx.task)
    operator = operator_class("projected", "ekfac")().fit(inputs)
    test = ctx.task.examples("test").slice(0, 6)
    projected = operator.solve(ctx.test_rows(test)) @ store.read_rows().T / store.n_rows  # [6, N]
    exact = ExactScorer(ctx.model, ctx.task, ctx.config).scores(get_method("ekfac"), test).numpy()
    assert np.abs(projected - exact).max() <= 1e-4 * np.abs(exact).max()
    kfac = operator_class("projected", "kfac")().fit(inputs)
    assert kfac.info["damping"] != operator.info["damping"]  # uncorrected eigenvalues: another operator


def test_bad_input_is_a_clear_error(tiny_lm, tmp_path):
    config = text_config(tiny_lm, gradients={"modules": ["*.attention_nowhere"]})
    task = make_task(config.task, config.model)
    with pytest.raises(GradientError, match=r"gradients.modules \['\*.attention_nowhere'\] match no Linear / Conv1D"):
        make_gradient_computer(task.make_model(), task.per_example_loss, config.gradients, config.projection)
    # a tokenizer whose vocabulary the model cannot embed
    from transformers import GPT2Config, GPT2LMHeadModel

    small = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(DataError, match="tokenizer has 384 tokens but the model's vocabulary has 100"):
        make_task(
            *_sections(
                text_config(
                    tiny_lm, model={"name_or_path": str(tmp_path / "small"), "tokenizer": str(tiny_lm / "model")}
                )
            )
        )
    # documents longer than max_length without truncation
    with pytest.raises(DataError, match=r"exceed task.max_length=8 tokens .* set task.truncation: true"):
        make_task(*_sections(text_config(tiny_lm, task={"max_length": 8, "truncation": False})))
    with pytest.raises(ConfigError, match="exceeds the model's context of 64 tokens"):
        make_task(*_sections(text_config(tiny_lm, task={"max_length": 65})))
    with pytest.raises(DataError, match="no id column 'doc_id'"):
        make_task(*_sections(text_config(tiny_lm, task={"id_column": "doc_id"})))
    with pytest.raises(DataError, match="has no column 'body'"):
        make_task(*_sections(text_config(tiny_lm, task={"text_column": "body"})))
    with pytest.raises(ConfigError, match="nothing to train"):
        tdastore.train(text_config(tiny_lm, train={"output_dir": str(tmp_path / "m")}), progress=False)
    assert module_dims(task.make_model().model.transformer.h[0].mlp.c_fc) == (64, 256)


def test_sequence_classification_gradients(tiny_lm, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm / "model")
    torch.manual_seed(0)
    head = GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=64,
            n_embd=32,
            n_layer=1,
            n_head=2,
            num_labels=2,
            pad_token_id=tokenizer.eos_token_id,
        )
    )
    head.save_pretrained(tmp_path / "cls")
    tokenizer.save_pretrained(tmp_path / "cls")
    docs = [json.loads(line) for line in (tiny_lm / "corpus.jsonl").read_text().splitlines()][:60]
    path = tmp_path / "labelled.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"text": d["text"], "label": "returns" if "return" in d["text"] else "other"}) for d in docs
        )
    )
    config = text_config(
        tiny_lm,
        task={"dataset": str(path), "kind": "sequence_classification", "id_column": None},
        model={"name_or_path": str(tmp_path / "cls")},
        gradients={"modules": ["*.c_attn", "score"]},
    )
    task = make_task(config.task, config.model)
    assert task.classes == ["other", "returns"]
    model = task.make_model()
    computer = make_gradient_computer(model, task.per_example_loss, config.gradients, config.projection)
    examples = task.examples("train").slice(0, 6)
    rows = computer(examples.inputs, examples.targets)[0]
    expected = dense_projected(task, model, computer, examples)
    assert float((rows.double() - expected).norm(dim=1).max() / expected.norm(dim=1).min()) <= 1e-4
    with pytest.raises(DataError, match=r"labels \['maybe'\] were not seen in training"):
        task.encode([{"text": "a new document", "label": "maybe"}])


def test_full_norms_off_records_the_stored_rows_norm(tiny_lm):
    on = text_config(tiny_lm)
    off = text_config(tiny_lm, gradients={"full_norms": False})
    task = make_task(on.task, on.model)
    model = task.make_model()
    part = task.examples("train").slice(0, 5)
    rows_on, _, norms_on = make_gradient_computer(model, task.per_example_loss, on.gradients, on.projection)(*_io(part))
    rows_off, _, norms_off = make_gradient_computer(model, task.per_example_loss, off.gradients, off.projection)(
        *_io(part)
    )
    torch.testing.assert_close(rows_off, rows_on)
    torch.testing.assert_close(norms_off, rows_off.pow(2).sum(1))
    assert not torch.allclose(norms_on, norms_off, rtol=1e-3)  # the full gradient's norm is another number


def test_text_and_parquet_files_and_dataset_objects(tiny_lm, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tdastore.tasks.text import TextTask

    docs = [json.loads(line)["text"] for line in (tiny_lm / "corpus.jsonl").read_text().splitlines()][:40]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs) + "\n")  # one paragraph per document
    pq.write_table(pa.table({"text": docs}), tmp_path / "corpus.parquet")
    texts = []
    for name in ("corpus.txt", "corpus.parquet"):
        config = text_config(tiny_lm, task={"dataset": str(tmp_path / name), "id_column": None, "test_fraction": 0.25})
        task = make_task(config.task, config.model)
        assert len(task.examples("train")) + len(task.examples("test")) == 40
        texts.append(sorted(str(t) for t in task.examples("train").texts))
    assert texts[0] == texts[1]
    from_object = TextTask(config.task, config.model, dataset=datasets.Dataset.from_dict({"text": docs}))
    assert sorted(str(t) for t in from_object.examples("train").texts) == texts[1]


def test_token_budget_batches_give_the_same_rows_with_less_padding(tiny_lm):
    """gradients.max_tokens: length-sorted batches of at most that many padded tokens; rows land in example order
    and equal fixed-size batching; the padding is measured."""
    from tdastore.distributed.gradient_worker import ShardComputer
    from tdastore.grads.batching import plan_batches
    from tdastore.store.writer import Shard

    lengths = np.array([5, 60, 7, 33, 60, 2, 9, 41])
    batches = plan_batches(len(lengths), 4, lengths, max_tokens=70)
    assert sorted(np.concatenate(batches).tolist()) == list(range(8))
    assert all(len(b) * lengths[b].max() <= 70 or len(b) == 1 for b in batches)

    shard = Shard(0, 0, 64)
    fixed = ShardComputer(text_config(tiny_lm, gradients={"batch_size": 16}), "train")
    rows_fixed = fixed.compute(shard)[0].copy()
    budget = ShardComputer(text_config(tiny_lm, gradients={"batch_size": 16, "max_tokens": 512}), "train")
    rows_budget, meta = budget.compute(shard)
    scale = float(np.abs(rows_fixed).max())
    assert float(np.abs(rows_budget - rows_fixed).max()) <= 1e-5 * scale
    assert meta.column("row").to_pylist() == list(range(64))
    (real, padded_fixed), (real_b, padded_budget) = fixed.tokens, budget.tokens
    assert real == real_b and padded_budget < padded_fixed
    assert 1 - real / padded_budget < 1 - real / padded_fixed  # less padding with the token budget


def test_bfloat16_model_rows_agree_with_float32(tiny_lm):
    """model.dtype bfloat16 (Hugging Face torch_dtype), projections summed in float32: stored rows agree with a
    float32 model's, per-row cosine >= 0.99 (bf16 is slow on this CPU: 16 documents)."""
    from tdastore.distributed.gradient_worker import ShardComputer
    from tdastore.store.writer import Shard

    shard = Shard(0, 0, 16)
    rows32 = ShardComputer(text_config(tiny_lm), "train").compute(shard)[0].copy()
    half = ShardComputer(text_config(tiny_lm, model={"dtype": "bfloat16"}), "train")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    rows16 = half.compute(shard)[0]
    assert rows16.dtype == np.float32 and np.isfinite(rows16).all()
    cosine = (rows16 * rows32).sum(1) / (np.linalg.norm(rows16, axis=1) * np.linalg.norm(rows32, axis=1))
    assert cosine.min() >= 0.99, cosine
    with pytest.raises(ConfigError, match="model.dtype bfloat16 applies to Hugging Face models"):
        make_task(TaskConfig(), ModelConfig(dtype="bfloat16"))


def test_kfac_factors_gathered_in_the_build_equal_a_separate_pass(ray_cluster, tiny_lm, tmp_path):
    """Each shard's K-FAC sums come from the hooks' own pass; reduced, they equal a separate pass over the data
    (1e-6 relative), the fitted operator is the same, and a killed build resumes without counting a shard twice."""
    from tdastore.attribution import Attributor
    from tdastore.grads.factored import FactoredLinearGradients, KroneckerStatistics
    from tdastore.precond.projected.kronecker import factored_covariances
    from tdastore.precond.registry import FitInputs, operator_class
    from tdastore.store.writer import read_shard_statistics

    config = text_config(tiny_lm)
    store = build_store(config, tmp_path / "store", progress=False)
    gathered = KroneckerStatistics.reduce(read_shard_statistics(store.root, store.manifest))
    ctx = Attributor(store, "grad_dot")
    computer = FactoredLinearGradients(
        ctx.model, ctx.task.per_example_loss, config.gradients.params, config.projection, config.gradients.modules
    )
    separate = factored_covariances(computer, ctx.task, ctx.task.examples("train"), 16)
    for (a1, s1), (a2, s2) in zip(gathered, separate):
        assert np.abs(a1 - a2).max() <= 1e-6 * np.abs(a2).max() and np.abs(s1 - s2).max() <= 1e-6 * np.abs(s2).max()
    fit = FitInputs(store, ctx.config, ctx.model, ctx.task)
    built = operator_class("projected", "ekfac")().fit(fit)
    assert built.info["factors"] == "build"
    from tdastore.distributed.blocks import ray_block_map, row_ranges

    assert row_ranges(100, 16, 3) == [(0, 32), (32, 80), (80, 100)] and row_ranges(10, 16, 8) == [(0, 10)]
    on_ray = operator_class("projected", "ekfac")().fit(  # the eigenvalue correction as Ray tasks over row ranges
        FitInputs(store, ctx.config, ctx.model, ctx.task, map_blocks=ray_block_map(store, 2, block_rows=16))
    )
    for ours, theirs in zip(on_ray.blocks, built.blocks):
        np.testing.assert_allclose(ours.values, theirs.values, rtol=1e-10)
    limited = FitInputs(store, load_config({**config_to_dict(ctx.config), "attribution": {"kfac_examples": 10**6}}),
                        ctx.model, ctx.task)  # fmt: skip
    reference = operator_class("projected", "ekfac")().fit(limited)
    assert reference.info["factors"] == "separate pass"
    rows = store.read_rows(0, 8)
    np.testing.assert_allclose(built.solve(rows), reference.solve(rows), rtol=1e-4, atol=1e-7 * np.abs(rows).max())

    killed = tmp_path / "killed"
    with pytest.raises(StoreError):
        build_store(config, killed, progress=False, fault={"shard": 1})
    resumed = build_store(config, killed, progress=False)
    again = KroneckerStatistics.reduce(read_shard_statistics(resumed.root, resumed.manifest))
    for (a1, s1), (a2, s2) in zip(gathered, again):
        np.testing.assert_allclose(a2, a1, rtol=1e-12)
        np.testing.assert_allclose(s2, s1, rtol=1e-12)


def per_position_terms(model, task, computer, one) -> torch.Tensor:
    """[T, K] by autograd alone: for each position t, a zero perturbation Delta of every covered weight (one per
    tied weight) added to its use at position t only; d loss / d Delta is position t's term of the gradient, then
    projected block by block with the computer's P_out, P_in."""
    length = int(one.inputs[0, 1].sum())
    inputs, targets = one.inputs[:, :, :length], one.targets[:, :length]
    terms = []
    for t in range(length):
        deltas = {name: torch.zeros(d_out, d_in, requires_grad=True) for name, d_out, d_in in computer.blocks}
        handles = []
        for (_, module, with_bias), block in zip(computer.modules, computer.block_of):
            delta = deltas[computer.blocks[block][0]]

            def hook(module, args, output, delta=delta, with_bias=with_bias, t=t):
                output = output.clone()
                if isinstance(module, torch.nn.Embedding):
                    output[:, t] = output[:, t] + delta[args[0][:, t]]
                else:
                    x = args[0][:, t]
                    output[:, t] = output[:, t] + x @ delta[:, : x.shape[-1]].T + (delta[:, -1] if with_bias else 0)
                return output

            handles.append(module.register_forward_hook(hook))
        try:
            loss = task.per_example_loss(model(inputs), targets).sum()
            grads = torch.autograd.grad(loss, list(deltas.values()))
        finally:
            for handle in handles:
                handle.remove()
        parts = []
        for g, p_out, p_in in zip(grads, computer.p_out, computer.p_in):
            g = g.double()
            left = g if p_out is None else p_out.double().T @ g
            parts.append((left if p_in is None else left @ p_in.double()).reshape(-1))
        terms.append(torch.cat(parts))
    return torch.stack(terms)


def per_token_query_rows(model, task, computer, one) -> tuple[list[int], torch.Tensor]:
    """(target positions, [n, K]): the gradient of each target token's loss / n by a plain backward pass over the
    model's parameters, projected block by block (the query's gradient is their sum)."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    positions = [j for j in range(1, one.targets.shape[1]) if int(one.targets[0, j]) != -100]
    rows = []
    for j in positions:
        logits = model(one.inputs)
        loss = torch.nn.functional.cross_entropy(logits[0, j - 1 : j].float(), one.targets[0, j : j + 1]) / len(
            positions
        )
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        parts = []
        for (name, _, d_in), p_out, p_in in zip(computer.blocks, computer.p_out, computer.p_in):
            w = grads[f"{name}.weight"].double()
            w = w.T if is_conv1d(modules[name]) else w
            full = torch.cat([w, grads[f"{name}.bias"].double()[:, None]], 1) if d_in == w.shape[1] + 1 else w
            left = full if p_out is None else p_out.double().T @ full
            parts.append((left if p_in is None else left @ p_in.double()).reshape(-1))
        rows.append(torch.cat(parts))
    return positions, torch.stack(rows)


@pytest.mark.parametrize("method", ["grad_dot", "grad_cos", "kfac"])
def test_token_scores_sum_to_the_score_and_equal_an_autograd_loop(ray_cluster, tiny_lm, tmp_path_factory, method):
    """Token-level attribution, both directions, on a factored `modules: all` store: each training-document token's
    and each query target token's share equals an autograd per-position (per-token) loop's gradient projected and
    put through the method's operator (1e-5), and each side sums to the document's score in the score matrix."""
    root = tmp_path_factory.getbasetemp() / "token_store"
    corpus = root / "corpus.jsonl"
    if not corpus.exists():
        root.mkdir(exist_ok=True)
        lines = (tiny_lm / "corpus.jsonl").read_text().splitlines()[:40]
        corpus.write_text("\n".join(lines) + "\n")
    config = text_config(
        tiny_lm,
        task={"dataset": str(corpus), "max_length": 24},
        gradients={"modules": "all"},
        projection={"factors": [6, 6], "module_factors": {}},
    )
    store = build_store(config, root / "store", progress=False)
    attributor = Attributor(store, method)
    prompts = ["Return the number of items", "Open a file and read it"]
    table = attributor.token_scores(prompts, k=2)
    assert set(table.column("side").to_pylist()) == {"train", "test"}
    matrix = attributor.score_matrix(prompts)
    test = attributor.examples(prompts)
    model, task = attributor.model, attributor.task
    computer = attributor._gradient_computer(task.per_example_loss)
    operator, unit, scale = attributor.operator, attributor.method.unit_projected("train"), attributor.scale

    def through(rows, norm):  # the method's map on the rows of one gradient whose whole norm is norm
        rows = rows / norm if unit else rows
        return torch.as_tensor(operator.transform(rows.float().numpy())).double()

    df = table.to_pandas()
    for j in range(len(prompts)):
        one = test.take(np.array([j]))
        positions, query_terms = per_token_query_rows(model, task, computer, one)
        query = query_terms.sum(0)
        q_norm = float(query.norm())
        hits = df[(df.test_id == int(test.ids[j]))]
        for row in sorted(set(hits.train_row)):
            doc = task.examples("train").take(np.array([row]))
            terms = per_position_terms(model, task, computer, doc)  # [T, K]
            t_norm = float(terms.sum(0).norm())
            document = through(terms.sum(0, keepdim=True), t_norm)[0]
            expected_train = through(terms, t_norm) @ (through(query[None], q_norm)[0] * scale)
            expected_test = (through(query_terms, q_norm) * scale) @ document
            mine = hits[hits.train_row == row]
            got_train = mine[mine.side == "train"].sort_values("position")
            got_test = mine[mine.side == "test"].sort_values("position")
            assert got_test.position.tolist() == positions
            tol = 1e-5 * float(expected_train.abs().sum())
            np.testing.assert_allclose(got_train.score.to_numpy(), expected_train.numpy(), rtol=0, atol=tol)
            np.testing.assert_allclose(got_test.score.to_numpy(), expected_test.numpy(), rtol=0, atol=tol)
            whole = float(matrix[j, row])  # the stored row's score
            for side in (got_train, got_test):
                assert abs(side.score.sum() - whole) <= 1e-4 * abs(whole) + 1e-6 * np.abs(matrix[j]).max()
            assert got_train.token.tolist()[0] == task.tokenizer.decode([int(doc.inputs[0, 0, 0])])


def make_lora_adapter(tiny_lm, folder) -> None:
    """A LoRA adapter of the tiny GPT-2 saved as a fine-tuning run saves one (B moved off its zero start)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_lm / "model")
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    adapted = get_peft_model(base, lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    adapted.save_pretrained(folder)


def test_a_lora_adapter_folder_attributes_the_adapters_own_parameters(tiny_lm, tmp_path):
    """An adapter folder as model.name_or_path loads base + adapter; modules: auto takes the LoRA layers only,
    and the rows equal projected autograd gradients over the adapter's parameters; the gold standard's
    further training changes the adapter only; the fingerprint covers the adapter."""
    from tdastore.groundtruth.engine import trainable_parameters
    from tdastore.tasks.base import model_fingerprint

    make_lora_adapter(tiny_lm, tmp_path / "adapter")
    projection = {"factors": [4, 4], "module_factors": {}}
    config = text_config(tiny_lm, model={"name_or_path": str(tmp_path / "adapter")}, gradients={"modules": "auto"},
                         projection=projection)  # fmt: skip
    task = make_task(config.task, config.model)
    model = task.make_model()
    computer = make_gradient_computer(model, task.per_example_loss, config.gradients, config.projection)
    names = [name for name, _, _ in computer.blocks]
    assert len(names) == 2 * 2 * 2 and all(".lora_A." in n or ".lora_B." in n for n in names), names
    adapter_parameters = set(trainable_parameters(model)[0])
    assert set(computer.param_shapes) == adapter_parameters and all("lora_" in n for n in adapter_parameters)
    examples = task.examples("train").slice(0, 5)
    rows = computer(examples.inputs, examples.targets)[0]
    expected = dense_projected(task, model, computer, examples)
    rel = float((rows.double() - expected).norm(dim=1).max() / expected.norm(dim=1).min())
    assert rel <= 1e-4, rel
    base = make_task(config.task, ModelConfig(name_or_path=str(tiny_lm / "model"))).make_model()
    base_loss = task.per_example_loss(base(examples.inputs), examples.targets)
    adapted_loss = task.per_example_loss(model(examples.inputs), examples.targets)
    assert not torch.allclose(base_loss, adapted_loss)  # the adapter was loaded, not only the base
    assert model_fingerprint(base) != model_fingerprint(model)
    same = text_config(tiny_lm, model={"name_or_path": str(tiny_lm / "model"), "adapter": str(tmp_path / "adapter")})
    on_top = make_task(same.task, same.model).make_model()
    assert model_fingerprint(on_top) == model_fingerprint(model)  # model.adapter on a base: the same model
    with pytest.raises(ConfigError, match="adapter_config.json"):
        make_task(same.task, ModelConfig(name_or_path=str(tiny_lm / "model"), adapter=str(tmp_path))).make_model()


def test_summed_document_losses_scale_each_row_by_its_target_count(tiny_lm):
    """task.loss_reduction sum (bergson's default): a document's row is its mean-loss row times its number of
    target tokens, and the store's task description records the choice."""
    config = text_config(tiny_lm)
    summed = text_config(tiny_lm, task={"loss_reduction": "sum"})
    rows = {}
    for name, cfg in (("mean", config), ("sum", summed)):
        task = make_task(cfg.task, cfg.model)
        computer = make_gradient_computer(task.make_model(), task.per_example_loss, cfg.gradients, cfg.projection)
        examples = task.examples("train").slice(0, 6)
        rows[name] = computer(examples.inputs, examples.targets)[0].double()
    counts = (examples.targets[:, 1:] != -100).sum(1).double()  # target tokens per document
    torch.testing.assert_close(rows["sum"], rows["mean"] * counts[:, None], rtol=1e-4, atol=1e-6)
    assert make_task(summed.task, summed.model).description()["loss_reduction"] == "sum"
    assert "loss_reduction" not in make_task(config.task, config.model).description()  # older stores unchanged


def summed_top_logit(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A measurement of the user's own (imported by name in the test below): each document's max logit summed
    over its real tokens (targets mark padding -100: a batch is right-padded)."""
    return (outputs.float().amax(-1) * (targets != -100)).sum(1)  # [B]


def test_measurements_chosen_at_query_time(ray_cluster, tiny_lm, tmp_path):
    """One store (prompt + text documents, loss over whole documents), measured at query time: `completion`
    equals the test loss of a task built with completion_only; {prompt, completion} pairs and chat messages
    measure the completion; logprob is the mean loss times the target count; module:function equals autograd on
    it; the measurement is in the results' metadata."""
    docs = [json.loads(line) for line in (tiny_lm / "corpus.jsonl").read_text().splitlines()[:120]]
    records = [{"id": d["id"], "prompt": d["text"][:12], "text": d["text"][12:]} for d in docs if len(d["text"]) > 30]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    task_section = {"dataset": str(tmp_path / "qa.jsonl"), "prompt_column": "prompt", "test_fraction": 0.1}
    projection = {"factors": [4, 4], "module_factors": {}}
    config = text_config(tiny_lm, task=task_section, projection=projection)
    store = build_store(config, tmp_path / "store", progress=False)

    def attributor(measurement):
        return Attributor(store, "grad_dot", {"attribution": {"measurement": measurement}})

    completion = attributor("completion")
    test = completion.examples(split="test")
    rows = completion.test_rows(test)
    only = text_config(tiny_lm, task={**task_section, "completion_only": True}, projection=projection)
    masked_task = make_task(only.task, only.model)
    computer = make_gradient_computer(completion.model, masked_task.test_function, only.gradients, only.projection)
    masked = masked_task.examples("test")
    np.testing.assert_allclose(rows, computer(masked.inputs, masked.targets)[0].numpy(), rtol=1e-5, atol=1e-7)

    split_test = attributor("loss").task.examples("test")
    pairs = [{"prompt": p, "completion": c} for p, c in zip(*_prompts_and_texts(records, split_test.ids))]
    loss = attributor("loss")
    np.testing.assert_allclose(loss.test_rows(loss.examples(pairs)), rows, rtol=1e-5, atol=1e-7)
    chats = [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["completion"]}]}
             for p in pairs]  # fmt: skip
    template, loss.task.tokenizer.chat_template = loss.task.tokenizer.chat_template, None
    with pytest.raises(DataError, match="no chat template"):  # a tokenizer without one: a clear error
        loss.examples(chats)
    loss.task.tokenizer.chat_template = template  # the demo LM's: the turns' contents in order
    assert template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    np.testing.assert_allclose(loss.test_rows(loss.examples(chats)), rows, rtol=1e-5, atol=1e-7)

    logprob = attributor("logprob")
    counts = (test.targets[:, 1:] != -100).sum(1).numpy()  # completion tokens of each query
    in_pairs = logprob.test_rows(logprob.examples(pairs))
    np.testing.assert_allclose(in_pairs, rows * counts[:, None], rtol=1e-4, atol=1e-6)

    own = attributor("test_text:summed_top_logit")
    whole = own.examples(split="test").slice(0, 4)
    fake = type("Measured", (), {"per_example_loss": staticmethod(summed_top_logit)})()
    expected = dense_projected(fake, own.model, own._gradient_computer(summed_top_logit), whole)
    got = torch.as_tensor(own.test_rows(whole)).double()
    assert float((got - expected).norm(dim=1).max() / expected.norm(dim=1).min()) <= 1e-4
    table = own.top_k(whole, 2)
    assert table.schema.metadata[b"tdastore.measurement"] == b"test_text:summed_top_logit"
    with pytest.raises(ConfigError, match="function of yours"):
        from tdastore.attribution.tokens import require_tokens

        require_tokens(own)
    with pytest.raises(ConfigError, match="unknown measurement"):
        attributor("perplexity")


def _prompts_and_texts(records, ids):
    by_id = {r["id"]: r for r in records}
    return [by_id[int(i)]["prompt"] for i in ids], [by_id[int(i)]["text"] for i in ids]


def exact_position_terms(model, task, names, one) -> torch.Tensor:
    """[T, p] by autograd alone: for each position t, every covered parameter's module output at t recomputed with
    a zero perturbation Delta added to its parameters (their use at t only); d loss / d Delta is position t's term
    of the full gradient, in `names` order."""
    length = int(one.inputs[0, 1].sum())
    inputs, targets = one.inputs[:, :, :length], one.targets[:, :length]
    params = dict(model.named_parameters())
    name_of = {id(p): n for n, p in params.items() if n in names}
    terms = []
    for t in range(length):
        deltas = {n: torch.zeros_like(params[n], requires_grad=True) for n in names}
        busy, handles = [False], []
        for module in model.modules():
            own = {local: p for local, p in module.named_parameters(recurse=False) if id(p) in name_of}
            if not own:
                continue

            def hook(module, args, kwargs, output, own=own, t=t, deltas=deltas, busy=busy):
                if busy[0]:
                    return output
                busy[0] = True
                try:
                    moved = functional_call(
                        module, {k: p + deltas[name_of[id(p)]] for k, p in own.items()}, args, kwargs
                    )
                finally:
                    busy[0] = False
                output = output.clone()
                output[:, t] = moved[:, t]
                return output

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        try:
            loss = task.per_example_loss(model(inputs), targets).sum()
            grads = torch.autograd.grad(loss, [deltas[n] for n in names])
        finally:
            for handle in handles:
                handle.remove()
        terms.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(terms)


@pytest.mark.parametrize("method", ["grad_dot", "grad_cos", "if_diag"])
def test_exact_path_token_scores_equal_an_autograd_loop(ray_cluster, tiny_lm, tmp_path_factory, method):
    """Token shares on the exact path (every parameter of the LM): each training-document token's share is the
    test vector times that position's part of the gradient (an autograd loop of per-position perturbations), each
    query token's share the test vector of that token's gradient alone times the document's row, and both sides
    sum to the exact score matrix's entry."""
    root = tmp_path_factory.getbasetemp() / "exact_token_store"
    root.mkdir(exist_ok=True)
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join((tiny_lm / "corpus.jsonl").read_text().splitlines()[:24]) + "\n")
    config = text_config(tiny_lm, task={"dataset": str(corpus), "max_length": 16}, gradients={"modules": "all"},
                         projection={"factors": [4, 4], "module_factors": {}})  # fmt: skip
    store = build_store(config, root / "store", progress=False)
    attributor = Attributor(store, method, {"attribution": {"path": "exact"}})
    prompts = ["Return the number of items", "Open a file"]
    table = attributor.token_scores(prompts, k=2).to_pandas()
    matrix = attributor.score_matrix(prompts)  # [m, N]
    scorer, test = attributor.exact, attributor.examples(prompts)
    space, task = scorer.space, attributor.task
    x = scorer.test_vectors(attributor.method, test).double()  # [m, p]
    for (test_id, train_row), hit in table.groupby(["test_id", "train_row"]):
        j = int(np.flatnonzero(test.ids == test_id)[0])
        doc = task.examples("train").take(np.array([train_row]))
        terms = exact_position_terms(attributor.model, task, space.names, doc)  # [T, p]
        row = terms.sum(0)
        shrink = 1.0 / float(row.norm()) if method == "grad_cos" else 1.0
        got_train = hit[hit.side == "train"].sort_values("position").score.to_numpy()
        expected_train = (terms @ x[j]).numpy() * shrink
        tol = 1e-4 * float(np.abs(expected_train).sum()) + 1e-9
        np.testing.assert_allclose(got_train, expected_train, rtol=0, atol=tol)
        whole = float(matrix[j, train_row])
        for side in ("train", "test"):
            total = hit[hit.side == side].score.sum()
            assert abs(total - whole) <= 1e-3 * abs(whole) + 1e-6 * np.abs(matrix[j]).max(), (side, total, whole)
        if method in ("grad_dot", "grad_cos"):  # the query side by a plain backward pass per target token
            params = dict(attributor.model.named_parameters())
            one = test.take(np.array([j]))
            positions = [p for p in range(1, one.targets.shape[1]) if int(one.targets[0, p]) != -100]
            g_query = torch.zeros(space.p, dtype=torch.float64)
            token_g = []
            for p in positions:
                logits = attributor.model(one.inputs)
                loss = torch.nn.functional.cross_entropy(logits[0, p - 1 : p], one.targets[0, p : p + 1])
                grads = torch.autograd.grad(loss / len(positions), [params[n] for n in space.names])
                token_g.append(torch.cat([g.reshape(-1) for g in grads]).double())
                g_query += token_g[-1]
            scale = attributor.scale / (float(g_query.norm()) if method == "grad_cos" else 1.0)
            expected_test = np.array([float(g @ row) * scale * shrink for g in token_g])
            got_test = hit[hit.side == "test"].sort_values("position").score.to_numpy()
            np.testing.assert_allclose(got_test, expected_test, rtol=0, atol=1e-4 * np.abs(expected_test).sum())


def dense_blocks(task, model, computer, examples, scales=None) -> list[torch.Tensor]:
    """Per block, every example's full gradient [n, out, in(+1)] by torch.func, scaled by `scales` (as
    dense_projected, without the projection)."""
    identity = FactoredLinearGradients.__new__(FactoredLinearGradients)  # the same blocks, every side unprojected
    identity.blocks = computer.blocks
    identity.p_out, identity.p_in = [None] * len(computer.blocks), [None] * len(computer.blocks)
    rows = dense_projected(task, model, identity, examples, scales)  # [n, sum of out x in]
    sizes = [d_out * d_in for _, d_out, d_in in computer.blocks]
    return [part.reshape(len(examples), d_out, d_in)
            for part, (_, d_out, d_in) in zip(rows.split(sizes, 1), computer.blocks)]  # fmt: skip


def test_pca_basis_is_the_top_eigenvectors_of_the_gradients_second_moments(tiny_lm):
    """projection.basis pca: each side is the top-k eigenvectors of sum_i G_i G_i^T (out) and sum_i G_i^T G_i (in)
    of autograd's per-example gradients, Adafactor-scaled, a tied weight's two uses summed (numpy eigh); a block
    with a side wider than basis_max_dim keeps the seed's random sides; rows equal projecting autograd's gradients
    with the fitted sides."""
    from tdastore.grads.basis import fit_pca_basis
    from tdastore.grads.factored import _side_matrix
    from tdastore.grads.normaliser import Normaliser

    config = text_config(tiny_lm, gradients={"modules": "all"},
                         projection={"factors": [8, 8], "module_factors": {}, "basis": "pca"})  # fmt: skip
    task = make_task(config.task, config.model)
    model = task.make_model()
    moments = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(3)) + 0.1 for n, p in
               model.named_parameters()}  # fmt: skip
    normaliser = Normaliser("adafactor", moments, 1e-8, "test").bind(model)
    computer = make_gradient_computer(model, task.per_example_loss, config.gradients, config.projection, normaliser)
    train = task.examples("train")
    basis = fit_pca_basis(computer, train, 7, limit=20, max_dim=300)  # batches of 7: sums across batches
    assert basis.examples == 20 and basis.spec()["kind"] == "pca"
    wte = "model.transformer.wte"  # [384, 64] (tied head): 384 > 300 keeps random sides
    assert f"{wte}.out" not in basis.matrices and f"{wte}.in" not in basis.matrices
    scales = {n: normaliser.scale(n) for n in computer.param_shapes}
    blocks = dense_blocks(task, model, computer, train.slice(0, 20), scales)
    for (name, d_out, d_in), full in zip(computer.blocks, blocks):
        for side, second, dim in (("out", np.einsum("noi,npi->op", full, full), d_out),
                                  ("in", np.einsum("noi,noj->ij", full, full), d_in)):  # fmt: skip
            if name == wte or dim <= 8:
                continue
            values, vectors = np.linalg.eigh(second)
            assert values[-8] > values[-9] * (1 + 1e-3)  # a gap: the top-8 subspace is well defined
            expected = vectors[:, -8:] @ vectors[:, -8:].T  # the subspace's projector
            fitted = basis.matrices[f"{name}.{side}"].double().numpy()
            assert fitted.shape == (dim, 8)
            np.testing.assert_allclose(fitted.T @ fitted, np.eye(8), atol=1e-5)
            assert np.abs(fitted @ fitted.T - expected).max() <= 1e-4, (name, side)
            top = fitted[:, 0] @ second @ fitted[:, 0]  # the first column carries the largest eigenvalue
            assert abs(top - values[-1]) <= 1e-5 * values[-1]
    fitted_computer = make_gradient_computer(
        model, task.per_example_loss, config.gradients, config.projection, normaliser, basis
    )
    assert fitted_computer.spec()["basis"] == basis.spec() and "basis" not in computer.spec()
    assert torch.equal(fitted_computer.p_out[0], _side_matrix(config.projection.seed, f"{wte}.out", 384, 8))
    examples = train.slice(0, 6)
    rows, _, _ = fitted_computer(examples.inputs, examples.targets)
    expected = dense_projected(task, model, fitted_computer, examples, scales)
    rel = float((rows.double() - expected).norm(dim=1).max() / expected.norm(dim=1).min())
    assert rel <= 1e-4, rel


def test_a_pca_store_projects_queries_with_its_own_basis(ray_cluster, tiny_lm, tmp_path, monkeypatch):
    """A store built with projection.basis pca keeps its sides (basis.safetensors, sha256 in the spec); workers'
    rows and a query's test rows use them (store rows == the fitted computer's, scores == their products); a
    resumed build keeps the stored basis; a damaged basis file and pca with a dense projection are clear errors."""
    config = text_config(tiny_lm, projection={"basis": "pca", "basis_examples": 40})
    store = build_store(config, tmp_path / "store", progress=False)
    spec = store.manifest["projection"]["basis"]
    assert spec["kind"] == "pca" and spec["examples"] == 40 and (store.root / "basis.safetensors").is_file()
    assert "PCA sides fitted on 40 examples" in store.summary()  # what `tdastore info` prints
    attributor = Attributor(store, "grad_dot", {"attribution": {"path": "projected"}})
    computer = attributor._gradient_computer(attributor.task.per_example_loss)
    assert computer.basis is not None and computer.spec() == store.manifest["projection"]
    some = attributor.task.examples("train").slice(0, 5)
    rows, _, _ = computer(some.inputs, some.targets)
    np.testing.assert_allclose(store.read_rows(0, 5), rows.detach().numpy(), rtol=1e-4, atol=1e-6)
    test = attributor.task.examples("test").slice(0, 3)
    scores = attributor.score_matrix(test)  # [3, N]
    expected = attributor.test_rows(test) @ store.read_rows(0, store.n_rows).T / store.n_rows  # attribution.scale
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    ekfac = Attributor(store, "ekfac", {"attribution": {"path": "projected"}})  # the K-FAC fit projects with it
    assert np.isfinite(ekfac.score_matrix(test)).all()
    before = (store.root / "basis.safetensors").read_bytes()
    import tdastore.distributed.build as build_module

    def no_refit(*args, **kwargs):
        raise AssertionError("a resumed build refitted the basis")

    monkeypatch.setattr(build_module, "fit_pca_basis", no_refit)
    build_store(config, store.root, progress=False)  # the same command again: the stored basis, nothing refitted
    assert (store.root / "basis.safetensors").read_bytes() == before
    monkeypatch.undo()
    (store.root / "basis.safetensors").write_bytes(before[:-8] + b"\0" * 8)
    with pytest.raises(StoreError, match="basis .* sha256"):
        Attributor(store, "grad_dot", {"attribution": {"path": "projected"}}).test_rows(test)
    with pytest.raises(ConfigError, match="projection.basis"):
        text_config(tiny_lm, projection={"kind": "gaussian", "basis": "pca"})
